"""Starting ranks: locally through torch.distributed.run's elastic agent, or joining ranks that
torchrun, srun or mpirun already started.

`detect_launcher()` reads the environment of the innermost launcher: torchrun/elastic (RANK,
WORLD_SIZE, MASTER_ADDR/PORT), Open MPI (OMPI_COMM_WORLD_*; the rendezvous is agreed through
mpi4py, the optional 'mpi' extra, or derived from the job id on one node), then a Slurm job step
(SLURM_PROCID and SLURM_STEP_NUM_TASKS: an `srun` step, not the batch script itself). Ranks that
srun starts cannot talk before they meet, so they all derive the same address (the step's first
node) and port (a hash of job, step and restart) from the environment; MASTER_ADDR and
MASTER_PORT override both. `init_distributed()` turns that into a process group: gloo on CPU,
NCCL on GPU, its collectives waiting at most `resilience.collective_timeout_s`. `launch_local()`
starts `--nproc` ranks on this machine and restarts them all after a failure that a restart can fix
(engine/resilience/exit_codes.py): never after a config error, a diagnosed fault or refused storage.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from engine.config import ConfigError

# Below Linux's ephemeral range (32768-60999), so a port derived from a job id does not collide
# with the source port of some outgoing connection on the master node.
DERIVED_PORT_BASE, DERIVED_PORT_SPAN = 10000, 20000
RESTART_COUNT_ENV = "APOGEE_RESTART_COUNT"


class LaunchError(ConfigError):
    """The launcher's environment does not say how the ranks can meet (exit status 2, like a bad config)."""


