"""GradBuffer: fp32 accumulation equals autograd; buckets reduce once per step, during the last backward."""
import pytest
import torch

from engine.config import ModelConfig, OptimConfig
from engine.model.decoder import LlamaModel, init_parameters, lm_loss
from engine.train.optim import MasterWeightOptimizer
from parallel.collectives import CommLedger, Group
from parallel.data_parallel import GradBuffer

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                   vocab_size=64, seq_length=16)
MICROBATCHES, STEPS, TOKENS_PER_STEP = 3, 3, 3 * 2 * 16
SMALL_BUCKET_BYTES = 16 * 1024  # several buckets for the tiny model


def _model():
    model = LlamaModel(TINY)
    init_parameters(model, 0)
    return model


def _tokens(step, microbatch, rank=0):
    gen = torch.Generator().manual_seed(1000 * step + 10 * microbatch + rank)
    return torch.randint(0, TINY.vocab_size, (2, TINY.seq_length + 1), generator=gen)


def _backward(model, tokens, scale=TOKENS_PER_STEP):
    loss, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    (loss / scale).backward()


def _single_group():
    return Group("dp", None, 1, 0, CommLedger())


def test_accumulation_over_microbatches_and_steps_equals_plain_autograd():
    buffered, plain = _model(), _model()
    grads = GradBuffer(buffered.named_parameters(), _single_group())
    cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    opt_buffered = MasterWeightOptimizer(buffered.named_parameters(), cfg)
    opt_plain = MasterWeightOptimizer(plain.named_parameters(), cfg)
    for step in range(STEPS):
        grads.start_step()
        for p in plain.parameters():
            p.grad = None
        for j in range(MICROBATCHES):
            grads.is_last_microbatch = j == MICROBATCHES - 1
            _backward(buffered, _tokens(step, j))
            _backward(plain, _tokens(step, j))
        grads.finish()
        for (name, p), q in zip(buffered.named_parameters(), plain.parameters()):
            assert p.grad is None, name  # the gradient lives in main_grad only
            torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-6, atol=1e-9, msg=lambda m: f"step {step} {name}: {m}")
        assert opt_buffered.step(1e-2) == pytest.approx(opt_plain.step(1e-2), rel=1e-6)
    for p, q in zip(buffered.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_buckets_tile_the_buffer_in_backward_order():
    model = _model()
    grads = GradBuffer(model.named_parameters(), _single_group(), bucket_bytes=SMALL_BUCKET_BYTES)
    assert grads.params[0] is model.lm_head.weight and grads.params[-1] is model.embed_tokens.weight
    assert len(grads.buckets) > 2
    offset = 0
    for bucket in grads.buckets:
        assert bucket.data.data_ptr() == grads.data.data_ptr() + offset * 4
        for p in bucket.params:  # every main_grad is a view inside its bucket, in order
            assert p.main_grad.data_ptr() == grads.data.data_ptr() + offset * 4
            offset += p.numel()
        assert bucket.data.numel() * 4 >= SMALL_BUCKET_BYTES or bucket is grads.buckets[-1]
    assert offset == grads.data.numel() and grads.num_bytes == offset * 4


def test_tied_embedding_gets_one_slot():
    model = LlamaModel(ModelConfig(**{**TINY.__dict__, "tie_embeddings": True}))
    grads = GradBuffer(model.named_parameters(), _single_group())
    assert grads.data.numel() == model.num_parameters()


# ---------------------------------------------------------------------------------------------
# Two ranks


def _two_rank_dp(rank, world_size):
    """DP=2 over 3 microbatches x 2 steps; returns observations, asserts gradient values here."""
    dp = Group("dp", torch.distributed.group.WORLD, world_size, rank, CommLedger())
    model, reference = _model(), _model()
    grads = GradBuffer(model.named_parameters(), dp, bucket_bytes=SMALL_BUCKET_BYTES)
    launched = []  # per step: buckets on the wire after each gradient of the last backward
    # Registered after GradBuffer's hooks, so each runs right after that gradient was added.
    def count_launched(_param):
        if grads.is_last_microbatch:
            launched[-1].append(sum(b.handle is not None for b in grads.buckets))

    for p in grads.params:
        p.register_post_accumulate_grad_hook(count_launched)
    observed = {"buckets": len(grads.buckets), "calls_before_last": [], "calls": [], "bytes": [],
                "launched": launched}
    for step in range(2):
        dp.ledger.reset()
        if step == 0:
            grads.start_step()
        else:  # zeroing by another route must not change how reductions are issued
            grads.data.zero_()
        for p in reference.parameters():
            p.grad = None
        launched.append([])
        for j in range(MICROBATCHES):
            grads.is_last_microbatch = j == MICROBATCHES - 1
            _backward(model, _tokens(step, j, rank), scale=TOKENS_PER_STEP * world_size)
            if j < MICROBATCHES - 1:
                observed["calls_before_last"].append(dp.ledger.calls.get(("dp", "all_reduce"), 0))
            for r in range(world_size):  # the reference sees every rank's data
                _backward(reference, _tokens(step, j, r), scale=TOKENS_PER_STEP * world_size)
        grads.finish()
        observed["calls"].append(dp.ledger.calls[("dp", "all_reduce")])
        observed["bytes"].append(dp.ledger.bytes[("dp", "all_reduce")])
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    observed["num_bytes"] = grads.num_bytes
    observed["late_gradient_error"] = _second_backward_error(dp)
    return observed


def _second_backward_error(dp):
    """The error message of a second backward into already-launched buckets ('' if none)."""
    model = _model()
    grads = GradBuffer(model.named_parameters(), dp)
    tokens = _tokens(0, 0, dp.rank)
    loss, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward(retain_graph=True)
    try:
        loss.backward()
        message = ""
    except RuntimeError as error:
        message = str(error)
    grads.finish()
    return message


@pytest.fixture(scope="module")
def two_rank_dp():
    from tests.distributed import run_distributed

    return run_distributed(_two_rank_dp, 2, timeout=120)


def test_dp2_gradient_is_the_global_mean_gradient(two_rank_dp):
    # _two_rank_dp asserts main_grad == autograd over both ranks' data after every step.
    assert len(two_rank_dp) == 2


def test_dp2_reduces_each_bucket_once_per_step_not_per_microbatch(two_rank_dp):
    for observed in two_rank_dp:
        assert observed["calls_before_last"] == [0, 0, 0, 0]  # nothing moves before the last microbatch
        assert observed["calls"] == [observed["buckets"]] * 2
        assert observed["bytes"] == [observed["num_bytes"]] * 2


def test_dp2_buckets_are_reduced_while_backward_is_still_running(two_rank_dp):
    for observed in two_rank_dp:
        buckets = observed["buckets"]
        for launched in observed["launched"]:
            # Buckets go out one by one as backward completes them: the count rises in steps of
            # one, and all but the embedding's bucket are on the wire before its gradient exists.
            assert all(later - earlier in (0, 1) for earlier, later in zip(launched, launched[1:]))
            assert launched[0] < buckets - 1 and launched[-2] == buckets - 1 and launched[-1] == buckets


def test_a_gradient_after_its_bucket_was_launched_is_an_error(two_rank_dp):
    for observed in two_rank_dp:
        assert "arrived after its bucket's reduction was launched" in observed["late_gradient_error"]
