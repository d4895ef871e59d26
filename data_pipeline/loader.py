"""TrainingData: the tokens of (step, microbatch, data-parallel rank), as a pure function.

There is no iterator position to save or restore: the batch of optimizer step s is data batch
b(s) = the s-th batch index not listed in `skip_steps` (a rewind that skips batch k makes step
k train on batch k + 1). Batch b is positions [b*GBS, (b+1)*GBS) of the blended sample stream.
Within it, microbatch j of data-parallel rank r holds positions
j*(mbs*dp) + r*mbs + [0, mbs), Megatron's pretraining-sampler order, so the set of samples
of a step does not depend on the data-parallel size. Resuming at step k therefore yields
exactly what an uninterrupted run would.

`iterate()` prepares whole steps ahead in a background thread (bounded queue) so the step
never waits on I/O; it yields the same tensors as calling `microbatch()` directly.
"""
import queue
import threading

import numpy as np
import torch

from data_pipeline import DataError
from data_pipeline.documents import document_layout
from data_pipeline.microbatch import Microbatch
from data_pipeline.blending import build_blend, parse_schedule, samples_per_dataset
from data_pipeline.gpt_dataset import GPTDataset


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{field}={value!r}: expected a positive integer")
    return int(value)


def data_batch_index(step: int, skip_steps=()) -> int:
    """The data batch trained on at optimizer step `step`: the step-th index not in skip_steps."""
    batch = step
    for skipped in sorted(set(int(s) for s in skip_steps)):
        if skipped <= batch:
            batch += 1  # every skipped batch at or before our index pushes it one further
        else:
            break
    return batch


def sample_position(step: int, microbatch: int, dp_rank: int, dp_size: int, global_batch_size: int,
                    micro_batch_size: int, skip_steps=()) -> int:
    """Global position of the first sample of (step, microbatch, dp rank), checked.

    Batch b (step `step` past the skipped ones) holds positions [b * GBS, (b + 1) * GBS); within
    it microbatch j of DP rank r starts at j * mbs * dp + r * mbs, so every data-parallel layout
    trains on the same global batch.
    """
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(f"train.global_batch_size={global_batch_size}: must be a multiple of "
                        f"train.micro_batch_size * dp = {micro_batch_size} * {dp_size}")
    per_rank = global_batch_size // (micro_batch_size * dp_size)
    if not 0 <= microbatch < per_rank:
        raise DataError(f"microbatch {microbatch}: valid range is [0, {per_rank}) at dp={dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank}: valid range is [0, {dp_size})")
    if step < 0:
        raise DataError(f"step {step}: must be >= 0")
    batch = data_batch_index(step, skip_steps)
    return batch * global_batch_size + microbatch * micro_batch_size * dp_size + dp_rank * micro_batch_size


