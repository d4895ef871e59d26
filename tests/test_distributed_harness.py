"""The multi-rank harness itself: results come back by rank; failures and hangs are named."""
import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedError, run_distributed


def _all_reduce_rank(rank, world_size, scale):
    t = torch.tensor([float(rank) * scale])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


def _hang_on_rank_zero(rank, world_size):
    if rank == 0:
        import time
        time.sleep(60)
    return rank


def test_all_reduce_across_three_gloo_ranks():
    assert run_distributed(_all_reduce_rank, 3, 2.0, timeout=60) == [6.0, 6.0, 6.0]


def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(DistributedError, match=r"(?s)rank 1 ---.*boom on rank one"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def test_hanging_rank_is_reported_as_still_running():
    with pytest.raises(DistributedError, match=r"still running when stopped: ranks \[0"):
        run_distributed(_hang_on_rank_zero, 2, timeout=8)
