"""FLOPs and MFU accounting, and the per-step record: console line, metrics.jsonl, TensorBoard.

FLOPs follow Megatron's counter (megatron/training/training.py, num_floating_point_operations):
every GEMM costs 2*m*n*k forward and twice that backward (x3 in all), grouped-query attention
shrinks the K/V projections, SwiGLU has three MLP matmuls, the logits layer is counted, and
causal attention (QK^T and AV) is counted at half cost. Recomputation is not counted (model FLOPs).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.config import ModelConfig
from engine.state.storage import storage_cause, storage_error
from engine.run_files import open_run_file

# Dense BF16 peaks (TFLOP/s) per device, from vendor data sheets (not the 2:4-sparse figures).
GPU_BF16_PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "A100": 312.0}

# Megatron's TensorBoard names for the keys of a step record (users' dashboards expect them).
TENSORBOARD_NAMES = {
    "loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "batch_size": "batch-size",
    "iteration_time": "iteration-time",
    "throughput": "throughput",
    "params_norm": "params-norm",
    "loss_scale": "loss-scale",
    "mem_allocated_bytes": "mem-allocated-bytes",
    "num_zeros": "num-zeros",
    "load_balancing_loss": "load_balancing_loss",
    "val_loss": "lm loss validation",
    "val_ppl": "lm loss validation ppl",
    "val_reward_accuracy": "reward accuracy validation",
    "val_reward_mean": "reward mean validation",
    "val_accuracy": "accuracy validation",
    "compute_s": "compute-time",
    "wait_s": "wait-time",
    "straggler_slowdown": "straggler-slowdown",
}


def flops_per_token_breakdown(cfg: ModelConfig) -> dict:
    """Training FLOPs per token by part (forward + backward = 3 x forward), Megatron's counter (the
    logits over the padded vocabulary, the rows the output GEMM computes, as Megatron counts them)."""
    h, L, s, V = cfg.hidden_size, cfg.num_layers, cfg.seq_length, cfg.padded_vocab_size
    q = cfg.head_dim * cfg.num_heads
    kv = cfg.head_dim * cfg.num_kv_heads
    ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    routed = cfg.moe_topk if cfg.num_experts else 1
    gated = 3  # SwiGLU: gate, up and down projections
    return {
        # Q and O are h x q, K and V are h x kv: 2 flops per MAC, x3 for forward + backward.
        "attention_projections": 6 * L * h * (2 * q + 2 * kv),
        # QK^T and AV: 2 * (2 * s * q) per token forward, halved by the causal mask, x3.
        "attention_core": 6 * L * s * q,
        "mlp": 6 * L * h * gated * (ffn if not cfg.num_experts else ffn * routed),
        "logits": 6 * h * V,
    }


def flops_per_step(cfg: ModelConfig, global_batch_size: int) -> float:
    """Model FLOPs of one optimizer step over `global_batch_size` samples of seq_length tokens."""
    tokens = global_batch_size * cfg.seq_length
    return float(tokens * sum(flops_per_token_breakdown(cfg).values()))


def gpu_peak_flops(device_name: str) -> Optional[float]:
    """Dense BF16 peak FLOP/s of one GPU, recognised from its name; None when unknown."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if key in device_name.upper():
            return tflops * 1e12
    return None


def measure_cpu_bf16_peak(seconds: float = 1.0, size: int = 2048) -> float:
    """Measured bf16 matmul FLOP/s of this machine with every core (the CPU 'peak' for MFU).

    A large square matmul is the best case the hardware reaches; MFU against it says how much of
    the machine's real matrix throughput training uses.
    """
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(2):  # warm up kernels and caches
        torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 3:
            break
    return 2.0 * size**3 * count / elapsed


@dataclass
class PeakFlops:
    """The FLOP/s that MFU divides by, and where the figure came from."""

    flops_per_s: float
    source: str


def machine_peak(device: torch.device, world_size: int, ranks_per_node: int) -> PeakFlops:
    """Peak FLOP/s of all devices in the job: the GPU table times the world, or the measured CPU
    peak times the node count (on CPU all ranks of a node share one set of cores)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        per_device = gpu_peak_flops(name)
        if per_device is not None:
            return PeakFlops(per_device * world_size, f"{name}: {per_device / 1e12:.0f} TFLOP/s bf16 dense x {world_size}")
    nodes = max(1, world_size // max(1, ranks_per_node))
    measured = measure_cpu_bf16_peak()
    return PeakFlops(measured * nodes, f"measured CPU bf16 matmul peak {measured / 1e9:.1f} GFLOP/s x {nodes} node(s)")


def _ends_torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (its writer died mid-line)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return False
            f.seek(size - 1)
            return f.read(1) != b"\n"
    except OSError:
        return False


class MetricsWriter:
    """Writes one record per step: a console line, a metrics.jsonl object and TensorBoard scalars.

    Only the rank that logs (the last pipeline stage's first rank, which sees the loss) creates one.
    Every record carries `attempt`: which attempt at the run's steps wrote it (1 for the first
    start, one more for every later start, restart, resume and rewind), so a step logged twice is
    never ambiguous: the row of the highest attempt is the one the run kept.
    """

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool = True, attempt: int = 1):
        self.total_steps, self.attempt = total_steps, attempt
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = os.fdopen(open_run_file(self.path), "a")  # never through a planted symlink
        if _ends_torn(self.path):  # a line torn by a crash: the next record starts on its own line
            self._file.write("\n")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is an install requirement; tolerate its absence
                print("apogee: tensorboard not importable, TensorBoard scalars disabled")

    def write(self, record: dict, samples: int, console: bool = True) -> None:
        """Record one step; `samples` is the number of samples consumed so far (the 'vs samples' axis).

        A write the storage refuses raises StorageError (engine/state/storage.py)."""
        record = {**record, "attempt": self.attempt}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            cause = storage_cause(err)
            if cause is None:
                raise
            raise storage_error(cause, "writing metrics.jsonl", self.path) from None
        if self._tb is not None:
            step = record["step"]
            for key, name in TENSORBOARD_NAMES.items():
                if record.get(key) is not None:
                    self._tb.add_scalar(name, record[key], step)
                    self._tb.add_scalar(f"{name} vs samples", record[key], samples)
            for key, name in (("compute_s_by_rank", "compute-time"), ("wait_s_by_rank", "wait-time")):
                for rank, value in enumerate(record.get(key) or []):  # one curve per rank: who is slow
                    self._tb.add_scalar(f"{name} rank {rank}", value, step)
        if console:
            print(format_step_line(record, self.total_steps), flush=True)
        if "val_time" in record:  # one line per validation pass, whatever the log interval
            print(format_validation_line(record), flush=True)

    def close(self) -> None:
        """Flush and close the files."""
        try:
            self._file.close()
        except OSError:  # a flush the storage refused was already reported by write()
            pass
        if self._tb is not None:
            self._tb.close()


def format_step_line(record: dict, total_steps: int) -> str:
    """One console line per step: step, loss, lr, grad norm, tokens/s, MFU, step time."""
    return (f"step {record['step']:>6}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
            f"MFU {100 * record['mfu']:.1f}% | {record['iteration_time'] * 1000:.0f} ms")


def format_validation_line(record: dict) -> str:
    """One console line per validation pass: step, every val_* metric, the pass's time."""
    values = " | ".join(f"{key[4:].replace('_', ' ')} {value:.4f}" for key, value in record.items()
                        if key.startswith("val_") and key != "val_time" and value is not None)
    return f"validation at step {record['step']:>6} | {values} | {record['val_time'] * 1000:.0f} ms"
