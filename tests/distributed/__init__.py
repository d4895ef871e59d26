"""Multi-rank test harness: run a test body on N real gloo processes on this machine (parallel/spawn.py)."""
from parallel.spawn import DistributedError, run_distributed

__all__ = ["run_distributed", "DistributedError"]