class TrainingData:
    """Blended, shuffled GPT samples for a whole run, addressed by (step, microbatch, dp rank).

    prefixes: dataset prefixes (PREFIX.bin/.idx). weights: blend weights (default equal).
    phases: [{"start_step": s, "weights": [...]}] mixture schedule (see blending.py).
    steps: optimizer steps of the run; datasets are sized for steps * global_batch_size
    samples as megatron-core sizes them, and the blended stream runs `reserve_steps` batches
    further (default max(16, steps // 100)) to make room for batches skipped by rewinds.
    data_parallel_size: only used by the `num_microbatches` property. split, part: Megatron's
    split string and the part read (0 train, 1 valid, 2 test; data_pipeline/gpt_dataset.py).
    document_mask: microbatches carry each input's document (the .idx sequences a sample spans),
    so attention stays within a document, and the target that starts a new document is not
    trained (data_pipeline/documents.py). reset_position_ids: RoPE positions restart per document.
    """

    def __init__(self, prefixes, seq_length: int, seed: int, global_batch_size: int, micro_batch_size: int,
                 steps: int, cache_dir: str | None = None, weights=None, phases=None,
                 data_parallel_size: int = 1, reserve_steps: int | None = None, prefetch: int = 2,
                 split: str = "1,0,0", part: int = 0, document_mask: bool = False,
                 reset_position_ids: bool = False):
        if isinstance(prefixes, str) or not prefixes:
            raise DataError(f"data.inputs={prefixes!r}: expected a non-empty list of dataset prefixes")
        self.prefixes = list(prefixes)
        self.seq_length = _positive_int(seq_length, "model.seq_length")
        self.global_batch_size = _positive_int(global_batch_size, "train.global_batch_size")
        self.micro_batch_size = _positive_int(micro_batch_size, "train.micro_batch_size")
        self.steps = _positive_int(steps, "train.steps")
        self.data_parallel_size = _positive_int(data_parallel_size, "parallel.dp")
        self.prefetch = _positive_int(prefetch, "data.prefetch")
        self.seed = int(seed)
        self.document_mask, self.reset_position_ids = bool(document_mask), bool(reset_position_ids)
        self._check_divisible(self.data_parallel_size)
        reserve = max(16, self.steps // 100) if reserve_steps is None else int(reserve_steps)
        if reserve < 0:
            raise DataError(f"reserve_steps={reserve_steps!r}: expected an integer >= 0")
        self.total_batches = self.steps + reserve
        self.schedule = parse_schedule(len(self.prefixes), weights, phases)
        self.dataset_index, self.dataset_sample_index, _ = build_blend(
            self.schedule, self.global_batch_size, self.total_batches, cache_dir)
        run_positions = self.steps * self.global_batch_size
        drawn = np.bincount(np.asarray(self.dataset_index[:run_positions]), minlength=len(self.prefixes))
        sizes = samples_per_dataset(self.schedule, drawn, run_positions)
        self.datasets = [GPTDataset(prefix, self.seq_length, size, self.seed, cache_dir, split, part) if size else None
                         for prefix, size in zip(self.prefixes, sizes)]

    def _check_divisible(self, dp_size: int) -> None:
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise DataError(f"train.global_batch_size={self.global_batch_size}: must be a multiple of "
                            f"train.micro_batch_size * dp = {self.micro_batch_size} * {dp_size}")

    @property
    def num_microbatches(self) -> int:
        """Microbatches per step per rank at `data_parallel_size`: GBS / (mbs * dp)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def sample(self, position: int) -> np.ndarray:
        """Tokens (int64, seq_length + 1) at `position` of the blended stream."""
        return self.sample_with_documents(position)[0]

    def sample_with_documents(self, position: int) -> tuple[np.ndarray, list[int]]:
        """(tokens (int64, seq_length + 1), lengths of the documents they span) at `position`."""
        if not 0 <= position < len(self.dataset_index):
            raise DataError(f"sample position {position}: beyond the {self.total_batches} batches built "
                            f"(train.steps={self.steps} plus reserve); increase train.steps")
        dataset = int(self.dataset_index[position])
        index = int(self.dataset_sample_index[position])
        source = self.datasets[dataset]
        if source is None or index >= len(source):
            size = 0 if source is None else len(source)
            raise DataError(f"data input {self.prefixes[dataset]!r}: needs sample {index} but holds {size} "
                            f"for this run; increase train.steps so more epochs are built")
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        return out, source.sample_into(index, out)

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> Microbatch:
        """Tokens [micro_batch_size, seq_length + 1] of this (step, microbatch, dp rank), every target trained."""
        self._check_divisible(dp_size)
        first = sample_position(step, microbatch, dp_rank, dp_size, self.global_batch_size,
                                self.micro_batch_size, skip_steps)
        out = np.empty((self.micro_batch_size, self.seq_length + 1), dtype=np.int64)
        layouts, documents = [], self.document_mask or self.reset_position_ids
        for row in range(self.micro_batch_size):
            out[row], pieces = self.sample_with_documents(first + row)
            if documents:
                layouts.append(document_layout(pieces, self.seq_length))
        tokens = torch.from_numpy(out)
        if not documents:
            return Microbatch(tokens)
        ids, positions, boundary = (torch.stack(parts) for parts in zip(*layouts))
        if not self.document_mask:
            return Microbatch(tokens, positions=positions)
        return Microbatch(tokens, boundary, ids, positions if self.reset_position_ids else None)

    def step_microbatches(self, step: int, dp_rank: int, dp_size: int, skip_steps=()) -> list:
        """All microbatches of `step` for this rank, in order."""
        per_rank = self.global_batch_size // (self.micro_batch_size * dp_size)
        return [self.microbatch(step, j, dp_rank, dp_size, skip_steps) for j in range(per_rank)]

    def iterate(self, start_step: int, dp_rank: int, dp_size: int, skip_steps=(), end_step: int | None = None,
                prefetch: int | None = None) -> "PrefetchIterator":
        """Yield (step, [microbatch tensors]) for steps [start_step, end_step or steps), prepared
        `prefetch` steps ahead by a background thread. Close it (or use `with`) when done."""
        skips = tuple(sorted(set(int(s) for s in skip_steps)))
        self._check_divisible(dp_size)
        steps = range(start_step, self.steps if end_step is None else end_step)
        return PrefetchIterator(lambda step: self.step_microbatches(step, dp_rank, dp_size, skips),
                                steps, prefetch or self.prefetch)


class _Failure:
    """A worker exception, carried through the queue to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()  # immutable sentinel: the producer finished every step


class PrefetchIterator:
    """Runs produce(step) for each step in a daemon thread, at most `depth` steps ahead."""

    def __init__(self, produce, steps, depth: int):
        self._produce, self._steps = produce, steps
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="apogee-data-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        # Time out regularly so close() can stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for step in self._steps:
                if not self._put((step, self._produce(step))):
                    return
            self._put(_END)
        except BaseException as error:  # re-raised in the consumer's thread
            self._put(_Failure(error))

    def __iter__(self) -> "PrefetchIterator":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the worker thread and wait for it; safe to call more than once."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> "PrefetchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
