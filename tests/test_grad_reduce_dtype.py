"""optim.grad_reduce_dtype=bf16: gradient buckets travel in bf16 (half the bytes) and land in fp32,
for plain data parallelism and ZeRO-1/2, within bf16's rounding of the fp32 reduction.

Bound per element: each rank's value is rounded to bf16 once (relative error <= u = 2**-8, round
to nearest) and the sum of the rounded values once more, so with two ranks
|bf16 sum - fp32 sum| <= u (|g0| + |g1|) + u |g0 + g1| + O(u^2) <= 2u (|g0| + |g1|) (+ one fp32 ulp).
"""
import pytest
import torch

from engine.config import ConfigError, load_config
from engine.config_validation import validate

U_BF16 = 2.0 ** -8
"""Unit roundoff of bf16 (8 significant bits)."""


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((64, 32), (32,), (48, 64), (7,))]


def _grads(rank, microbatch):
    gen = torch.Generator().manual_seed(100 * rank + microbatch)
    return [torch.randn(shape, generator=gen) * 10.0 ** (i - 2) for i, shape in
            enumerate(((64, 32), (32,), (48, 64), (7,)))]


def _run(buffer_kind, reduce_dtype, rank, group, microbatches=2):
    """(fp32 reduced gradient per parameter, bytes booked) of one step with `microbatches`."""
    from parallel.data_parallel import GradBuffer
    from parallel.zero import ShardedGradBuffer

    params = _params()
    if buffer_kind == "dp":
        grads = GradBuffer([(str(i), p) for i, p in enumerate(params)], group, bucket_bytes=4096,
                           reduce_dtype=reduce_dtype)
    else:
        grads = ShardedGradBuffer([(str(i), p) for i, p in enumerate(params)], group, int(buffer_kind[-1]),
                                  bucket_bytes=4096, reduce_dtype=reduce_dtype)
    group.ledger.reset()
    grads.start_step()
    for m in range(microbatches):
        grads.is_last_microbatch = m == microbatches - 1
        loss = sum((p * g).sum() for p, g in zip(params, _grads(rank, m)))  # d loss / d p = g
        loss.backward()
    grads.finish()
    if buffer_kind == "dp":
        out = [p.main_grad.numpy().copy() for p in params]  # numpy: tensors do not survive the queue
    else:
        out = {(s.name, s.param_offset): grads.grad_shard(s).numpy().copy() for s in grads.segments}
    return out, sum(group.ledger.bytes.values())


def _worker(rank, world_size):
    from parallel.collectives import CommLedger, Group, world_group

    group = world_group(CommLedger())
    group = Group("dp", group.process_group, group.size, group.rank, CommLedger())
    results = {}
    for kind in ("dp", "zero1", "zero2"):
        fp32, fp32_bytes = _run(kind, torch.float32, rank, group)
        bf16, bf16_bytes = _run(kind, torch.bfloat16, rank, group)
        results[kind] = (fp32, bf16, fp32_bytes, bf16_bytes)
    return results


@pytest.fixture(scope="module")
def two_ranks():
    from tests.distributed import run_distributed

    return run_distributed(_worker, 2, timeout=120)


def _magnitude(index, shape_slice=None):
    """sum over ranks and microbatches of |g| for parameter `index`: the bound's scale."""
    total = sum(_grads(r, m)[index].abs() for r in range(2) for m in range(2))
    return total if shape_slice is None else total.reshape(-1)[shape_slice]


@pytest.mark.parametrize("kind", ["dp", "zero1", "zero2"])
def test_bf16_reduction_is_fp32_within_bf16_rounding_at_half_the_bytes(two_ranks, kind):
    fp32, bf16, fp32_bytes, bf16_bytes = two_ranks[0][kind]
    convert = (lambda d: [torch.from_numpy(x) for x in d]) if kind == "dp" else \
        (lambda d: {k: torch.from_numpy(v) for k, v in d.items()})
    fp32, bf16 = convert(fp32), convert(bf16)
    assert bf16_bytes * 2 == fp32_bytes, (fp32_bytes, bf16_bytes)
    if kind == "dp":
        pairs = [(i, fp32[i], bf16[i], _magnitude(i)) for i in range(len(fp32))]
    else:
        pairs = [(int(name), fp32[(name, off)], bf16[(name, off)],
                  _magnitude(int(name), slice(off, off + fp32[(name, off)].numel()))) for name, off in fp32]
    worst, differs = 0.0, False
    for i, a, b, scale in pairs:
        bound = 2 * U_BF16 * scale.reshape(a.shape) + torch.finfo(torch.float32).eps * a.abs()
        worst = max(worst, ((a - b).abs() / bound).max().item())
        differs |= not torch.equal(a, b)
    # stage 2 reduces each microbatch (a rounding per microbatch, the same bound over both sums)
    print(f"{kind}: max |bf16 - fp32| / (2 u sum|g|) = {worst:.3f} (must be <= 1); bytes {fp32_bytes} -> {bf16_bytes}")
    assert differs  # the bf16 path was taken
    assert worst <= 1.0
    # every rank ends with the same reduced values (dp: whole; ZeRO: its own shard, checked above)
    if kind == "dp":
        assert all((x == y).all() for x, y in zip(bf16, two_ranks[1][kind][1]))


def test_grad_reduce_dtype_is_validated():
    assert validate(load_config(None, ["optim.grad_reduce_dtype=bf16"]), 1).optim.grad_reduce_dtype == "bf16"
    with pytest.raises(ConfigError, match="optim.grad_reduce_dtype.*fp16.*fp32, bf16"):
        validate(load_config(None, ["optim.grad_reduce_dtype=fp16"]), 1)
    with pytest.raises(ConfigError, match="optim.grad_reduce_dtype.*zero=3"):
        validate(load_config(None, ["optim.grad_reduce_dtype=bf16", "parallel.zero=3", "parallel.dp=2"]), 2)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_the_config_reaches_the_gradient_buffers(zero):
    from engine.model.decoder import LlamaModel
    from engine.train.grad_sync import build_grad_sync
    from parallel.collectives import CommLedger, Group

    cfg = validate(load_config(None, ["optim.grad_reduce_dtype=bf16", f"parallel.zero={zero}", "parallel.dp=2"]), 2)
    model = LlamaModel(cfg.model)
    grads, _ = build_grad_sync(cfg, [model], Group("dp", None, 2, 0, CommLedger()))  # no collective is issued
    assert grads.reduce_dtype == torch.bfloat16
