"""Recovery from memory: every `checkpoint.memory_interval` steps each rank's shard goes to two keepers.

A rank's failure domain is a node (on one machine: a share of the ranks, `domain_of`). The rank
sends its snapshot (the same host copies a DCP checkpoint writes: weights, optimizer, fp8 state,
trainer state, RNG; engine/state/checkpoint.py: host_snapshot) to the keeper of its own domain and
to the keeper of the next domain (engine/state/memory_keeper.py), from a background thread, one
save in flight. A killed rank's snapshot survives in its keeper; a lost node's (rank and keeper
gone) in the next domain's keeper.

On a restart, `restore` asks every rank which steps it can still fetch, takes the newest step all
of them can, and loads it if it is at least as new as the newest disk checkpoint: no disk is read.
A snapshot is only accepted from the same run, rank, world and layout (a fingerprint of the model,
layout and precision), with its SHA-256 intact; anything else, and any rank failing to load, falls
back to the disk checkpoint, on every rank alike. Snapshots are bytes of `torch.save` of tensors,
lists and strings, read back with weights_only=True: nothing received can run code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch

from engine.state.checkpoint import finish_load, host_snapshot
from engine.state.memory_keeper import KEY_ENV, KeeperClient, KeeperError
from engine.state.views import GlobalShards, state_views
from parallel.collectives import Group, all_gather_objects

KEEPERS_ENV = "APOGEE_KEEPERS"
"""Environment variable listing the keepers' addresses, one per failure domain: host:port,host:port,..."""


def domain_of(rank: int, world_size: int, domains: int) -> int:
    """The failure domain (keeper index) of `rank`: ranks split into `domains` equal consecutive runs, as nodes hold them."""
    return rank * domains // world_size


def keepers_from_environment() -> tuple[list[str], bytes]:
    """(keeper addresses, key) from APOGEE_KEEPERS and APOGEE_KEEPER_KEY; no addresses unless both are set."""
    addresses = [a for a in os.environ.get(KEEPERS_ENV, "").split(",") if a]
    key = os.environ.get(KEY_ENV, "")
    return (addresses, bytes.fromhex(key)) if addresses and key else ([], b"")


def layout_fingerprint(cfg, world_size: int) -> str:
    """What a snapshot must match to load in place: model, layout, precision and world size."""
    fields = {"model": dataclasses.asdict(cfg.model), "parallel": dataclasses.asdict(cfg.parallel),
              "precision": dataclasses.asdict(cfg.precision), "world_size": world_size}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode(snapshot: dict[str, Any]) -> bytes:
    """A host snapshot as bytes: tensors, [offset, tensor] pieces and strings only."""
    plain = {}
    for key, value in snapshot.items():
        if isinstance(value, GlobalShards):
            plain[key] = {"shape": list(value.shape), "pieces": [[list(o), t] for o, t in value.pieces]}
        else:
            plain[key] = value
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> dict[str, Any]:
    """The plain structure `encode` wrote, read with torch's weights-only unpickler (no code runs)."""
    return torch.load(io.BytesIO(data), weights_only=True)


def fill_views(views: dict[str, Any], saved: dict[str, Any]) -> Optional[str]:
    """Copy a decoded snapshot into `views` in place; a reason if it does not fit them (nothing is copied then)."""
    keys = set(views) | {"trainer"}
    rng = {k for k in saved if k.startswith("rng/")}
    if set(saved) - rng != keys:
        return f"it holds other tensors ({len(set(saved) - rng)} vs {len(keys)} expected)"
    plan = []
    for key, view in views.items():
        value = saved[key]
        if isinstance(view, GlobalShards):
            if not isinstance(value, dict) or list(value.get("shape", ())) != list(view.shape):
                return f"{key}: another global shape"
            pieces = {tuple(o): t for o, t in value["pieces"]}
            for offset, target in view.pieces:
                source = pieces.get(tuple(offset))
                if source is None or source.shape != target.shape or source.dtype != target.dtype:
                    return f"{key}: no matching piece at offset {tuple(offset)}"
                plan.append((target, source))
        else:
            if not isinstance(value, torch.Tensor) or value.shape != view.shape or value.dtype != view.dtype:
                return f"{key}: another shape or dtype"
            plan.append((view, value))
    with torch.no_grad():
        for target, source in plan:
            target.copy_(source)
    return None


