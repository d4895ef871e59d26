"""Sharded, asynchronous, reshardable checkpoints on torch.distributed.checkpoint (DCP).

Every tensor is saved under its global name and shape, as the pieces this rank holds
(engine/state/views.py), so a checkpoint saved at one layout loads at any other.

Saving is asynchronous: the step pauses only to copy this rank's pieces to host memory (the
"snapshot", at most one in flight); a background thread then runs DCP's save on a dedicated gloo
group (collectives on the training group from two threads could interleave), hashes the files
this rank wrote (every rank at once, each about its own bytes), and rank 0 merges the digests into
the manifest and publishes the directory atomically (engine/state/checkpoint_store.py). The thread
reports progress (`progress`, the hang watchdog's `alive`) while bytes are written and hashed.

Besides tensors, a checkpoint holds the trainer's state (skip list, the guard's history, fp8
scales) as a JSON string and each rank's RNG state as a uint8 tensor: nothing in it needs
unpickling beyond DCP's metadata types (engine/state/safe_load.py). A write the storage refuses
(disk full, read-only) removes the partial directory and raises StorageError on every rank.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from engine.state.checkpoint_store import CheckpointError, CheckpointInfo, CheckpointStore
from engine.state.errors import StorageError, UnsafeCheckpointError
from engine.state.manifest import hash_files, no_progress
from engine.state.safe_load import METADATA_FILE, read_metadata, safe_load, single_process_quietly
from engine.state.storage import storage_cause, storage_error
from engine.state.views import GlobalShards, load_optimizer_step, state_views, sync_masters
from parallel.collectives import CommLedger, Group, all_gather_objects, broadcast_objects
from parallel.process_group import new_cpu_group


class _RecordingWriter(dcp.FileSystemWriter):
    """DCP's file writer, remembering the files this rank wrote (they are the ones it hashes), and
    turning a write the storage refused into a plain OSError with its errno: torch's zip writer
    raises a RuntimeError whose context (the OSError) is lost when DCP gathers the ranks' failures."""

    def write_data(self, plan, planner):
        """Write this rank's items; record the relative paths of the files written."""
        with _storage_errors_kept(self.path):
            future = super().write_data(plan, planner)
            self.written = sorted({result.storage_data.relative_path for result in future.wait()})
        return future

    def finish(self, metadata, results) -> None:
        """Write DCP's metadata file (the coordinator)."""
        with _storage_errors_kept(self.path):
            super().finish(metadata, results)


@contextmanager
def _storage_errors_kept(path):
    try:
        yield
    except Exception as err:
        cause = storage_cause(err)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, cause.filename or str(path)) from err


