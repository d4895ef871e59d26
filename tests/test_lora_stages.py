"""LoRA is an engine feature (lora.*): DPO and GRPO train adapters too, at dp2 as on one rank; the
deprecated sft.lora_rank / sft.lora_alpha still switch it on, with a note."""
import pytest
import torch

from tests.noise_floor import Tolerance

LORA = ["lora.rank=4", "lora.alpha=8"]


def _runs(world_size: int, reordered=None) -> dict:
    """{stage: (losses, state as numpy)} of DPO and GRPO with LoRA (dp2 at world size 2); reordered:
    the single-rank noise-floor run (tests/noise_floor.py)."""
    from tests import test_dpo, test_grpo

    layout = ["parallel.dp=2"] if world_size > 1 else []
    dpo = test_dpo._train([*test_dpo.DPO, *LORA, *layout], world_size, 6, reordered=reordered)
    grpo = test_grpo._train([*test_grpo.PARITY, *LORA, *layout], world_size, 3, reordered=reordered)
    return {"dpo": (dpo[0], dpo[2]), "grpo": (grpo[0], grpo[3])}


def _tensors(run):
    losses, state = run
    return losses, {k: torch.from_numpy(v) for k, v in state.items()}


def _worker(rank, world_size):
    return _runs(world_size)


@pytest.mark.distributed
def test_dpo_and_grpo_with_lora_match_the_single_rank_run_at_dp2():
    from tests.distributed import run_distributed

    reference, floor = _runs(1), _runs(1, reordered="microbatches")
    parallel = run_distributed(_worker, 2, timeout=300)[0]
    for stage, ref in reference.items():
        tolerance = Tolerance.measured(_tensors(ref), _tensors(floor[stage]), relative_loss=stage == "dpo")
        tolerance.check(f"{stage} + LoRA dp2", *_tensors(parallel[stage]), *_tensors(ref))
        trained = [name for name in ref[1] if name.endswith("lora_B")]
        assert trained and any(abs(ref[1][k]).max() > 0 for k in trained)  # the adapters moved (B starts at 0)


def test_deprecated_sft_lora_keys_switch_lora_on_with_a_note(capsys):
    from stages.registry import builtin_stages

    registry = builtin_stages()
    sft = registry.get("sft")
    cfg = registry.load_config(sft, None, ["sft.inputs=[x.jsonl]", "sft.lora_rank=8", "sft.lora_alpha=4"])
    sft.prepare(cfg, None, "auto")
    assert (cfg.lora.rank, cfg.lora.alpha) == (8, 4.0) and cfg.sft.lora_rank == 0
    assert "sft.lora_rank=8 / sft.lora_alpha=4.0 are deprecated" in capsys.readouterr().err
    clash = registry.load_config(sft, None, ["sft.inputs=[x.jsonl]", "sft.lora_rank=8", "lora.rank=4"])
    with pytest.raises(ValueError, match="set lora.rank and lora.alpha only"):
        sft.prepare(clash, None, "auto")
