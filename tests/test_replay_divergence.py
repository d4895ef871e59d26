"""Attribution by first divergence (engine/resilience/divergence.py) and the deterministic-kernel
settings (engine/resilience/determinism.py), in one process; the multi-rank rehearsals are in
tests/test_resilience_sdc.py."""
import os

import pytest
import torch

from engine.config import ResilienceConfig
from engine.resilience import determinism
from engine.resilience.divergence import (DIVERGED_LOCAL, DIVERGED_RECEIVED, LOCAL, RECEIVED, SAME, StepTrace,
                                          first_divergence, judge)
from engine.resilience.faults import parse_fault
from parallel.collectives import CommLedger, Group


def trace(steps, noise: bool = False):
    """A StepTrace fed ('local'|'received', tensor) pairs through the observer hooks."""
    t = StepTrace(active=True, noise=noise)
    group = Group("tp", None, 2, 0, CommLedger())
    for kind, tensor in steps:
        (t.local if kind == "local" else t.received)(group, "all_reduce", tensor.clone())
    return t.freeze()


def test_the_first_differing_entry_and_its_kind_say_who_computed_differently():
    a, b, c = torch.ones(4), torch.full((4,), 2.0), torch.full((4,), 3.0)
    original = trace([("local", a), ("received", b), ("local", c)])
    assert first_divergence(trace([("local", a), ("received", b), ("local", c)]), original) is None
    own = first_divergence(trace([("local", a + 1), ("received", b + 1), ("local", c)]), original)
    assert (own.index, own.kind, own.code) == (0, LOCAL, DIVERGED_LOCAL)
    assert own.label == "its input to all_reduce on tp"
    victim = first_divergence(trace([("local", a), ("received", b + 1), ("local", c + 1)]), original)
    assert (victim.index, victim.kind, victim.code) == (1, RECEIVED, DIVERGED_RECEIVED)
    assert victim.label == "the result of all_reduce on tp"
    # a replay that records more (parameters at the steps it compares) is judged on the common prefix
    assert first_divergence(trace([("local", a), ("received", b), ("local", c), ("local", a)]), original) is None


def test_one_rank_diverging_in_its_own_result_is_named_several_mean_nondeterministic_kernels():
    sdc_on_tp_rank_1 = judge([(DIVERGED_RECEIVED, 3), (DIVERGED_LOCAL, 2)])  # every rank differs
    assert sdc_on_tp_rank_1.faulty == [1] and sdc_on_tp_rank_1.diverged == [0, 1]
    assert not sdc_on_tp_rank_1.nondeterministic
    noisy = judge([(DIVERGED_LOCAL, 0), (DIVERGED_LOCAL, 0), (DIVERGED_RECEIVED, 1)])
    assert noisy.nondeterministic and noisy.faulty == [] and noisy.origins == [0, 1]
    in_transit = judge([(SAME, -1), (DIVERGED_RECEIVED, 5)])  # nobody's own result changed
    assert in_transit.faulty == [1] and not in_transit.nondeterministic
    assert not judge([(SAME, -1), (SAME, -1)])


def test_replay_noise_changes_only_the_first_local_result_by_one_ulp():
    first, later = torch.tensor([1.5, 2.0]), torch.tensor([3.0])
    clean = StepTrace(active=True)
    noisy = StepTrace(active=True, noise=True)
    group = Group("dp", None, 2, 0, CommLedger())
    kept = []
    for t in (clean, noisy):
        x, y = first.clone(), later.clone()
        t.local(group, "all_reduce", x)
        t.local(group, "all_reduce", y)
        kept.append((x, y))
    (x0, y0), (x1, y1) = kept
    assert x1[0].item() == torch.tensor(1.5).nextafter(torch.tensor(2.0)).item() and torch.equal(x1[1:], x0[1:])
    assert torch.equal(y1, y0)  # only the first local result
    divergence = first_divergence(noisy.freeze(), clean.freeze())
    assert (divergence.index, divergence.kind) == (0, LOCAL)


def test_an_inactive_trace_records_nothing_and_named_tensors_keep_their_label():
    t = StepTrace()
    group = Group("dp", None, 2, 0, CommLedger())
    t.local(group, "all_reduce", torch.ones(1))
    assert len(t.freeze()) == 0
    t.active = True
    grad = torch.ones(3)
    t.name(grad, "local gradient (bucket 2)")
    t.local(group, "all_reduce", grad)
    assert t.freeze().label(0) == "local gradient (bucket 2)"


def test_replay_noise_is_a_fault_form_that_takes_a_step_only():
    fault = parse_fault("replay_noise:step=7", 0, world_size=2)
    assert (fault.kind, fault.step, fault.rank) == ("replay_noise", 7, None)
    with pytest.raises(Exception, match="replay_noise takes step, not 'rank'"):
        parse_fault("replay_noise:step=7:rank=0", 0)


def test_deterministic_kernels_are_asked_for_on_cuda_only_and_keep_valid_user_settings():
    res = ResilienceConfig()
    assert determinism.environment(res, cuda=False, environ={}) == {}
    assert determinism.environment(res, cuda=True, environ={}) == {
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}
    mine = determinism.environment(res, cuda=True, environ={"NCCL_ALGO": "Tree", "CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    assert mine["NCCL_ALGO"] == "Tree" and mine["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert determinism.environment(ResilienceConfig(deterministic="off"), cuda=True, environ={}) == {}
    quiet = ResilienceConfig(check_interval=0, audit_interval=0, spike_factor=0, grad_spike_factor=0)
    assert not determinism.wanted(quiet, cuda=True)
    assert determinism.configure(res, torch.device("cpu")) == {}  # CPU kernels repeat already


@pytest.mark.parametrize("mode, warn_only", [("strict", False), ("warn", True)])
def test_configure_switches_pytorch_to_deterministic_algorithms(mode, warn_only, monkeypatch):
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    monkeypatch.setattr(os, "environ", {**os.environ, **determinism.PINNED_ENVIRONMENT})
    try:
        settings = determinism.configure(ResilienceConfig(deterministic=mode), torch.device("cuda", 0))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert settings["NCCL_ALGO"] == "Ring" and settings["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert "warn_only=" + str(warn_only) in determinism.describe(settings)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3], saved[4]


def test_a_stashed_trace_reads_back_as_the_frozen_one_in_one_batch():
    """Step traces stay on the device (`stash`) until a check step reads them all at once
    (`read_pending`): the same values, kinds and labels as reading each at its own step."""
    from engine.resilience.divergence import PendingTrace, StepTrace, read_pending

    traces, frozen = [], []
    for step in range(3):
        trace = StepTrace(active=True)
        trace.add_local("local loss", torch.tensor([1.5 + step]))
        trace.add_local_value("parameters", torch.tensor(7 * step, dtype=torch.int64))
        trace.add_local_value("expert parameters", 11)
        traces.append(trace.stash())
        frozen.append(trace.freeze())
    assert all(isinstance(t, PendingTrace) for t in traces)
    read = read_pending([traces[0], frozen[1], traces[2]])
    for got, want in zip(read, frozen):
        assert list(got.values) == list(want.values) and got.kinds == want.kinds and got.labels == want.labels
    assert read[1] is frozen[1]
