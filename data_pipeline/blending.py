"""Weighted mixtures of datasets, and phase schedules that change the mixture during a run.

A schedule is a list of phases (start_step, weights). Phase k covers optimizer-step batches
[start_k, start_{k+1}); the last phase runs to the end. Within a phase, the blended stream is
interleaved greedily with that phase's weights (megatron-core's build_blending_indices: each
position goes to the dataset furthest behind its share). Each dataset's sample cursor carries
on across phases, so no sample is replayed because the mix changed.

With a single phase the stream is exactly megatron-core's BlendedDataset index over the same
weights, and each dataset is sized as Megatron sizes it: ceil(ceil(total * weight) * 1.005).
One deliberate difference: a dataset of weight 0 is never drawn (Megatron's greedy draws it
once, at position 1, through its max(position, 1) tie).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from data_pipeline import DataError
from data_pipeline.gpt_dataset import _helpers  # one place explains a missing build

MEGATRON_SURPLUS = 0.005  # megatron-core's mid_level_dataset_surplus


@dataclass(frozen=True)
class Phase:
    """From batch `start_step` on, draw datasets in proportion to `weights` (normalized)."""

    start_step: int
    weights: tuple


def normalize(weights, field: str) -> tuple:
    """Weights divided by their sum (float64, as Megatron does); DataError names `field`."""
    try:
        values = np.array([float(w) for w in weights], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{field}={weights!r}: expected a list of numbers") from None
    if len(values) == 0 or np.any(values < 0) or not np.isfinite(values).all() or values.sum() <= 0:
        raise DataError(f"{field}={list(weights)!r}: weights must be finite, >= 0, with a positive sum")
    return tuple((values / values.sum()).tolist())


def parse_schedule(num_datasets: int, weights=None, phases=None) -> list:
    """Validated phases, the first starting at 0. `weights` (default: equal) applies until the
    first phase; `phases` is a list of {"start_step": int, "weights": [...]} (or Phase)."""
    if weights is not None and len(weights) != num_datasets:
        raise DataError(f"data.weights={list(weights)!r}: needs one weight per input ({num_datasets} inputs)")
    base = normalize(weights if weights is not None else [1.0] * num_datasets, "data.weights")
    schedule = [Phase(0, base)]
    for k, phase in enumerate(phases or []):
        if isinstance(phase, Phase):
            start, phase_weights = phase.start_step, phase.weights
        elif isinstance(phase, dict) and set(phase) == {"start_step", "weights"}:
            start, phase_weights = phase["start_step"], phase["weights"]
        else:
            raise DataError(f"data.phases[{k}]={phase!r}: expected {{'start_step': int, 'weights': [...]}}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise DataError(f"data.phases[{k}].start_step={start!r}: expected an integer >= 0")
        if start <= schedule[-1].start_step and not (start == 0 and len(schedule) == 1):
            raise DataError(f"data.phases[{k}].start_step={start}: start steps must increase "
                            f"(previous phase starts at {schedule[-1].start_step})")
        if len(phase_weights) != num_datasets:
            raise DataError(f"data.phases[{k}].weights={list(phase_weights)!r}: needs {num_datasets} weights, one per input")
        normalized = normalize(phase_weights, f"data.phases[{k}].weights")
        if start == 0:
            schedule[0] = Phase(0, normalized)  # a phase at step 0 replaces the base weights
        else:
            schedule.append(Phase(start, normalized))
    return schedule


def build_blend(schedule: list, global_batch_size: int, total_batches: int, cache_dir: str | None = None):
    """(dataset_index int16, dataset_sample_index int64, samples drawn per dataset int64) for
    every position of the stream: total_batches * GBS positions, batch b = [b*GBS, (b+1)*GBS)."""
    num_datasets = len(schedule[0].weights)
    size = total_batches * global_batch_size
    key = json.dumps({"version": 1, "phases": [[p.start_step, list(p.weights)] for p in schedule],
                      "gbs": global_batch_size, "batches": total_batches})
    paths = None
    if cache_dir:
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        paths = [os.path.join(cache_dir, f"blend-{digest}-{name}.npy") for name in ("dataset", "sample", "counts")]
        if all(os.path.isfile(p) for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    counts = np.zeros(num_datasets, dtype=np.int64)
    for k, phase in enumerate(schedule):
        begin = min(phase.start_step * global_batch_size, size)
        end = size if k + 1 == len(schedule) else min(schedule[k + 1].start_step * global_batch_size, size)
        if end > begin:
            _helpers.build_blending_indices_from(dataset_index[begin:end], sample_index[begin:end],
                                                 np.asarray(phase.weights, dtype=np.float64), counts)
    if paths:
        os.makedirs(cache_dir, exist_ok=True)
        for path, array in zip(paths, (dataset_index, sample_index, counts)):
            temporary = f"{path}.tmp-{os.getpid()}"
            with open(temporary, "wb") as handle:
                np.save(handle, array)
            os.replace(temporary, path)
    return dataset_index, sample_index, counts


def samples_per_dataset(schedule: list, counts, total: int) -> list:
    """Samples each dataset must provide for a stream of `total` positions that draws `counts`:
    Megatron's sizing for one phase (a single dataset gets exactly `total`), otherwise what
    the blend draws plus Megatron's margin. A dataset never drawn from needs 0."""
    num_datasets = len(schedule[0].weights)
    used = [int(c) for c in counts]
    if num_datasets == 1:
        return [total]
    if len(schedule) == 1:
        megatron = [math.ceil(math.ceil(total * w) * (1 + MEGATRON_SURPLUS)) for w in schedule[0].weights]
        return [max(int(m), int(u)) if u else 0 for m, u in zip(megatron, used)]
    return [math.ceil(int(u) * (1 + MEGATRON_SURPLUS)) for u in used]
