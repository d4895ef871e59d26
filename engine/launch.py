"""Starting ranks: locally through torch.distributed.run's elastic agent, or joining ranks that
torchrun, srun or mpirun already started.

`detect_launcher()` reads the environment: torchrun/elastic (RANK, WORLD_SIZE, MASTER_ADDR),
Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST) or
Open MPI (OMPI_COMM_WORLD_RANK/SIZE, with the rendezvous address agreed through mpi4py when it is
installed). `init_distributed()` turns that into a process group: gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class LaunchInfo:
    """Where this process sits in the job and how the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # 'elastic', 'slurm', 'mpi' or 'none'
    restart_count: int = 0


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:  # expand 'node[01-04]' the way Slurm does
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def _job_port(default_seed: str) -> int:
    # Ranks started by srun/mpirun cannot exchange a random port before meeting, so all derive
    # the same one from the job id; MASTER_PORT overrides.
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    return 20000 + int.from_bytes(default_seed.encode()[-4:].rjust(4, b"\0"), "big") % 20000


def detect_launcher() -> LaunchInfo:
    """This process's rank and rendezvous, from whichever launcher started it ('none': alone)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / elastic agent
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), env.get("MASTER_ADDR", "127.0.0.1"),
                          int(env.get("MASTER_PORT", 29500)), "elastic", int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]),
                          env.get("MASTER_ADDR", _slurm_master()), _job_port(env.get("SLURM_JOB_ID", "0")),
                          "slurm", int(env.get("SLURM_RESTART_COUNT", 0)))
    if "OMPI_COMM_WORLD_RANK" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        addr, port = _mpi_rendezvous()
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)),
                          addr, port, "mpi")
    return LaunchInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")


def _mpi_rendezvous() -> tuple[str, int]:
    """Rank 0's address and a free port, broadcast over MPI (mpi4py, the optional 'mpi' extra)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return os.environ.get("MASTER_ADDR", "127.0.0.1"), _job_port(os.environ.get("OMPI_MCA_ess_base_jobid", "0"))
    comm = MPI.COMM_WORLD
    info = (socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None
    host, port = comm.bcast(info, root=0)
    return os.environ.get("MASTER_ADDR", host), port


def init_distributed(info: LaunchInfo, timeout_s: float = 600.0) -> torch.device:
    """Create the default process group (gloo on CPU, NCCL on GPU); return this rank's device."""
    from datetime import timedelta

    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                                rank=info.rank, world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    return device


def cpu_threads_per_rank(local_world_size: int) -> int:
    """Cores / local ranks (at least 1): ranks on one CPU node share its cores without oversubscription."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def launch_local(nproc: int, entrypoint: Callable, args: tuple[Any, ...], max_restarts: int = 0,
                 run_id: Optional[str] = None) -> dict:
    """Run entrypoint(*args) on `nproc` local ranks under torch.distributed.run's elastic agent.

    The agent restarts every rank (up to `max_restarts` times) when any of them fails; the
    entrypoint reads TORCHELASTIC_RESTART_COUNT to know it is a restart.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id or f"apogee-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=max_restarts,
        monitor_interval=0.5, start_method="spawn", local_addr="127.0.0.1",
    )
    return elastic_launch(config, entrypoint)(*args)
