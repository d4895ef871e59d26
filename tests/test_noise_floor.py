"""The noise floor's perturbation (tests/noise_floor.py) changes rounding only, never the math.

A permutation that moved one axis wrong, or a reordering that broke DPO's pairs, would make the
floor run train another model and the floor (and every tolerance) meaninglessly large.
"""
import pytest
import torch

from tests.noise_floor import feature_permutations, permute_model, reorder_microbatches, unpermute_state
from tests.parity import FakeData, parity_config

MODELS = {
    "dense": [],
    "moe": ["model.num_experts=4", "model.moe_topk=2"],
    "lora": ["sft.lora_rank=4", "sft.lora_alpha=8"],
    "qk_norm_tied": ["model.qk_norm=true", "model.tie_embeddings=true"],
}


@pytest.mark.parametrize("model", list(MODELS))
def test_a_permuted_model_computes_the_same_logits_and_permutes_back_bitwise(model):
    from engine.model.parallelize import gather_full_state_dict
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config(MODELS[model], 1, 1)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which would hide a wrongly permuted adapter
        for name, p in trainer.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ctx = ParallelContext.single()
    original = {k: v.detach().clone() for k, v in gather_full_state_dict(trainer.chunks, ctx).items()}
    tokens = trainer.data.microbatch(0, 0, 0, 1).tokens[:, :-1]
    with torch.no_grad():
        logits = trainer.model(tokens)
        perms = feature_permutations(cfg.model)
        permute_model(trainer.named_parameters(), cfg.model, perms)
        permuted_logits = trainer.model(tokens)
    unchanged = [k for k, v in gather_full_state_dict(trainer.chunks, ctx).items() if torch.equal(v, original[k])]
    assert all(original[k].dim() == 1 for k in unchanged), unchanged  # every matrix moved (norms start at 1)
    # The same function summed in another order: fp32 rounding (~1e-6 of the logits), where one
    # wrongly permuted axis changes the logits by their own size.
    difference = (permuted_logits - logits).abs().max() / logits.abs().max()
    print(f"{model}: permuted logits differ by {difference:.1e} of their largest")
    assert 0 < difference < 1e-4
    back = unpermute_state(gather_full_state_dict(trainer.chunks, ctx), cfg.model, perms)
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_reordering_keeps_every_row_and_dpo_pairs():
    tokens = [torch.arange(8).view(4, 2) + 10 * j for j in range(3)]
    masks = [t.float() for t in tokens]
    reordered = reorder_microbatches(list(zip(tokens, masks)))
    assert [t[0, 0].item() for t, _ in reordered] == [26, 16, 6]  # microbatches reversed, rows reversed
    assert all(torch.equal(t.float(), m) for t, m in reordered)  # a row keeps its mask
    pairs = reorder_microbatches([tokens[0]], blocks=2)[0]  # rows: 2 chosen, then their 2 rejected
    assert pairs[:, 0].tolist() == [2, 0, 6, 4]  # chosen i and rejected i stay i rows apart
