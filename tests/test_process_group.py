"""Joining and leaving as NCCL needs it (parallel/process_group.py), tested on CPU: the options
init_process_group gets, abort vs destroy by backend, the flight recorder's environment and a real
dump from gloo ranks, and the environment the runner gives its ranks."""
import os
import pickle
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from engine.config import ApogeeConfig
from engine.job import runner
from parallel import process_group


def test_a_cuda_rank_binds_its_group_to_its_gpu_and_a_cpu_rank_does_not():
    assert process_group.init_options(torch.device("cuda", 3), 60) == {
        "backend": "nccl", "timeout": timedelta(seconds=60), "device_id": torch.device("cuda", 3)}
    assert process_group.init_options(torch.device("cpu"), 60) == {"backend": "gloo", "timeout": timedelta(seconds=60)}


def test_join_hands_the_device_id_to_init_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    process_group.join(torch.device("cuda", 1), 5, 8, "10.0.0.1", 29500, timeout_s=30)
    assert seen["device_id"] == torch.device("cuda", 1) and seen["backend"] == "nccl"
    assert (seen["rank"], seen["world_size"], seen["init_method"]) == (5, 8, "tcp://10.0.0.1:29500")


@pytest.mark.parametrize("backend, failed, aborts", [
    ("nccl", True, True), ("cpu:gloo,cuda:nccl", True, True), ("gloo", True, False), ("nccl", False, False),
    ("gloo", False, False)])
def test_after_a_failure_nccl_communicators_are_aborted_gloo_ones_destroyed(backend, failed, aborts):
    assert process_group.aborts(backend, failed) is aborts


def test_leave_aborts_under_nccl_after_a_failure_and_destroys_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(process_group, "current_backend", lambda: "nccl")
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    assert process_group.leave(failed=True) == "abort"
    assert process_group.leave(failed=False) == "destroy"
    assert calls == ["abort", "destroy"]


def test_the_flight_recorder_dumps_into_the_given_prefix_and_keeps_the_users_buffer_size(tmp_path):
    env = process_group.flight_recorder_environment(tmp_path / "flight-recorder-rank",
                                                    environ={"TORCH_FR_BUFFER_SIZE": "50000",
                                                             "TORCH_FR_DUMP_TEMP_FILE": "/elsewhere/x"})
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "flight-recorder-rank")
    assert env["TORCH_FR_BUFFER_SIZE"] == "50000" and env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == env["TORCH_NCCL_ENABLE_MONITORING"] == "1"


def test_the_runner_gives_its_ranks_the_flight_recorder_of_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("os.environ", {})
    runner.prepare_rank_environment(ApogeeConfig(), tmp_path)
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path.resolve() / "flight-recorder-rank")
    if not torch.cuda.is_available():  # the deterministic-replay settings are CUDA's only
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "NCCL_ALGO" not in os.environ


def _collectives_then_dump(rank: int, world_size: int, prefix: str) -> list:
    from parallel.collectives import CommLedger, all_reduce, world_group

    world = world_group(CommLedger(), torch.device("cpu"))
    for _ in range(3):
        all_reduce(torch.ones(4), world)
    path = process_group.dump_flight_recorder(rank)
    return [e["profiling_name"] for e in pickle.loads(path.read_bytes())["entries"]] if path else []


@pytest.mark.distributed
def test_gloo_ranks_dump_their_last_collectives_to_the_flight_recorder_file(tmp_path, monkeypatch):
    from tests.distributed import run_distributed

    prefix = tmp_path / "flight-recorder-rank"
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", str(prefix))  # inherited by the spawned ranks
    names = run_distributed(_collectives_then_dump, 2, str(prefix), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"flight-recorder-rank{rank}").exists()
        assert names[rank].count("gloo:all_reduce") >= 3
