"""`apogee sft`: supervised fine-tuning, the pre-training engine with a loss mask.

The same parallel model, trainer, checkpoints and resilience as `apogee pretrain`; what changes
is the data (data_pipeline/sft.py: examples whose prompts are context and whose responses are
trained, one per sample, padded; or several per sample with sft.packing, data_pipeline/packing.py), the loss (averaged over the step's trained tokens only, which
the engine's Trainer does for any masked microbatch), and the start: `train.init_from` loads a
pre-trained model's weights (engine/state/init_from.py). Adapters instead of full fine-tuning:
`lora.rank` (engine/model/lora.py), as for any stage.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

from engine.config import ApogeeConfig, ConfigError
from engine.stage import Stage


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`apogee sft`) examples (the starting weights: train.init_from)."""

    inputs: list = field(default_factory=list)
    """JSONL files, one example per line: {prompt, response} or {messages: [{role, content}]}
    (data_pipeline/sft.py); only responses / assistant turns are trained."""
    valid_inputs: list = field(default_factory=list)
    """Held-out examples (same format) for the validation passes of train.eval_interval."""
    prompt_key: str = "prompt"
    """Key of the context text in prompt/response examples."""
    response_key: str = "response"
    """Key of the trained text in prompt/response examples."""
    packing: bool = False
    """Several examples per sample by best-fit decreasing, each attending only to itself with its own
    positions (data_pipeline/packing.py); train.global_batch_size then counts packed samples."""
    lora_rank: int = 0
    """Deprecated: use lora.rank (kept for one release; copied there with a note)."""
    lora_alpha: float = 16.0
    """Deprecated: use lora.alpha (kept for one release; copied there with a note)."""


class SFTStage(Stage):
    """Masked next-token loss on prompt/response or chat examples."""

    name = "sft"
    help = "supervised fine-tuning on prompt/response examples (sft.* keys)"
    sections = MappingProxyType({"sft": SFTConfig})
    inputs_key = "sft.inputs"
    inputs_what = "fine-tuning examples"
    inputs_needs = ("JSONL files of examples, e.g. --set sft.inputs=[train.jsonl] "
                    "(lines {prompt, response} or {messages})")
    default_config = "configs/sft.yaml"
    """The sft preset, used without --config (its comments document each value)."""

    def prepare(self, cfg: ApogeeConfig, run_dir: Optional[str], resume: str) -> str:
        """The stage's inputs are required; sft.lora_rank/lora_alpha move to lora.* with a note."""
        resume = super().prepare(cfg, run_dir, resume)
        move_deprecated_lora_keys(cfg)
        return resume

    def validate(self, cfg: ApogeeConfig, world_size: int) -> None:
        """The deprecated keys are checked where they are read (lora.* is the engine's)."""
        if cfg.sft.lora_rank < 0:
            raise ConfigError(f"sft.lora_rank={cfg.sft.lora_rank}: must be >= 0 (0: no adapters; deprecated, use lora.rank)")

    def build_data(self, cfg: ApogeeConfig):
        """One example per sample, prompt untrained, response trained (data_pipeline/sft.py)."""
        from data_pipeline.sft import read_examples
        from data_pipeline.tokenizer import get_tokenizer

        tokenizer, t = get_tokenizer(cfg.data.tokenizer), cfg.train
        examples = read_examples(cfg.sft.inputs, tokenizer, cfg.sft.prompt_key, cfg.sft.response_key,
                                 key=self.inputs_key)
        return sft_data(cfg.sft.packing)(examples, cfg.model.seq_length, cfg.seed, t.global_batch_size, t.micro_batch_size,
                       tokenizer.pad_id)

    def samples_per_epoch(self, cfg: ApogeeConfig, examples: int) -> int:
        """Packed: the rows an epoch's examples fill (the examples are read to know their lengths)."""
        return self.build_data(cfg).rows.rows_per_epoch if cfg.sft.packing else examples

    def build_validation_data(self, cfg: ApogeeConfig):
        """sft.valid_inputs, read like the training examples (the masked loss on their responses)."""
        from data_pipeline.sft import read_examples
        from data_pipeline.tokenizer import get_tokenizer

        if not cfg.sft.valid_inputs:
            raise ConfigError(f"train.eval_interval={cfg.train.eval_interval}: `apogee sft` validates on held-out "
                              f"examples: set sft.valid_inputs=[valid.jsonl]")
        tokenizer, t = get_tokenizer(cfg.data.tokenizer), cfg.train
        examples = read_examples(cfg.sft.valid_inputs, tokenizer, cfg.sft.prompt_key, cfg.sft.response_key,
                                 key="sft.valid_inputs")
        return sft_data(cfg.sft.packing)(examples, cfg.model.seq_length, cfg.seed, t.global_batch_size, t.micro_batch_size,
                       tokenizer.pad_id)


def sft_data(packing: bool) -> type:
    """The SFT data class: one padded example per sample, or packed examples."""
    if packing:
        from data_pipeline.packing import PackedSFTData
        return PackedSFTData
    from data_pipeline.sft import SFTData
    return SFTData


def move_deprecated_lora_keys(cfg: ApogeeConfig) -> None:
    """sft.lora_rank / sft.lora_alpha (before lora.* existed) -> lora.rank / lora.alpha, with a note."""
    s, lora = cfg.sft, cfg.lora
    if not s.lora_rank:
        return
    if lora.rank and (lora.rank, lora.alpha) != (s.lora_rank, s.lora_alpha):
        raise ConfigError(f"sft.lora_rank={s.lora_rank} and lora.rank={lora.rank}: set lora.rank and lora.alpha "
                          f"only (sft.lora_* are deprecated)")
    print(f"apogee: note: sft.lora_rank={s.lora_rank} / sft.lora_alpha={s.lora_alpha} are deprecated and will go in "
          f"the next release; use lora.rank / lora.alpha", file=sys.stderr)
    lora.rank, lora.alpha = s.lora_rank, s.lora_alpha
    s.lora_rank, s.lora_alpha = 0, SFTConfig.lora_alpha
