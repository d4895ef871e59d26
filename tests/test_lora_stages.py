"""LoRA is an engine feature (lora.*): DPO and GRPO train adapters too, at dp2 as on one rank; the
deprecated sft.lora_rank / sft.lora_alpha still switch it on, with a note."""
import pytest
import torch

from tests.parity import max_relative_loss_diff, max_weight_diff

LORA = ["lora.rank=4", "lora.alpha=8"]


def _runs(world_size: int) -> dict:
    from tests import test_dpo, test_grpo

    dpo = test_dpo._train([*test_dpo.DPO, *LORA, *(["parallel.dp=2"] if world_size > 1 else [])], world_size, 6)
    grpo = test_grpo._train([*test_grpo.PARITY, *LORA, *(["parallel.dp=2"] if world_size > 1 else [])],
                            world_size, 3)
    return {"dpo": (dpo[0], dpo[2]), "grpo": (grpo[0], grpo[3])}


def _worker(rank, world_size):
    return _runs(world_size)


@pytest.mark.distributed
def test_dpo_and_grpo_with_lora_match_the_single_rank_run_at_dp2():
    from tests.distributed import run_distributed

    reference = _runs(1)
    parallel = run_distributed(_worker, 2, timeout=300)[0]
    for stage, (ref_losses, ref_state) in reference.items():
        losses, state = parallel[stage]
        trained = [name for name in ref_state if name.endswith(("lora_A", "lora_B"))]
        assert trained and all(k in ref_state for k in state)
        loss_diff = max_relative_loss_diff(losses, ref_losses)
        weight_diff = max_weight_diff({k: torch.from_numpy(v) for k, v in state.items()},
                                      {k: torch.from_numpy(v) for k, v in ref_state.items()})
        print(f"{stage} + LoRA dp2: max relative loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
        assert loss_diff <= 1e-5 and weight_diff <= 1e-5
        # the adapters moved (B starts at zero), the base weights did not
        assert any(abs(ref_state[k]).max() > 0 for k in trained if k.endswith("lora_B"))


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
