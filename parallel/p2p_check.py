"""A replay of every rank's point-to-point ops under NCCL's rules: deadlock-free and matched, or why not.

The rules (what NCCL does, and what gloo, which runs the tests here, does not):
- One FIFO channel per (communicator, sender, receiver). Tags are ignored, so the i-th send on a
  channel is received by the i-th receive posted on it, whatever either side meant by it.
- Rendezvous: a send completes only when its receive is active (messages above NCCL's buffering
  wait for the receiver; small ones may not, so assuming rendezvous is the safe side).
- A batch (`batch_isend_irecv`, one NCCL group) activates all its ops together and completes when
  all of them have completed. A rank that waits on a batch posts nothing more until it completes.
- Ops a rank does not wait on (an `isend` whose handle is kept for later) still run in order on
  the stream of their peer: PyTorch gives each (communicator, peer) one NCCL stream, so an op is
  active only once every earlier op of that rank towards the same peer has completed.
  `WAIT_ALL` blocks the rank until all its ops have completed (`work.wait()` on every handle).
  (This models the unbatched isend/irecv of old code; the engine waits on every batch it posts,
  so for its programs the streams never hold more than the batch in flight.)

A program is one rank's list of `Batch` and `WAIT_ALL` entries; `check` replays all programs at
once and raises `P2PError` on the first problem: a message received as something else (its label
says what the sender sent and what the receiver expected; same-shape activations swapped by a
tag-free match would otherwise go unnoticed), a shape or dtype that differs, or a deadlock (every
unfinished rank named with the ops it is stuck on). `pipeline_programs` builds the programs of a
pipeline x context-parallel layout from the very plans the engine executes
(`parallel.pipeline.p2p_plan`, `parallel.context_parallel.ring_plan`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable, NamedTuple, Sequence

from parallel.collectives import RECV, SEND
from parallel.context_parallel import DKV, ring_plan
from parallel.pipeline import FORWARD, Exchange, message_peers, p2p_plan, partition_layers, schedule_order


class P2PError(RuntimeError):
    """The programs deadlock or mismatch under NCCL's rules; the message says where."""


class Op(NamedTuple):
    """One point-to-point op: `kind` SEND to or RECV from global rank `peer` on communicator `comm`.

    `label` names the message (a send: what it carries; a receive: what it expects), `shape` and
    `dtype` its payload.
    """

    kind: str
    comm: str
    peer: int
    label: Hashable
    shape: tuple = ()
    dtype: str = "float32"


class Batch(NamedTuple):
    """Ops posted together; with `wait` the rank blocks until they all complete."""

    ops: tuple
    wait: bool = True


WAIT_ALL = "wait_all"
"""Program entry: block until every op this rank posted has completed."""


def check(programs: dict[int, Sequence]) -> int:
    """Replay `programs` ({rank: entries}) under the module's rules; returns the messages matched.

    Raises P2PError on a mismatched message or a deadlock.
    """
    position = {rank: 0 for rank in programs}
    ops: list[tuple[int, Op, tuple, int]] = []     # op id -> (rank, op, stream, batch's place in it)
    batch_ops: list[list[int]] = []                # batch id -> its op ids
    waited: dict[int, int] = {}                    # rank -> the batch it blocks on
    streams: dict[tuple, list[int]] = defaultdict(list)  # (rank, comm, peer) -> batch ids, in order
    heads: dict[tuple, int] = defaultdict(int)     # stream -> place of its first incomplete batch
    channels: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))  # (comm, src, dst) -> sends, recvs
    matched_upto: dict[tuple, int] = defaultdict(int)
    open_ops = {rank: 0 for rank in programs}
    done: set[int] = set()

    def batch_done(batch: int) -> bool:
        return all(op_id in done for op_id in batch_ops[batch])

    def active(op_id: int) -> bool:
        # An op runs once every earlier batch on its stream is done; ops of one batch run together.
        _, _, stream, place = ops[op_id]
        while heads[stream] < len(streams[stream]) and batch_done(streams[stream][heads[stream]]):
            heads[stream] += 1
        return place <= heads[stream]

    def post(rank: int, batch: Batch) -> None:
        batch_ops.append([])
        for op in batch.ops:
            if op.peer == rank or op.peer not in programs:
                raise P2PError(f"rank {rank} posts {op} to a peer that is not another rank")
            stream = (rank, op.comm, op.peer)
            if not streams[stream] or streams[stream][-1] != len(batch_ops) - 1:
                streams[stream].append(len(batch_ops) - 1)
            ops.append((rank, op, stream, len(streams[stream]) - 1))
            batch_ops[-1].append(len(ops) - 1)
            sends, recvs = channels[(op.comm, rank, op.peer) if op.kind == SEND else (op.comm, op.peer, rank)]
            (sends if op.kind == SEND else recvs).append(len(ops) - 1)
            open_ops[rank] += 1
        if batch.wait:
            waited[rank] = len(batch_ops) - 1

    def settle() -> bool:
        # A channel is a FIFO inside one stream, so its pairs complete in order.
        progress = False
        for channel, (sends, recvs) in channels.items():
            i = matched_upto[channel]
            while i < min(len(sends), len(recvs)) and active(sends[i]) and active(recvs[i]):
                (src, sent, _, _), (dst, expected, _, _) = ops[sends[i]], ops[recvs[i]]
                if (sent.label, sent.shape, sent.dtype) != (expected.label, expected.shape, expected.dtype):
                    raise P2PError(
                        f"channel {channel[0]} {src}->{dst}, message #{i}: rank {src} sends {sent.label!r} "
                        f"{sent.shape} {sent.dtype}, rank {dst} receives it as {expected.label!r} "
                        f"{expected.shape} {expected.dtype} (NCCL matches in posting order, tags ignored)")
                done.update((sends[i], recvs[i]))
                open_ops[src] -= 1
                open_ops[dst] -= 1
                i += 1
                progress = True
            matched_upto[channel] = i
        return progress

    while True:
        progress = False
        for rank, program in programs.items():
            while position[rank] < len(program):
                if rank in waited and not batch_done(waited[rank]):
                    break
                entry = program[position[rank]]
                if entry == WAIT_ALL:
                    if open_ops[rank]:
                        break
                else:
                    post(rank, entry)
                position[rank] += 1
                progress = True
        progress |= settle()
        if all(position[r] == len(p) for r, p in programs.items()) and len(done) == len(ops):
            return len(done) // 2
        if not progress:
            raise P2PError("deadlock under NCCL's rules; " + _stuck(programs, position, ops, done))


