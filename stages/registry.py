"""The built-in stages, in the order a model goes through them (pretrain -> midtrain -> sft -> dpo -> grpo)."""
from __future__ import annotations

from engine.stage import StageRegistry


def builtin_stages() -> StageRegistry:
    """A registry of the five built-in stages; external stages are added by 'package.module:Stage'."""
    from stages.dpo import DPOStage
    from stages.grpo.stage import GRPOStage
    from stages.midtrain import MidtrainStage
    from stages.pretrain import PretrainStage
    from stages.sft import SFTStage

    return StageRegistry([PretrainStage(), MidtrainStage(), SFTStage(), DPOStage(), GRPOStage()])