@dataclass
class LaunchInfo:
    """Where this process sits in the job and how the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # 'elastic', 'mpi', 'slurm' or 'none'
    restart_count: int = 0


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def derived_port(*keys: str) -> int:
    """The same port on every rank for the same keys (job id, step, restart), without talking."""
    digest = hashlib.sha256("/".join(keys).encode()).digest()
    return DERIVED_PORT_BASE + int.from_bytes(digest[:4], "big") % DERIVED_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[003-010,12],cpu1' -> 'gpu003' (no scontrol needed)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first top-level comma ends the first host pattern
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    # Each bracket's first entry, e.g. 'rack[2-3]-n[07,9]' -> 'rack2-n07' (zero padding kept).
    return re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", nodelist[:end].strip())


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Entry `node_id` of Slurm's compressed task counts: '2(x3),1' is 2, 2, 2, 1."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else (counts[0] if counts else 1)


def _elastic(env: Mapping[str, str]) -> LaunchInfo:
    world = int(env["WORLD_SIZE"])
    # launch_local counts its restarts in APOGEE_RESTART_COUNT (each attempt is a fresh agent);
    # torchrun's own agent counts in TORCHELASTIC_RESTART_COUNT.
    restarts = max(int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), int(env.get(RESTART_COUNT_ENV, 0)))
    return LaunchInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                      int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", 29500)), "elastic", restarts)


def _slurm(env: Mapping[str, str]) -> LaunchInfo:
    world = int(env["SLURM_STEP_NUM_TASKS"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    # A single-node step meets on loopback: always reachable, whatever the host name resolves to.
    addr = "127.0.0.1" if env.get("SLURM_STEP_NUM_NODES", "1") == "1" else first_host(nodelist)
    port = derived_port("slurm", env.get("SLURM_JOB_ID", "0"), env.get("SLURM_STEP_ID", "0"), restarts)
    return LaunchInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                      tasks_on_node(tasks, int(env.get("SLURM_NODEID", 0))), env.get("MASTER_ADDR", addr),
                      int(env.get("MASTER_PORT", port)), "slurm", int(restarts))


def _mpi(env: Mapping[str, str]) -> LaunchInfo:
    rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
    local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    one_node = local_world == world
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    else:
        addr, port = _mpi_rendezvous(one_node)
        if addr is None:
            if not one_node:
                raise LaunchError(
                    f"mpirun started {world} ranks on several nodes, but mpi4py is not importable to agree on "
                    "a rendezvous: pip install 'apogee[mpi]', or export MASTER_ADDR and MASTER_PORT with mpirun -x")
            # One node, no mpi4py: loopback, and a port every rank derives from Open MPI's job id.
            addr, port = "127.0.0.1", derived_port("mpi", env.get("OMPI_MCA_ess_base_jobid", "0"))
        addr, port = env.get("MASTER_ADDR", addr), int(env.get("MASTER_PORT", port))
    return LaunchInfo(rank, world, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), local_world, addr, port, "mpi")


def _mpi_rendezvous(one_node: bool) -> tuple[Optional[str], int]:
    """Rank 0's address and a port free there, broadcast over MPI; (None, 0) without mpi4py."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):  # RuntimeError: mpi4py present but no loadable MPI library
        return None, 0
    comm = MPI.COMM_WORLD
    mine = ("127.0.0.1" if one_node else socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def detect_launcher(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """This process's rank and rendezvous, from whichever launcher started it ('none': alone).

    The innermost launcher wins: torchrun inside an srun step sets RANK; mpirun inside an sbatch
    script inherits the batch step's SLURM_PROCID=0, which must not make every rank rank 0.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = _elastic(env)
    elif "OMPI_COMM_WORLD_RANK" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        info = _mpi(env)
    elif "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        info = _slurm(env)  # a batch script has SLURM_PROCID and SLURM_NTASKS but no step
    else:
        return LaunchInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    if info.world_size == 1:
        return LaunchInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    return info


SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")
"""What a Slurm task's environment says about the GPUs it was given (IDs, or a count)."""


def check_gpus_visible(info: LaunchInfo, cuda_available: bool, env: Optional[Mapping[str, str]] = None) -> None:
    """A rank that Slurm gave GPUs refuses to train when PyTorch sees none (LaunchError, exit status 2).

    Without this the rank would fall back to CPU and gloo without a word: a job that asked for
    GPUs would train at a thousandth of the speed, or meet ranks that did find theirs.
    """
    env = os.environ if env is None else env
    if info.launcher != "slurm" or cuda_available:
        return
    given = {name: env[name] for name in SLURM_GPU_VARIABLES if env.get(name, "").strip() not in ("", "0")}
    if not given:
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    shown = ", ".join(f"{name}={value}" for name, value in given.items())
    visible = env.get("CUDA_VISIBLE_DEVICES")
    raise LaunchError(
        f"rank {info.rank}: Slurm gave this task GPUs ({shown}{f', CUDA_VISIBLE_DEVICES={visible}' if visible else ''}) "
        f"but PyTorch sees none (torch {torch.__version__}, {build}): refusing to train on CPU with gloo; install a "
        f"CUDA build of PyTorch or check the node's driver, or submit a CPU job (apogee submit --cpu)")


def init_distributed(info: LaunchInfo, timeout_s: float = 600.0) -> torch.device:
    """Join the ranks (gloo on CPU, NCCL on GPU; parallel/process_group.py); return this rank's device.

    `timeout_s` (resilience.collective_timeout_s) bounds the rendezvous and every collective of the
    default group: a rank left waiting for a dead peer fails after it instead of hanging."""
    from parallel import process_group

    check_gpus_visible(info, torch.cuda.is_available())
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.world_size > 1 and not process_group.is_initialized():
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        process_group.join(device, info.rank, info.world_size, info.master_addr, info.master_port, timeout_s,
                           store_prefix=f"apogee/attempt_{info.restart_count}" if agent_store else None)
    return device


def cpu_threads_per_rank(local_world_size: int) -> int:
    """Intra-op threads for one rank: the cores it may use, shared with the node's other ranks.

    A launcher that pinned this rank (mpirun binds each rank to a core by default) already gave it
    its share; otherwise the ranks of a node split the cores between them.
    """
    total = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if allowed < total:
        return max(1, allowed)
    return max(1, total // max(1, local_world_size))


def launch_local(nproc: int, entrypoint: Callable, args: tuple[Any, ...], max_restarts: int = 0,
                 run_id: Optional[str] = None, before_attempt: Optional[Callable[[int], None]] = None) -> int:
    """Run entrypoint(*args) on `nproc` local ranks under torch.distributed.run's elastic agent.

    Returns the exit status: 0, or the first failed rank's exit code (its own message is already
    on stderr). When a rank fails with a status a restart can fix (exit_codes.restart_helps), every
    rank is started again, up to `max_restarts` times; the entrypoint reads the restart count
    (LaunchInfo.restart_count) to know it is a restart. A config error (2), a diagnosed fault (17)
    or refused storage (20) ends the job at once: a restart would meet it again. `before_attempt`
    (the attempt's number) runs before each start, e.g. to replace a lost memory keeper.
    """
    from engine.resilience.exit_codes import describe, restart_helps

    for attempt in range(max_restarts + 1):
        if before_attempt is not None:
            before_attempt(attempt)
        status = _launch_once(nproc, entrypoint, args, attempt, run_id)
        if status == 0 or attempt == max_restarts:
            return status
        if not restart_helps(status):
            print(f"apogee: {describe(status)} (exit status {status}): a restart would meet it again, not restarting",
                  file=sys.stderr, flush=True)
            return status
        print(f"apogee: restarting all {nproc} ranks (restart {attempt + 1} of {max_restarts})", file=sys.stderr,
              flush=True)
    return status


def _launch_once(nproc: int, entrypoint: Callable, args: tuple[Any, ...], attempt: int, run_id: Optional[str]) -> int:
    """One attempt: start the ranks under a fresh elastic agent; its exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id or f"apogee-{os.getpid()}-{attempt}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        monitor_interval=0.5, start_method="spawn", local_addr="127.0.0.1",
    )
    # The agent logs every failure as a page of warnings and a traceback table; the failed rank
    # already printed its own error, so the summary below is all that is added.
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    previous = os.environ.get(RESTART_COUNT_ENV)
    os.environ[RESTART_COUNT_ENV] = str(attempt)  # the spawned ranks inherit it
    try:
        elastic_launch(config, entrypoint)(*args)
        return 0
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: report it the way a shell does, 128 + signal
            status, how = 128 - failure.exitcode, f"signal {-failure.exitcode}"
        else:
            status, how = failure.exitcode or 1, f"exit status {failure.exitcode}"
        print(f"apogee: rank {rank} of {nproc} failed ({how}); the other ranks were stopped", file=sys.stderr, flush=True)
        return status
    finally:
        agent_log.setLevel(level)
        if previous is None:
            os.environ.pop(RESTART_COUNT_ENV, None)
        else:
            os.environ[RESTART_COUNT_ENV] = previous
