"""ZeRO building blocks: the padded shard layout, overlapped reduce-scatter, memory figures in the
run's metrics, and optimizer state that torch.distributed.checkpoint saves at dp=2 and loads at dp=1.

Parity, exact traffic and the memory formulas over whole training runs are in test_parity_zero.py.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from parallel.zero import ShardLayout, cut_into_buckets
from tests.parity import FakeData, parity_config


def _params(*sizes):
    return [(f"p{i}", nn.Parameter(torch.zeros(n))) for i, n in enumerate(sizes)]


def test_layout_pads_each_bucket_to_a_multiple_of_dp_and_every_element_has_one_owner():
    named = _params(5, 7, 3, 11, 2)
    layout = ShardLayout(cut_into_buckets(named, bucket_bytes=40), dp_size=4)  # 10 elements per bucket
    assert [len(b) for b in layout.buckets] == [2, 2, 1]  # 5+7, 3+11, 2
    assert layout.sizes == [12, 16, 4] and all(size % 4 == 0 for size in layout.sizes)
    assert layout.padding == layout.numel - 28 == 4
    owners = {name: np.zeros(p.numel(), dtype=int) for name, p in named}
    for rank in range(4):
        local = 0
        for segment in layout.segments(rank):
            assert segment.local_offset >= local  # shard order, no overlap
            local = segment.local_offset + segment.length
            owners[segment.name][segment.param_offset:segment.param_offset + segment.length] += 1
        assert local <= layout.shard_numel() == 8
    assert all((count == 1).all() for count in owners.values())


def test_memory_figures_appear_in_the_runs_metrics(tmp_path):
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config(["parallel.zero=2", "logging.tensorboard=false"], 1, 2)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg), run_dir=tmp_path)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    psi = sum(p.numel() for _, p in trainer.named_parameters())
    assert len(records) == 2
    for record in records:  # fp32 at N_d = 1: 4 Psi params, 4 Psi grads, 8 Psi Adam moments
        assert (record["mem_params_bytes"], record["mem_grads_bytes"], record["mem_optim_bytes"]) == \
            (4 * psi, 4 * psi, 8 * psi)


# ---------------------------------------------------------------------------------------------
# Two ranks


def _two_rank_zero1(rank, world_size, checkpoint_dir):
    """zero=1 on dp=2: observe when reduce-scatters launch, then DCP-save the optimizer state."""
    import torch.distributed.checkpoint as dcp

    from engine.train.trainer import Trainer
    from parallel.layout import ParallelLayout
    from parallel.topology import ParallelContext
    from parallel.zero_optimizer import to_sharded_tensors

    cfg = parity_config(["parallel.dp=2", "parallel.zero=1", "parallel.grad_bucket_mb=0.05"], 2, 3)
    trainer = Trainer(cfg, ParallelContext.create(ParallelLayout(dp=2)), FakeData.for_config(cfg))
    grads = trainer.grads
    launched = []  # after each gradient of the last backward: buckets on the wire
    for _, p in grads.named_params:  # registered after the buffer's hooks: each runs right after it
        p.register_post_accumulate_grad_hook(
            lambda _p: launched.append(sum(h is not None for h in grads._in_flight)) if grads.is_last_microbatch else None)
    for step in range(3):
        launched.clear()
        trainer.train_step(step)
    state = trainer.optimizer.sharded_state_dict()
    dcp.save(to_sharded_tensors(state, grads.layout, [0, 1], rank), checkpoint_id=checkpoint_dir)
    gathered = {f"{name}.{key}": (value.offset, value.local.clone().numpy())
                for name, entry in state.items() for key, value in entry.items() if hasattr(value, "local")}
    shapes = {name: tuple(p.shape) for name, p in trainer.named_parameters()}
    return {"launched": list(launched), "buckets": len(grads.layout.buckets), "pieces": gathered,
            "shapes": shapes, "overlap": _observe_overlapped_gather(cfg)}


def _observe_overlapped_gather(cfg) -> list:
    """parallel.overlap_param_gather: at each module's forward of the second step, (gathers not yet
    waited for, own buckets not yet waited for), seen by a hook that runs after the buffer's wait."""
    from dataclasses import replace

    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = replace(cfg, parallel=replace(cfg.parallel, overlap_param_gather=True))
    trainer = Trainer(cfg, ParallelContext.create(cfg.parallel), FakeData.for_config(cfg))
    grads, seen = trainer.grads, []
    trainer.train_step(0)
    for module in trainer.chunks[0].modules():
        own = sorted({grads._bucket_of[id(p)] for p in module.parameters(recurse=False)})
        if own:
            module.register_forward_pre_hook(lambda _m, _a, own=own: seen.append(
                (sum(h is not None for h in grads._gathers), sum(grads._gathers[b] is not None for b in own))))
    trainer.train_step(1)
    return seen


