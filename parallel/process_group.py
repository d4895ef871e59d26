"""The life of this process's torch.distributed state: joining the ranks, side groups, leaving.

Every torch.distributed call that is not a collective lives here (the collectives are in
parallel/collectives.py), so the rest of the code never touches the backend directly.

Under NCCL, joining binds the rank to its GPU (`device_id`: the communicator is created then, on
that device, rather than at the first collective), and leaving after a failure aborts the
communicators (`ncclCommAbort`) instead of destroying them: destroying one that a peer left
mid-collective waits for that collective, which never completes. The flight recorder keeps the
last collectives of every group; `flight_recorder_environment` sends its dumps to a file prefix
(the run directory) and `dump_flight_recorder` writes one on demand (the hang watchdog does).
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist

FLIGHT_RECORDER_ENTRIES = 2000  # PyTorch's default ring size: the last ~1000 collectives, start and end


def is_initialized() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_initialized()


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def current_backend() -> str:
    """The default group's backend string ('gloo', 'nccl', ...), or 'none' outside torch.distributed."""
    return str(dist.get_backend()) if dist.is_initialized() else "none"


def init_options(device: torch.device, timeout_s: float) -> dict:
    """The keyword arguments of init_process_group for a rank computing on `device`.

    On CUDA, `device_id` binds the process group to the rank's GPU: NCCL creates its communicator
    at once on that device (an error surfaces at start-up, not at the first collective), and
    groups made later split from it instead of each bootstrapping through the store.
    """
    options = {"backend": backend_for(device), "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        options["device_id"] = device
    return options


def join(device: torch.device, rank: int, world_size: int, address: str, port: int, timeout_s: float,
         store_prefix: Optional[str] = None) -> None:
    """Create the default process group: through the TCP store at address:port, or, with
    `store_prefix`, through a prefix of the existing store the elastic agent serves there."""
    options = init_options(device, timeout_s)
    if store_prefix is not None:
        # The elastic agent keeps one store for all restarts: without a prefix per attempt, restarted
        # ranks would read the dead ranks' addresses (process-group keys repeat) and fail to connect.
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=options["timeout"])
        dist.init_process_group(store=dist.PrefixStore(store_prefix, store), rank=rank, world_size=world_size,
                                **options)
    else:
        dist.init_process_group(init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size, **options)


def new_cpu_group(timeout_s: Optional[float] = None):
    """A gloo group of every rank (None without torch.distributed): control traffic that runs beside
    the step, e.g. checkpoint coordination from a background thread, stays off the step's groups.
    `timeout_s`: how long its collectives wait (default: torch's, 30 minutes for gloo)."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s) if timeout_s else None)


def aborts(backend: str, failed: bool) -> bool:
    """Whether leaving aborts the communicators rather than destroying them: after a failure, when
    NCCL is among the backends ('nccl', 'cpu:gloo,cuda:nccl'). Gloo has no abort, and a clean end
    (or a diagnosed stop, where every rank leaves together) destroys them."""
    return failed and "nccl" in backend


def abort() -> bool:
    """Abort every communicator when the backend is NCCL (a failure, or a hang seen from another
    thread: an abort unblocks collectives in flight); returns whether it did."""
    if not (dist.is_initialized() and aborts(current_backend(), failed=True)):
        return False
    # Every group at once (one NCCL group call), so the aborts cannot wait on each other.
    dist.distributed_c10d._abort_process_group()
    return True


def leave(failed: bool = False) -> str:
    """Leave torch.distributed before exiting (gloo's threads would otherwise abort the interpreter
    at exit); returns how: 'abort' (after a failure under NCCL), 'destroy', or 'none' (not joined)."""
    if not dist.is_initialized():
        return "none"
    if failed and abort():
        return "abort"
    dist.destroy_process_group()
    return "destroy"


def flight_recorder_environment(prefix: str | Path, environ: Optional[Mapping[str, str]] = None) -> dict:
    """The variables that make PyTorch's flight recorder dump to `prefix`<rank> on a collective timeout.

    Set before the process group exists (the backends read them once). Names as PyTorch 2.13 reads
    them: the flight recorder takes TORCH_FR_* first and the older TORCH_NCCL_* names after, while
    ProcessGroupNCCL checks TORCH_NCCL_TRACE_BUFFER_SIZE (with TORCH_NCCL_ENABLE_MONITORING) before
    it dumps on a timeout, so both forms are set. The dump prefix is always `prefix` (this run's);
    the buffer size and switches keep values the user has set (in `environ`, default os.environ).
    """
    environ = os.environ if environ is None else environ
    kept = {
        "TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
    }
    chosen = {name: environ.get(name, value) for name, value in kept.items()}
    chosen.update(TORCH_FR_DUMP_TEMP_FILE=str(prefix), TORCH_NCCL_DEBUG_INFO_TEMP_FILE=str(prefix))
    return chosen


def dump_flight_recorder(rank: int) -> Optional[Path]:
    """Write the flight recorder's record of the last collectives to its dump file (`prefix`<rank>,
    as the backend would on a timeout); returns the path, or None when there is none to write."""
    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE") or os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    c10d = torch._C._distributed_c10d
    dump = getattr(c10d, "_dump_fr_trace", None) or getattr(c10d, "_dump_nccl_trace", None)
    if not prefix or dump is None:
        return None
    path = Path(f"{prefix}{rank}")
    path.write_bytes(dump(True, True, False))  # collectives, their Python stacks, finished ones too
    return path
