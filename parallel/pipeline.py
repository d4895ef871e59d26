"""Pipeline parallelism: layer partitioning, stage-to-stage p2p, and the 1F1B schedules.

The model is cut into K = pp * v model chunks of consecutive layers. Stage r holds v of them:
its chunk c is model chunk c*pp + r (Megatron's interleaved order, Narayanan et al. 2021,
arXiv 2104.04473, section 2.2). Model chunk 0 embeds the tokens; model chunk K-1 applies the
head and the loss. Between neighbouring model chunks one [b, s_local, h] activation goes
forward and its gradient comes back, per microbatch.

A schedule is arithmetic: `one_f_one_b_order` and `interleaved_order` give each rank's list of
actions (F|B, chunk, microbatch), and `run_schedule` executes such a list: a forward receives its
input from the previous model chunk (unless it is model chunk 0), runs the caller's
`forward_step`, and sends the output on; a backward receives the output's gradient (unless it is
the last model chunk, whose output is the loss), runs autograd, and sends the input's gradient
back. The schedule knows nothing about the model: the trainer supplies `forward_step`.

Sends are asynchronous and a receive blocks only when its tensor is needed, so a rank waits only
on true data dependencies; the time spent blocked in receives is the rank's pipeline bubble
(`StageComm.wait_seconds`). `simulate` replays the same orders with unit costs, which proves them
deadlock-free and gives the bubble the schedule implies on ideal hardware.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from parallel.collectives import Group, irecv, isend

FORWARD, BACKWARD = "F", "B"


class PipelineError(ValueError):
    """A pipeline layout that cannot be built; the message names the field, value and what is valid."""


class Action(NamedTuple):
    """One step of a rank's schedule: forward or backward of `microbatch` on local `chunk`."""

    kind: str
    chunk: int
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.microbatch}"


# ---------------------------------------------------------------------------------------------
# Partitioning


def partition_layers(num_layers: int, pp: int, virtual_stages: int = 1) -> list[list[int]]:
    """Global layer ids of each model chunk k = c*pp + r (chunk c of stage r), consecutive and balanced.

    With L = num_layers and K = pp * virtual_stages chunks, every chunk gets L // K layers and the
    first L % K model chunks one more (so the last stage, which also runs the head and the loss,
    is never the one with the extra layer). Fewer layers than chunks is refused.
    """
    chunks = pp * virtual_stages
    if pp < 1 or virtual_stages < 1:
        raise PipelineError(f"parallel.pp={pp} and parallel.virtual_stages={virtual_stages} must be >= 1")
    if num_layers < chunks:
        raise PipelineError(
            f"model.num_layers={num_layers} cannot fill pp*virtual_stages = {pp}*{virtual_stages} = {chunks} "
            f"model chunks (each needs at least one layer); use num_layers >= {chunks} or fewer stages")
    base, extra = divmod(num_layers, chunks)
    bounds = [0]
    for k in range(chunks):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    return [list(range(bounds[k], bounds[k + 1])) for k in range(chunks)]


def stage_layer_ids(num_layers: int, pp: int, virtual_stages: int, stage: int) -> list[list[int]]:
    """Layer ids of stage `stage`'s local chunks c = 0..v-1 (model chunks c*pp + stage)."""
    partition = partition_layers(num_layers, pp, virtual_stages)
    return [partition[c * pp + stage] for c in range(virtual_stages)]


# ---------------------------------------------------------------------------------------------
# Schedules as arithmetic


def one_f_one_b_order(pp: int, rank: int, microbatches: int) -> list[Action]:
    """PipeDream-flush 1F1B (Narayanan et al. 2021, fig. 4 top): warm-up forwards, 1F1B, cool-down.

    Stage r runs pp - r - 1 warm-up forwards, so at most pp - r microbatches are in flight.
    """
    m = microbatches
    warmup = min(pp - rank - 1, m)
    order = [Action(FORWARD, 0, j) for j in range(warmup)]
    for j in range(m - warmup):
        order += [Action(FORWARD, 0, j + warmup), Action(BACKWARD, 0, j)]
    order += [Action(BACKWARD, 0, j) for j in range(m - warmup, m)]
    return order


