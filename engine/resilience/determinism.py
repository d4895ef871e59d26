"""Deterministic kernels on CUDA, so that a replayed step can be compared with its original bit for bit.

SDC replay, audits and the replay that follows a NaN or a spike all compare a step computed twice
from the same state (engine/resilience/divergence.py). On CPU the kernels repeat exactly. On CUDA
several do not by default, and a genuine spike would then replay differently on every rank:

- cuBLAS picks split-K GEMMs that reduce through atomics unless its workspace is fixed:
  CUBLAS_WORKSPACE_CONFIG=:4096:8, read when CUDA creates the handle (set before the ranks start);
- ATen kernels that accumulate with atomics (index_add, scatter_add, embedding backward, ...) and
  the fused attention backward (flash, memory-efficient) switch to deterministic versions under
  torch.use_deterministic_algorithms(True); cuDNN attention is left out by PyTorch then. 'strict'
  raises where an op has no deterministic version; 'warn' lets it run (and attention's fused
  backward stays nondeterministic), and the replay's verdict then reads replay_nondeterministic;
- cuDNN: deterministic algorithms, no benchmarking (which may pick another kernel each run);
- NCCL chooses algorithm and protocol per message size, topology and tuner: they are pinned
  (NCCL_ALGO=Ring, NCCL_PROTO=Simple), read when a communicator is created, so a reduction adds in
  the same order every time. Values the user has set are kept.

Uninitialised memory is not filled (torch.utils.deterministic.fill_uninitialized_memory): nothing
in the step reads it, and filling every new buffer costs a memory pass. Costs: README, "Rehearse a
failure". `resilience.deterministic=off` leaves PyTorch's defaults.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

MODES = ("strict", "warn", "off")
CUBLAS_WORKSPACES = (":4096:8", ":16:8")  # the two values cuBLAS documents as deterministic
PINNED_ENVIRONMENT = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}


def replays_steps(res) -> bool:
    """Whether the run may compute a step twice and compare: replica checks, audits or spike judges
    (a NaN is always replayed, so this is off only with every check and judge disabled)."""
    return bool(res.check_interval or res.audit_interval or res.spike_factor > 0 or res.grad_spike_factor > 0)


def wanted(res, cuda: bool) -> bool:
    """Whether this run switches to deterministic kernels: on CUDA, replay possible, not turned off."""
    return cuda and res.deterministic != "off" and replays_steps(res)


def environment(res, cuda: bool, environ: Optional[Mapping[str, str]] = None) -> dict:
    """The variables the ranks need before CUDA and NCCL start ({} when `wanted` is not); a value
    already set in `environ` (default os.environ) is kept, except a CUBLAS_WORKSPACE_CONFIG that
    cuBLAS would not make deterministic."""
    if not wanted(res, cuda):
        return {}
    environ = os.environ if environ is None else environ
    chosen = {name: environ.get(name, value) for name, value in PINNED_ENVIRONMENT.items()}
    if chosen["CUBLAS_WORKSPACE_CONFIG"] not in CUBLAS_WORKSPACES:
        chosen["CUBLAS_WORKSPACE_CONFIG"] = PINNED_ENVIRONMENT["CUBLAS_WORKSPACE_CONFIG"]
    return chosen


def configure(res, device: torch.device) -> dict:
    """Switch this process's PyTorch to deterministic kernels when `wanted`; returns what was set
    (for the start-up line), {} otherwise. Call after `environment` reached os.environ."""
    if not wanted(res, device.type == "cuda"):
        return {}
    torch.use_deterministic_algorithms(True, warn_only=res.deterministic == "warn")
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    settings = {"torch.use_deterministic_algorithms": f"True, warn_only={res.deterministic == 'warn'}",
                "cudnn.deterministic": True, "cudnn.benchmark": False}
    settings.update({name: os.environ.get(name, "(unset)") for name in PINNED_ENVIRONMENT})
    return settings


def describe(settings: dict) -> str:
    """One line for the log: 'name=value, ...'."""
    return ", ".join(f"{name}={value}" for name, value in settings.items())
