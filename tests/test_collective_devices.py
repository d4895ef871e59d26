"""Every tensor handed to a collective is on the group's device (NCCL's rule), checked on CPU.

The check itself (parallel/collectives.py `check_devices`): a group declared on another device
than its tensor refuses it on every backend, naming the call, the group and both devices. Then a
dp2 and a tp2 step of the parity model with the step guard (replica checks, an audit, a masked
batch's token count), the SIGUSR1 stop agreement and the stop itself run under
tests/host_tensors.py, which refuses any tensor that would be a host tensor on a GPU machine: no
flag, scalar or buffer of the step reaches a collective from the host.
"""
import pytest
import torch
import torch.distributed as dist

from parallel.collectives import (P2P, SEND, CommLedger, DeviceMismatch, Group, all_gather, all_reduce,
                                  all_reduce_values, all_to_all, batch_isend_irecv, broadcast, reduce_scatter)

META = torch.device("meta")


def group_on(device, size: int = 2) -> Group:
    """A group of `size` that never reaches a backend (the check runs before any call)."""
    return Group("dp", None, size, 0, CommLedger(), torch.device(device))


CALLS = {
    "all_reduce": lambda t, g: all_reduce(t, g),
    "reduce_scatter": lambda t, g: reduce_scatter(t[:1], t, g),
    "all_gather": lambda t, g: all_gather(torch.empty(2, device=t.device), t[:1], g),
    "broadcast": lambda t, g: broadcast(t, 0, g, 0),
    "batch_isend_irecv": lambda t, g: batch_isend_irecv([P2P(SEND, t, 1)], g),
    "all_to_all": lambda t, g: all_to_all(t, [1, 1], [1, 1], g),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_cpu_tensor_in_a_group_on_another_device_is_refused_naming_call_group_and_devices(call):
    with pytest.raises(DeviceMismatch) as err:
        CALLS[call](torch.ones(2), group_on(META))
    assert f"{call} on group 'dp'" in str(err.value)
    assert "a tensor on cpu" in str(err.value) and "live on meta" in str(err.value)


def test_a_tensor_elsewhere_is_refused_by_a_cpu_group_too_and_a_group_of_one_checks_as_well():
    with pytest.raises(DeviceMismatch, match="a tensor on meta, but the group's tensors live on cpu"):
        all_reduce(torch.ones(2, device=META), group_on("cpu"))
    with pytest.raises(DeviceMismatch):  # single-GPU runs catch it too
        all_reduce(torch.ones(2), group_on(META, size=1))
    flag = torch.ones(2)
    assert all_reduce(flag, group_on("cpu", size=1)) is None and flag.tolist() == [1.0, 1.0]


def test_a_group_without_a_device_checks_nothing_and_flags_are_made_on_the_groups_device():
    assert all_reduce(torch.ones(1), Group("dp", None, 1, 0, CommLedger())) is None
    assert all_reduce_values([3, 0], group_on("cpu", size=1)) == [3, 0]


# --- a dp2 and a tp2 step as a GPU machine would see them -------------------------------------------------

LAYOUTS = {"dp2": ["parallel.dp=2"], "dp2-zero1": ["parallel.dp=2", "parallel.zero=1"],
           "tp2-sp": ["parallel.tp=2", "parallel.dp=1", "parallel.sequence_parallel=true"]}
GUARDED = ["resilience.check_interval=1", "resilience.audit_interval=2"]


def _steps_under_host_tensors(rank: int, world_size: int) -> dict:
    from engine.resilience.guard import StepGuard
    from engine.resilience.preemption import Preempted, StopRequest
    from engine.train.loop import stop_here
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext
    from tests.host_tensors import HostTensors, strict_collectives
    from tests.parity import FakeData, parity_config

    host = HostTensors()
    device = torch.device("cpu")
    report = {}
    with host, strict_collectives(host, device):
        stop = StopRequest()
        for name, overrides in LAYOUTS.items():
            cfg = parity_config([*overrides, *GUARDED], world_size, steps=3)
            trainer = Trainer(cfg, ParallelContext.create(cfg.parallel, device=device),
                              FakeData.for_config(cfg, masked=True))  # masked: the token count is reduced
            guard = trainer.guard = StepGuard(cfg.resilience, trainer, trainer.world)
            calls_before = sum(trainer.ledger.calls.values())
            for step in range(3):
                result = trainer.train_step(step)
                guard.after_step(step, result.loss, result.grad_norm, trainer.last_local_loss)
                stop.requested = step == 2 and rank == 1  # the signal reaches one rank
                agreed = stop.agreed(trainer.world)
            try:
                stop_here(trainer, None, 3, saved=True)
            except Preempted:
                report[name] = {"loss": result.loss, "agreed": agreed,
                                "collectives": sum(trainer.ledger.calls.values()) - calls_before}
        # The checker has teeth: yesterday's flag, made on the host, is refused.
        try:
            flag = torch.tensor([1], dtype=torch.int64)
            all_reduce(flag, trainer.world, op=dist.ReduceOp.MAX)
            report["host flag"] = "accepted"
        except DeviceMismatch as err:
            report["host flag"] = str(err)
    return report


@pytest.mark.distributed
def test_steps_guard_and_stop_hand_no_host_tensor_to_any_collective():
    from tests.distributed import run_distributed

    reports = run_distributed(_steps_under_host_tensors, 2, timeout=240)
    for report in reports:
        assert "host tensor (made without device=)" in report.pop("host flag")
        assert set(report) == set(LAYOUTS)
        for name, run in report.items():
            assert run["agreed"] is True, name  # rank 1's signal reached both ranks
            assert run["collectives"] > 0 and run["loss"] == run["loss"], name
