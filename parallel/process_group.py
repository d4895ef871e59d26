"""The life of this process's torch.distributed state: joining the ranks, side groups, leaving.

Every torch.distributed call that is not a collective lives here (the collectives are in
parallel/collectives.py), so the rest of the code never touches the backend directly.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_initialized()


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(device: torch.device, rank: int, world_size: int, address: str, port: int, timeout_s: float,
         store_prefix: Optional[str] = None) -> None:
    """Create the default process group: through the TCP store at address:port, or, with
    `store_prefix`, through a prefix of the existing store the elastic agent serves there."""
    timeout = timedelta(seconds=timeout_s)
    backend = backend_for(device)
    if store_prefix is not None:
        # The elastic agent keeps one store for all restarts: without a prefix per attempt, restarted
        # ranks would read the dead ranks' addresses (process-group keys repeat) and fail to connect.
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(store_prefix, store), rank=rank,
                                world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                world_size=world_size, timeout=timeout)


def new_cpu_group(timeout_s: Optional[float] = None):
    """A gloo group of every rank (None without torch.distributed): control traffic that runs beside
    the step, e.g. checkpoint coordination from a background thread, stays off the step's groups.
    `timeout_s`: how long its collectives wait (default: torch's, 30 minutes for gloo)."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s) if timeout_s else None)


def leave() -> None:
    """Destroy the default process group, if any (before exiting: gloo's threads would otherwise
    abort the interpreter at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()