@pytest.fixture(scope="module")
def two_rank_zero1(tmp_path_factory):
    from tests.distributed import run_distributed

    checkpoint_dir = str(tmp_path_factory.mktemp("zero1_dcp"))
    return run_distributed(_two_rank_zero1, 2, checkpoint_dir, timeout=120), checkpoint_dir


def test_zero1_reduce_scatters_buckets_while_backward_is_still_running(two_rank_zero1):
    for observed in two_rank_zero1[0]:
        launched, buckets = observed["launched"], observed["buckets"]
        assert buckets > 2
        # One more bucket on the wire at a time; all but the embedding's before its gradient exists.
        assert all(later - earlier in (0, 1) for earlier, later in zip(launched, launched[1:]))
        assert launched[0] < buckets - 1 and launched[-1] == buckets


def test_overlapped_param_gather_waits_per_module_as_the_forward_reaches_it(two_rank_zero1):
    """The next step's forward starts with later layers' gathers still in flight; each module runs
    with its own buckets landed; by the end of the first forward none is left."""
    for observed in two_rank_zero1[0]:
        seen = observed["overlap"]
        assert seen and all(own == 0 for _, own in seen)
        pending = [p for p, _ in seen]
        assert pending[0] >= observed["buckets"] // 2  # the embedding waited for its bucket only
        assert all(b <= a for a, b in zip(pending, pending[1:])) and 0 in pending


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_optimizer_state_saved_at_dp2_loads_whole_at_dp1(two_rank_zero1):
    import torch.distributed.checkpoint as dcp

    ranks, checkpoint_dir = two_rank_zero1
    shapes = ranks[0]["shapes"]
    # A dp=1 reader asks for every parameter's state whole; DCP assembles it from both ranks' pieces.
    keys = {key for r in ranks for key in r["pieces"]}
    target = {key: torch.full((int(np.prod(shapes[key.rsplit(".", 1)[0]])),), float("nan")) for key in keys}
    dcp.load(target, checkpoint_id=checkpoint_dir, no_dist=True)
    for key, loaded in target.items():
        expected = np.full(loaded.numel(), np.nan, dtype=np.float32)
        for r in ranks:
            if key in r["pieces"]:
                offset, local = r["pieces"][key]
                expected[offset:offset + local.size] = local
        assert not np.isnan(expected).any(), f"{key}: the two ranks' pieces leave a gap"
        np.testing.assert_array_equal(loaded.numpy(), expected, err_msg=key)


def test_zero3_holds_at_most_two_layers_gathered_in_forward_and_frees_everything_after_the_step():
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config(["parallel.zero=3", "model.num_layers=4"], 1, 1)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg))
    units = trainer.grads.units
    root, layers = units[0], units[1:]
    assert len(layers) == 4 and {n for n, _ in root.params} == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    gathered_layers = []  # in each layer's forward: how many layers are materialised

    def count(_module, _args):
        gathered_layers.append(sum(u.full.untyped_storage().nbytes() > 0 for u in layers))

    for layer in trainer.model.layers.values():
        layer.register_forward_pre_hook(count)  # after the unit's own pre-hook: it and the prefetch
    trainer.train_step(0)
    # Per microbatch: this layer and the next one (prefetched); the last layer has no next.
    assert gathered_layers == [2, 2, 2, 1] * trainer.num_microbatches
    assert all(u.full.untyped_storage().nbytes() == 0 for u in units)
    shard_bytes = trainer.grads.param_shard_flat.numel() * 4
    assert shard_bytes == sum(p.numel() for u in units for _, p in u.params) * 4  # one rank owns everything