@contextmanager
def _beating_while_growing(directory: Path, rank: int, progress: Callable[[], None], poll_s: float = 1.0):
    """Call `progress` every `poll_s` seconds while this rank's DCP files in `directory` grow."""
    done = threading.Event()

    def size() -> int:
        total, index = 0, 0
        while True:
            try:
                total += os.stat(directory / f"__{rank}_{index}.distcp").st_size
            except OSError:
                return total
            index += 1

    def watch() -> None:
        last = -1
        while not done.wait(poll_s):
            now = size()
            if now != last:
                progress()
                last = now

    thread = threading.Thread(target=watch, name=f"checkpoint-progress-rank{rank}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, numbers and strings; any global (a class, a function) is refused."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        raise UnsafeCheckpointError(f"{self.source}: refused: the trainer state asks to load {module}.{name}")


def _plain_data(raw: bytes, source: str) -> Any:
    """A format-1 trainer state (a pickle of plain data), read without any global: an older
    checkpoint loads, a crafted one is refused."""
    return _PlainDataUnpickler(io.BytesIO(raw), source).load()


class Checkpointer:
    """Saves and loads one rank's share of the training state; one asynchronous save in flight."""

    def __init__(self, store: CheckpointStore, rank: int, world_size: int, run_id: str,
                 on_event: Callable[..., None] = lambda *a, **k: None, progress: Callable[[], None] = no_progress,
                 timeout_s: Optional[float] = None):
        self.store, self.rank, self.world_size, self.run_id = store, rank, world_size, run_id
        self.on_event, self.progress = on_event, progress
        # DCP's collectives run in a background thread; a group of their own keeps them from
        # interleaving with the training step's collectives on the default group.
        cpu_group = new_cpu_group(timeout_s)
        self.group = Group("checkpoint", cpu_group, world_size, rank, CommLedger(), torch.device("cpu")) \
            if cpu_group is not None else None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._staging: dict[str, Any] = {}  # host copies reused by every save (one in flight)
        self.memory = None  # engine.state.memory_snapshots.MemorySnapshots, when checkpoint.memory_interval is set

    def state_views(self, trainer) -> dict[str, Any]:
        """Everything a checkpoint holds for `trainer`, as DCP-savable views (no copies)."""
        return state_views(trainer)

    def save(self, trainer, step: int, metadata: dict, blocking: bool = False) -> float:
        """Checkpoint the state after `step` steps; returns the pause the step saw (seconds)."""
        self.wait()  # bound staging memory: at most one checkpoint in flight
        return self.save_views(self.state_views(trainer), trainer.checkpoint_extra_state(), step, metadata, blocking)

    def save_views(self, views: dict[str, Any], extra: dict, step: int, metadata: dict,
                   blocking: bool = False) -> float:
        """Checkpoint `views` (tensors and GlobalShards) and the plain-data `extra` state as step `step`."""
        self.wait()
        start = time.perf_counter()
        snapshot = host_snapshot(views, extra, step, self.rank, self._staging)
        self._staging = {k: v for k, v in snapshot.items() if isinstance(v, GlobalShards)}
        pause = time.perf_counter() - start
        token = f"{self.run_id}-{step}"
        self._thread = threading.Thread(target=self._write, args=(snapshot, step, token, metadata, pause),
                                        name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()
        if blocking:
            self.wait()
        return pause

    def _write(self, snapshot: dict, step: int, token: str, metadata: dict, pause: float) -> None:
        partial: Optional[Path] = None
        try:
            start = time.perf_counter()
            # Rank 0 names the directory for all: every rank writes into the same one.
            partial = Path(self._on_rank0_for_all(lambda: str(self.store.new_partial(step, token))))
            digests, failure = {}, None
            try:
                writer = _RecordingWriter(str(partial), sync_files=True)
                with single_process_quietly(), _beating_while_growing(partial, self.rank, self.progress):
                    dcp.save(snapshot, storage_writer=writer, no_dist=self.group is None,
                             process_group=self.group.process_group if self.group else None)
                mine = set(writer.written) | ({METADATA_FILE} if self.rank == 0 else set())
                digests = hash_files(partial, mine, self.rank, self.progress)
            except BaseException as err:  # noqa: B902 - DCP's CheckpointException is a BaseException
                failure = err
            merged, payload = self._after_write(partial, step, digests, failure, _payload_bytes(snapshot))
            self.progress()

            def publish() -> None:
                info = self.store.publish(partial, step, {**metadata, "run_id": self.run_id,
                                                          "world_size": self.world_size},
                                          digests=merged, needed=self.store.newest_bytes() or payload)
                size = sum(p.stat().st_size for p in info.path.rglob("*") if p.is_file())
                self.on_event("checkpoint_saved", step=step, path=str(info.path), bytes=size,
                              pause_s=pause, write_s=time.perf_counter() - start)
            # Every rank returns from here only once the checkpoint is published (or has failed):
            # after wait(), any rank may look for `latest` and must find this one.
            self._on_rank0_for_all(publish)
        except BaseException as err:  # surfaced to the training thread by wait()
            self._error = err

    def _after_write(self, partial: Path, step: int, digests: dict, failure: Optional[BaseException],
                     payload: int) -> tuple[dict, int]:
        """Every rank's outcome of writing and hashing, exchanged: (merged digests, tensor bytes of
        all ranks). A failure anywhere removes the partial directory (all ranks are past their writes
        here) and raises on every rank."""
        cause = storage_cause(failure) if failure is not None else None
        mine = {"digests": digests, "payload": payload,
                "error": None if failure is None else f"{type(failure).__name__}: {failure}".splitlines()[0],
                "storage": None if cause is None else (cause.errno, cause.strerror, cause.filename)}
        outcomes = all_gather_objects(mine, self.group, purpose="checkpoint") if self.group else [mine]
        payload = sum(o["payload"] for o in outcomes)
        failed = [(rank, o) for rank, o in enumerate(outcomes) if o["error"] is not None]
        if not failed:
            return {name: entry for o in outcomes for name, entry in o["digests"].items()}, payload
        needed = self.store.newest_bytes() or payload  # the last checkpoint of this model: what one needs
        if self.rank == 0:
            self.store.discard(partial)
        storage = [(rank, o) for rank, o in failed if o["storage"] is not None]
        newest = self.store.published()
        kept = "; the partial checkpoint was removed, earlier ones are untouched" + \
            (f" (newest: step {newest[-1].step})" if newest else "")
        if storage:
            rank, o = storage[0]
            errno_, strerror, filename = o["storage"]
            raise storage_error(OSError(errno_, strerror, filename), f"rank {rank} writing the checkpoint of "
                                f"step {step}", filename or partial, needed, after=kept)
        rank, o = failed[0]
        raise CheckpointError(f"checkpoint.dir={self.store.root}: rank {rank} failed writing step {step} "
                              f"({o['error']}){kept}")

    def _on_rank0_for_all(self, action: Callable[[], Any]) -> Any:
        """Run `action` on rank 0; every rank waits for it and returns what it returned (picklable)
        or raises what it raised (a StorageError stays one, so every rank stops with the same status)."""
        outcome: list = [None, None]
        if self.rank == 0:
            try:
                outcome[1] = action()
            except StorageError as err:
                outcome[0] = ("storage", str(err))
            except CheckpointError as err:
                outcome[0] = ("checkpoint", str(err))
            except OSError as err:
                cause = storage_cause(err)
                outcome[0] = ("storage", str(storage_error(cause, "a checkpoint", self.store.root))) if cause \
                    else ("checkpoint", f"checkpoint.dir={self.store.root}: {err}")
        if self.group is not None:
            broadcast_objects(outcome, self.group)
        if outcome[0] is not None:
            kind, message = outcome[0]
            raise (StorageError if kind == "storage" else CheckpointError)(message)
        return outcome[1]

    def latest_for_all(self, report: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
        """The newest intact checkpoint, the same on every rank (for rewinds): every rank verifies
        its share of each candidate's files (engine/state/resume.py)."""
        from engine.state.resume import newest_intact_for_all

        return newest_intact_for_all(self.store, self.group, self.rank, self.progress,
                                     report if self.rank == 0 else (lambda _: None))

    def wait(self) -> None:
        """Block until the checkpoint in flight (if any) is published; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"saving a checkpoint failed: {err}") from err

    def load(self, trainer, path: Path) -> dict:
        """Load the checkpoint at `path` into `trainer` (any saved layout); returns its extra state."""
        views = self.state_views(trainer)
        metadata = read_metadata(path)  # restricted: DCP's types only
        saved = metadata.state_dict_metadata
        # fp32 masters are absent from an fp32 run's checkpoint: a bf16 run re-reads them from the
        # loaded weights. Anything else missing means the checkpoint does not hold this model.
        masters_missing = [k for k in views if k.endswith("/master") and k not in saved]
        for key in masters_missing:
            del views[key]
        # fp8 recipe state is absent from a checkpoint of another precision, recipe or fp8 path:
        # the recipe then starts afresh (scales 1, empty history), as a new fp8 run would.
        for key in [k for k in views if k.startswith("fp8/") and k not in saved]:
            del views[key]
        missing = [k for k in views if k not in saved]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors this layout needs, e.g. "
                                  f"{', '.join(missing[:3])}")
        holder = {**views, "trainer": ""}
        rng_key = f"rng/{self.rank}"
        if isinstance(saved.get(rng_key), TensorStorageMetadata):  # a rank of the saving world
            holder[rng_key] = torch.empty(saved[rng_key].size, dtype=torch.uint8)
        safe_load(holder, path, process_group=self.group.process_group if self.group else None,
                  no_dist=self.group is None, metadata=metadata)
        return finish_load(trainer, holder, rng_key, f"checkpoint {path}", sync=bool(masters_missing))


def host_snapshot(views: dict[str, Any], extra: dict, step: int, rank: int,
                  staging: Optional[dict[str, GlobalShards]] = None) -> dict[str, Any]:
    """Host-memory copies of `views` (reusing `staging`'s buffers), the trainer state and this
    rank's RNG: what a checkpoint or a memory snapshot holds."""
    staging = staging or {}
    snapshot = {k: (v.snapshot(staging.get(k)) if isinstance(v, GlobalShards) else v.detach().clone())
                for k, v in views.items()}
    # Plain data, read back with torch.load(weights_only=True): floats keep every bit in JSON.
    snapshot["trainer"] = json.dumps({**extra, "step": step})
    snapshot[f"rng/{rank}"] = torch.get_rng_state()
    return snapshot


def finish_load(trainer, holder: dict[str, Any], rng_key: str, source: str, sync: bool = False) -> dict:
    """After the tensors of `holder` (views of `trainer`'s state) are filled in: the optimizer's step
    count, masters (`sync`: re-read from the weights), the RNG and the trainer state; returns the latter."""
    if "optim/step" in holder:
        load_optimizer_step(trainer.optimizer, holder["optim/step"])
    if sync:
        sync_masters(trainer.optimizer)
    if hasattr(trainer.optimizer, "after_checkpoint_load"):  # e.g. ZeRO re-gathers parameters
        trainer.optimizer.after_checkpoint_load()
    if isinstance(holder.get(rng_key), torch.Tensor):
        torch.set_rng_state(holder[rng_key])
    state = holder["trainer"]
    extra = json.loads(state) if isinstance(state, str) else _plain_data(state, source)
    if not isinstance(extra, dict):
        raise CheckpointError(f"{source}: the trainer state is a {type(extra).__name__}, not an object")
    trainer.load_extra_state(extra)
    return extra


def _payload_bytes(snapshot: dict) -> int:
    """Bytes of this rank's tensors in a snapshot (an estimate of what it writes)."""
    total = 0
    for value in snapshot.values():
        if isinstance(value, GlobalShards):
            total += sum(t.numel() * t.element_size() for _, t in value.pieces)
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total
