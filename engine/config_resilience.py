"""The `resilience` section of the run configuration: restarts, the hang watchdog, the step guard,
replay and audits, rehearsed faults.

A section of engine/config.py's ApogeeConfig, in a module of its own to keep that module to one
screenful of sections per concern; import it from engine.config like every other section.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ResilienceConfig:
    """Fault detection and recovery."""

    inject: list = field(default_factory=list)
    """Faults to rehearse, one string each: 'kill:rank=1:step=7', 'raise:rank=0:step=4',
    'hang:rank=0:step=5', 'bitflip:target=grad:rank=1:step=9:bit=30', 'garbage_batch:step=12',
    'replay_noise:step=12', 'slow:rank=1:step=5:factor=3', 'gemm_error:rank=1:step=12:rel=1e-3'."""
    max_restarts: int = 3
    """Times the launcher restarts all ranks after a failure before giving up."""
    hang_timeout_s: float = 300.0
    """Seconds without progress after which the watchdog dumps stacks and exits (0 disables it)."""
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in the rendezvous or in any collective (the training groups and the
    checkpoint group) before failing; above the time the slowest checkpoint publish takes."""
    check_interval: int = 10
    """Steps between cross-replica fingerprint checks of gradients and parameters (0 disables)."""
    audit_interval: int = 0
    """Steps between deterministic-replay audits of a whole step (0 disables)."""
    spike_factor: float = 1.5
    """A loss above spike_factor x the median of the last spike_window losses (and above spike_sigmas
    spreads over it) is a spike."""
    spike_sigmas: float = 6.0
    """A loss spike must also exceed the median by spike_sigmas x the losses' spread (1.4826 x their
    median absolute deviation), so a small, noisy fine-tuning loss is not called a spike (0: the ratio alone)."""
    grad_spike_factor: float = 20.0
    """A grad norm above grad_spike_factor x the median of the last spike_window norms is a spike."""
    spike_window: int = 20
    """Losses (and grad norms) the spike statistics are taken over; no spike check before that many."""
    straggler_factor: float = 1.5
    """A rank whose compute time on each of the last 5 steps is above straggler_factor x its peers'
    median is named in a 'straggler' event (0 disables the per-step comparison)."""
    abft_interval: int = 0
    """Steps between ABFT checksum checks of every linear layer's forward GEMM (0 disables; 1: every
    step, which a one-off GEMM error needs): a failed checksum names the rank and the layer."""
    max_rewinds: int = 3
    """Rewinds tolerated within rewind_window steps before the run stops with an error."""
    rewind_window: int = 100
    """Window (steps) over which rewinds are counted."""
    deterministic: str = "strict"
    """Kernels on CUDA, so that replays repeat bit for bit: 'strict' (torch.use_deterministic_algorithms,
    fixed cuBLAS workspace, NCCL algorithm and protocol pinned; an op without a deterministic kernel
    raises), 'warn' (such an op, and attention's fused backward, run as they are), 'off'. CPU: no effect."""