def _stuck(programs: dict, position: dict, ops: list, done: set) -> str:
    """Each rank's incomplete ops, for the deadlock message."""
    lines = []
    for rank in programs:
        waiting = [f"{op.kind} {op.label!r} {'to' if op.kind == SEND else 'from'} {op.peer}"
                   for op_id, (owner, op, _, _) in enumerate(ops) if owner == rank and op_id not in done]
        if waiting:
            lines.append(f"rank {rank} (entry {position[rank]} of {len(programs[rank])}) waits on "
                         + ", ".join(waiting[:4]))
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------
# The programs of a pipeline x context-parallel layout, from the plans the engine executes


def ring_programs(cp: int, call: Hashable, backward: bool, ranks: Sequence[int], kv_shape: tuple,
                  dtype: str = "float32") -> dict[int, list]:
    """{global rank: batches} of one ring-attention pass over the CP group `ranks` (in CP order).

    `call` names the attention call (layer, microbatch, pass) so that messages of different calls
    are told apart. dK/dV accumulators are fp32 (the engine accumulates there for 16-bit inputs).
    """
    programs = {}
    for index, rank in enumerate(ranks):
        following, preceding = ranks[(index + 1) % cp], ranks[(index - 1) % cp]
        batches = []
        for step, messages in enumerate(ring_plan(cp, backward)):
            ops = [Op(kind, "cp", peer, (call, name, step), kv_shape, "float32" if name == DKV else dtype)
                   for kind, peer in ((SEND, following), (RECV, preceding)) for name in messages]
            if ops:
                batches.append(Batch(tuple(ops)))
        programs[rank] = batches
    return programs


def pipeline_programs(pp: int, virtual_stages: int, microbatches: int, cp: int = 1, num_layers: int = 0,
                      recompute: str = "none", shape: tuple = (1, 4, 8), kv_shape: tuple = (2, 1, 1, 4, 2),
                      dtype: str = "float32") -> dict[int, list]:
    """{global rank: program} of one training step's p2p on a pp x cp grid (rank = cp_rank + cp * stage).

    Each stage executes `p2p_plan` of its `schedule_order`; inside every forward (backward) of a
    chunk, each of its layers runs a ring-attention pass per `ring_plan` (under 'selective' or
    'full' recompute the backward first runs the forward ring again). With cp == 1 only the
    pipeline's messages remain; num_layers defaults to pp * virtual_stages.
    """
    layers = partition_layers(num_layers or pp * virtual_stages, pp, virtual_stages)
    programs: dict[int, list] = {}
    for stage in range(pp):
        ranks = [cp_rank + cp * stage for cp_rank in range(cp)]
        stage_programs: dict[int, list] = {rank: [] for rank in ranks}
        for step in p2p_plan(schedule_order(pp, stage, microbatches, virtual_stages), pp, stage, virtual_stages):
            for cp_rank, rank in enumerate(ranks):
                if isinstance(step, Exchange):
                    ops = [Op(SEND, "pp", cp_rank + cp * message_peers(m, pp)[1], m, shape, dtype) for m in step.sends]
                    ops += [Op(RECV, "pp", cp_rank + cp * message_peers(m, pp)[0], m, shape, dtype) for m in step.recvs]
                    stage_programs[rank].append(Batch(tuple(ops)))
            if isinstance(step, Exchange) or cp == 1:
                continue
            passes = [False] if step.kind == FORWARD else ([False, True] if recompute != "none" else [True])
            for layer in layers[step.chunk * pp + stage]:
                for backward in passes:
                    call = (layer, step.microbatch, step.kind, backward)
                    for rank, batches in ring_programs(cp, call, backward, ranks, kv_shape, dtype).items():
                        stage_programs[rank].extend(batches)
        programs.update(stage_programs)
    return programs