def interleaved_order(pp: int, rank: int, microbatches: int, virtual_stages: int) -> list[Action]:
    """Interleaved 1F1B with v virtual stages (Narayanan et al. 2021, fig. 4 bottom; Megatron's order).

    The m*v (chunk, microbatch) forwards run in groups of pp microbatches per chunk: virtual
    microbatch k is chunk (k mod pp*v) // pp and microbatch (k // (pp*v)) * pp + k mod pp; backwards
    walk the chunks in reverse. Warm-up is 2*(pp - r - 1) + (v - 1)*pp forwards.
    """
    m, v = microbatches, virtual_stages
    if m % pp:
        raise PipelineError(f"interleaved 1F1B needs the microbatch count ({m}) divisible by parallel.pp={pp}")
    total = m * v

    def action(kind: str, k: int) -> Action:
        chunk = (k % (pp * v)) // pp
        return Action(kind, chunk if kind == FORWARD else v - 1 - chunk, (k // (pp * v)) * pp + k % pp)

    warmup = min(2 * (pp - rank - 1) + (v - 1) * pp, total)
    order = [action(FORWARD, k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [action(FORWARD, k + warmup), action(BACKWARD, k)]
    order += [action(BACKWARD, k) for k in range(total - warmup, total)]
    return order


def schedule_order(pp: int, rank: int, microbatches: int, virtual_stages: int = 1) -> list[Action]:
    """The rank's actions: 1F1B when virtual_stages == 1, interleaved 1F1B otherwise."""
    if virtual_stages == 1:
        return one_f_one_b_order(pp, rank, microbatches)
    return interleaved_order(pp, rank, microbatches, virtual_stages)


def max_in_flight(order: Sequence[Action]) -> int:
    """Most microbatch-chunks whose forward ran and backward did not yet (activations held at once)."""
    live = peak = 0
    for a in order:
        live += 1 if a.kind == FORWARD else -1
        peak = max(peak, live)
    return peak


class Simulation(NamedTuple):
    """Unit-cost replay of a schedule: per-rank busy and idle time within the makespan."""

    makespan: float
    busy: list[float]
    idle: list[float]

    def bubble_fraction(self, rank: int) -> float:
        """Idle / busy time of `rank`: the quantity (p-1)/m of Narayanan et al."""
        return self.idle[rank] / self.busy[rank]


def simulate(pp: int, microbatches: int, virtual_stages: int = 1, forward_time: float = 1.0,
             backward_time: float = 2.0) -> Simulation:
    """Run every rank's order against the data dependencies with sends free and non-blocking.

    A chunk forward costs forward_time / v, a backward backward_time / v. Raises PipelineError on
    a deadlock (no rank can make progress), which would mean the orders are inconsistent.
    """
    v, m = virtual_stages, microbatches
    chunks = pp * v
    orders = [schedule_order(pp, r, m, v) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}  # (kind, model chunk, microbatch) -> finish time
    clock, position = [0.0] * pp, [0] * pp
    busy = [0.0] * pp
    while any(position[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                a = orders[r][position[r]]
                k = a.chunk * pp + r
                if a.kind == FORWARD:
                    dependency = (FORWARD, k - 1, a.microbatch) if k > 0 else None
                    cost = forward_time / v
                else:
                    dependency = (BACKWARD, k + 1, a.microbatch) if k < chunks - 1 else None
                    cost = backward_time / v
                if dependency is not None and dependency not in done:
                    break
                start = max(clock[r], done.get(dependency, 0.0))
                clock[r] = start + cost
                busy[r] += cost
                done[(a.kind, k, a.microbatch)] = clock[r]
                position[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][position[r]] for r in range(pp) if position[r] < len(orders[r])}
            raise PipelineError(f"schedule deadlocks (pp={pp}, m={m}, v={v}); blocked actions: {stuck}")
    makespan = max(clock)
    return Simulation(makespan, busy, [makespan - b for b in busy])


# ---------------------------------------------------------------------------------------------
# Point-to-point exchange between neighbouring stages


class StageComm:
    """Activations forward and gradients backward between this stage and its neighbours.

    Shapes are known in advance ([b, s_local, h] in `dtype`), so nothing but the payload is sent.
    Model chunk k = chunk*pp + stage sends to k+1 on the next stage (wrapping from the last stage
    to the first for the next virtual chunk). Each (boundary, direction) has its own tag, so
    messages between the same two ranks never match the wrong receive, and every send is booked
    in the 'pp' ledger as 'send_forward' or 'send_backward'. `wait_seconds` accumulates the time
    spent blocked in receives, `compute_seconds` (kept by `run_schedule`) the forwards and backwards.
    """

    def __init__(self, group: Group, virtual_stages: int, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device):
        self.group, self.stage, self.virtual_stages = group, group.rank, virtual_stages
        # Indices in the PP group; the ring wraps as in Megatron (last stage -> first for chunk c+1).
        self.next_stage, self.prev_stage = (group.rank + 1) % group.size, (group.rank - 1) % group.size
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.num_model_chunks = group.size * virtual_stages
        self.wait_seconds = 0.0
        self.compute_seconds = 0.0
        self._pending: list = []

    def model_chunk(self, chunk: int) -> int:
        """Global model-chunk index of local `chunk`."""
        return chunk * self.group.size + self.stage

    def is_first(self, chunk: int) -> bool:
        """True for model chunk 0 (its input is tokens, not a received activation)."""
        return self.model_chunk(chunk) == 0

    def is_last(self, chunk: int) -> bool:
        """True for the last model chunk (its output is the loss)."""
        return self.model_chunk(chunk) == self.num_model_chunks - 1

    def _tag(self, receiving_chunk: int, backward: bool) -> int:
        return 2 * receiving_chunk + int(backward)

    def _recv(self, peer: int, tag: int) -> torch.Tensor:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        start = time.perf_counter()
        irecv(buffer, peer, self.group, tag=tag).wait()
        self.wait_seconds += time.perf_counter() - start
        return buffer

    def recv_forward(self, chunk: int) -> Optional[torch.Tensor]:
        """The input activation of local `chunk` (requires grad), or None on model chunk 0."""
        if self.is_first(chunk):
            return None
        return self._recv(self.prev_stage, self._tag(self.model_chunk(chunk), False)).requires_grad_()

    def send_forward(self, output: torch.Tensor, chunk: int) -> None:
        """Send local `chunk`'s output activation to the next model chunk (nothing from the last)."""
        if self.is_last(chunk):
            return
        self._send(output, self.next_stage, self._tag(self.model_chunk(chunk) + 1, False), "send_forward")

    def recv_backward(self, chunk: int) -> Optional[torch.Tensor]:
        """The gradient of local `chunk`'s output, or None on the last model chunk (it ends in the loss)."""
        if self.is_last(chunk):
            return None
        return self._recv(self.next_stage, self._tag(self.model_chunk(chunk), True))

    def send_backward(self, input_grad: Optional[torch.Tensor], chunk: int) -> None:
        """Send the gradient of local `chunk`'s input to the previous model chunk (nothing from chunk 0)."""
        if self.is_first(chunk):
            return
        self._send(input_grad, self.prev_stage, self._tag(self.model_chunk(chunk) - 1, True), "send_backward")

    def _send(self, tensor: torch.Tensor, peer: int, tag: int, purpose: str) -> None:
        tensor = tensor.detach().contiguous()
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise PipelineError(f"stage {self.stage} sends {tuple(tensor.shape)} {tensor.dtype}, but the pipeline "
                                f"exchanges {self.shape} {self.dtype} (micro_batch_size, local sequence, hidden)")
        # The handle keeps the tensor alive until the transfer is done.
        self._pending.append((isend(tensor, peer, self.group, purpose=purpose, tag=tag), tensor))

    def finish(self) -> None:
        """Wait for every outstanding send (end of the step's schedule)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []


# ---------------------------------------------------------------------------------------------
# Running a schedule


ForwardStep = Callable[[int, int, Optional[torch.Tensor]], torch.Tensor]
"""(local chunk, microbatch, received input or None) -> output activation, or the scaled loss on the last model chunk."""


def run_schedule(order: Sequence[Action], comm: StageComm, forward_step: ForwardStep,
                 before_backward: Optional[Callable[[int, int], None]] = None) -> None:
    """Execute `order`: forwards receive, compute and send; backwards receive, run autograd and send.

    The last model chunk's forward output is the loss already divided by the global token count,
    so its backward is `backward(loss)`; other chunks run `backward(output, received grad)`.
    `before_backward(chunk, microbatch)` runs just before each backward (the trainer marks the
    last backward of each chunk for the DP gradient buffer there). A microbatch's activations are
    dropped as soon as its backward has run.
    """
    in_flight: dict[tuple[int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
    for action in order:
        key = (action.chunk, action.microbatch)
        if action.kind == FORWARD:
            stage_input = comm.recv_forward(action.chunk)
            start = time.perf_counter()
            output = forward_step(action.chunk, action.microbatch, stage_input)
            comm.compute_seconds += time.perf_counter() - start
            comm.send_forward(output, action.chunk)
            in_flight[key] = (stage_input, output)
            continue
        stage_input, output = in_flight.pop(key)
        output_grad = comm.recv_backward(action.chunk)
        if before_backward is not None:
            before_backward(action.chunk, action.microbatch)
        start = time.perf_counter()
        torch.autograd.backward(output, output_grad)
        comm.compute_seconds += time.perf_counter() - start
        comm.send_backward(None if stage_input is None else stage_input.grad, action.chunk)
    if in_flight:
        raise PipelineError(f"schedule ended with forwards never run backward: {sorted(in_flight)}")
    comm.finish()


def one_f_one_b(comm: StageComm, microbatches: int, forward_step: ForwardStep,
                before_backward: Optional[Callable[[int, int], None]] = None) -> None:
    """Run 1F1B for this stage (one chunk) over `microbatches` microbatches."""
    run_schedule(one_f_one_b_order(comm.group.size, comm.stage, microbatches), comm, forward_step, before_backward)


def interleaved_one_f_one_b(comm: StageComm, microbatches: int, forward_step: ForwardStep,
                            before_backward: Optional[Callable[[int, int], None]] = None) -> None:
    """Run interleaved 1F1B for this stage's `comm.virtual_stages` chunks over `microbatches` microbatches."""
    order = interleaved_order(comm.group.size, comm.stage, microbatches, comm.virtual_stages)
    run_schedule(order, comm, forward_step, before_backward)