class MemorySnapshots:
    """One rank's memory snapshots: save every `interval` steps, restore on a restart."""

    def __init__(self, cfg, rank: int, world_size: int, run_id: str, addresses: list[str], key: bytes,
                 report: Callable[[str], None] = print):
        self.interval, self.rank, self.world_size, self.run_id = cfg.checkpoint.memory_interval, rank, world_size, run_id
        self.fingerprint = layout_fingerprint(cfg, world_size)
        domains = len(addresses)
        home = domain_of(rank, world_size, domains)
        chosen = [home] + ([(home + 1) % domains] if domains > 1 else [])
        self.keepers = [KeeperClient(addresses[d], key) for d in chosen]
        self.report = report
        self._thread: Optional[threading.Thread] = None
        self._staging: dict[str, GlobalShards] = {}
        self._warned: set[str] = set()
        self.last_taken_at: Optional[float] = None

    @classmethod
    def from_environment(cls, cfg, rank: int, world_size: int, run_id: str) -> Optional["MemorySnapshots"]:
        """None when memory snapshots are off; the keepers from APOGEE_KEEPERS/APOGEE_KEEPER_KEY otherwise."""
        if not cfg.checkpoint.memory_interval:
            return None
        addresses, key = keepers_from_environment()
        if not addresses:
            from engine.config import ConfigError

            raise ConfigError(f"checkpoint.memory_interval={cfg.checkpoint.memory_interval}: no keepers to send "
                              f"snapshots to ({KEEPERS_ENV} and {KEY_ENV} are not both set). `apogee <stage> --nproc N` "
                              f"starts them; under srun, torchrun or mpirun start `python -m engine.state.memory_keeper` "
                              f"on each node and set both variables, or set checkpoint.memory_interval=0")
        return cls(cfg, rank, world_size, run_id, addresses, key)

    def due(self, done: int) -> bool:
        """A snapshot after `done` steps?"""
        return bool(self.interval) and done % self.interval == 0

    def save(self, trainer, step: int) -> float:
        """Snapshot the state after `step` steps and send it in the background; returns the pause (s)."""
        self.wait()
        start = time.perf_counter()
        taken_at = time.time()
        snapshot = host_snapshot(state_views(trainer), trainer.checkpoint_extra_state(), step, self.rank,
                                 self._staging)
        self._staging = {k: v for k, v in snapshot.items() if isinstance(v, GlobalShards)}
        pause = time.perf_counter() - start
        self._thread = threading.Thread(target=self._send, args=(snapshot, step, taken_at),
                                        name=f"memory-snapshot-{step}", daemon=True)
        self._thread.start()
        return pause

    def _send(self, snapshot: dict, step: int, taken_at: float) -> None:
        data = encode(snapshot)
        meta = {"digest": hashlib.sha256(data).hexdigest(), "fingerprint": self.fingerprint, "taken_at": taken_at}
        for keeper in self.keepers:
            try:
                keeper.put(self.run_id, self.rank, step, meta, data)
            except KeeperError as err:  # training goes on; the restart falls back to the peer copy or the disk
                if keeper.address not in self._warned:
                    self._warned.add(keeper.address)
                    print(f"apogee: rank {self.rank}: memory snapshot of step {step} not kept: {err}",
                          file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Block until the snapshot in flight has been sent."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def discard_after(self, step: int) -> None:
        """A rewind to `step`: the snapshots of later steps belong to an abandoned trajectory."""
        self.wait()
        for keeper in self.keepers:
            try:
                keeper.drop_after(self.run_id, self.rank, step)
            except KeeperError:
                pass  # an unreachable keeper holds nothing a restart could fetch

    def available(self) -> set[int]:
        """Steps of this rank's snapshots that some reachable keeper holds."""
        steps: set[int] = set()
        for keeper in self.keepers:
            try:
                steps |= set(keeper.steps(self.run_id).get(self.rank, []))
            except KeeperError:
                pass  # a lost keeper: the other one may hold the copy
        return steps

    def fetch(self, step: int) -> tuple[Optional[dict], str]:
        """(the decoded snapshot of `step`, where from) from the first keeper holding an intact, matching
        one; the time it was taken is `last_taken_at`."""
        problems = []
        for keeper in self.keepers:
            try:
                meta, data = keeper.get(self.run_id, self.rank, step)
            except KeeperError as err:
                problems.append(str(err))
                continue
            if hashlib.sha256(data).hexdigest() != meta.get("digest"):
                problems.append(f"keeper {keeper.address}: the snapshot's SHA-256 does not match")
            elif meta.get("fingerprint") != self.fingerprint:
                problems.append(f"keeper {keeper.address}: a snapshot of another model, layout or precision")
            else:
                self.last_taken_at = float(meta.get("taken_at", 0.0)) or None
                return decode(data), keeper.address
        return None, "; ".join(problems) or "no keeper holds it"

    def restore(self, trainer, group: Optional[Group], newest_disk_step: int) -> Optional[tuple[int, list[str]]]:
        """Load the newest step every rank can fetch, if at least `newest_disk_step`; (step, the keeper
        each rank's snapshot came from) or None.

        Collective over `group`: every rank returns the same step, or None together (then the caller
        loads the disk checkpoint, which replaces whatever a rank had loaded)."""
        mine = sorted(self.available())
        everyone = all_gather_objects(mine, group, purpose="checkpoint") if group is not None else [mine]
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
        candidates = sorted((s for s in common if s >= newest_disk_step), reverse=True)
        if not candidates:
            return None
        step = candidates[0]
        saved, where = self.fetch(step)
        problem = None
        if saved is None:
            problem = where
        else:
            views = state_views(trainer)
            problem = fill_views(views, saved)
            if problem is None:
                rng_key = f"rng/{self.rank}"
                finish_load(trainer, {**views, "trainer": saved["trainer"], rng_key: saved.get(rng_key)}, rng_key,
                            f"memory snapshot of step {step}")
        outcome = (problem, where)
        outcomes = all_gather_objects(outcome, group, purpose="checkpoint") if group is not None else [outcome]
        failed = [(rank, p) for rank, (p, _) in enumerate(outcomes) if p is not None]
        if failed:
            rank, p = failed[0]
            self.report(f"apogee: the memory snapshot of step {step} cannot be used (rank {rank}: {p}); "
                        f"falling back to the disk checkpoint")
            return None
        return step, [w for _, w in outcomes]


def lose_home_keeper(rank: int) -> None:
    """A rehearsed node loss (fault `node_loss`): the keeper of `rank`'s domain exits, its snapshots with it."""
    addresses, key = keepers_from_environment()
    if not addresses:
        return  # no memory snapshots: the rank's death is the whole loss
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        KeeperClient(addresses[domain_of(rank, world, len(addresses))], key, timeout_s=5).send_stop(
            lose_everything=True)
    except KeeperError:
        pass  # it exits before answering
