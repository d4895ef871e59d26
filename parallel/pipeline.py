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

Point-to-point follows NCCL's rules, not gloo's: no tags (NCCL ignores them; messages between two
ranks match in posting order) and sends that may block until the peer receives. `p2p_plan` turns
an order into batches that a stage posts together and waits for (Megatron-Core's combined
send-and-receive calls), and `run_schedule` executes exactly that plan, so what
`parallel.p2p_check` proves deadlock-free and matched is what runs. The time blocked in those
batches is the rank's pipeline bubble (`StageComm.wait_seconds`). `simulate` replays the orders
with unit costs and free communication, which gives the bubble the schedule implies on ideal
hardware.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch.autograd.graph import get_gradient_edge

from parallel.collectives import P2P, RECV, SEND, Group, batch_isend_irecv

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


def warmup_forwards(pp: int, rank: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Forwards stage `rank` runs before its first backward: pp - r - 1 for 1F1B,
    2*(pp - r - 1) + (v - 1)*pp interleaved, at most all of them."""
    if virtual_stages == 1:
        return min(pp - rank - 1, microbatches)
    return min(2 * (pp - rank - 1) + (virtual_stages - 1) * pp, microbatches * virtual_stages)


def one_f_one_b_order(pp: int, rank: int, microbatches: int) -> list[Action]:
    """PipeDream-flush 1F1B (Narayanan et al. 2021, fig. 4 top): warm-up forwards, 1F1B, cool-down.

    Stage r runs pp - r - 1 warm-up forwards, so at most pp - r microbatches are in flight.
    """
    m = microbatches
    warmup = warmup_forwards(pp, rank, m, 1)
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

    warmup = warmup_forwards(pp, rank, m, v)
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
# Point-to-point plan: the schedule's messages, batched as NCCL needs them


class Message(NamedTuple):
    """One tensor crossing a stage boundary: the activation into (F) or the gradient out of (B)
    model chunk `model_chunk` for `microbatch`, named by its receiving model chunk."""

    kind: str
    model_chunk: int
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}>{self.model_chunk}.{self.microbatch}"


class Exchange(NamedTuple):
    """One batch of p2p ops that a stage posts together and waits for: sends first, then receives."""

    sends: tuple
    recvs: tuple


def _units(order: Sequence[Action], pp: int, stage: int, virtual_stages: int) -> list[tuple[Action, ...]]:
    """The order cut into units that run without p2p in between: single actions, except that
    interleaved 1F1B runs each steady-state forward-backward pair as one unit."""
    if virtual_stages == 1:
        return [(action,) for action in order]
    total = len(order) // 2
    warmup = warmup_forwards(pp, stage, total // virtual_stages, virtual_stages)
    steady = range(warmup, warmup + 2 * (total - warmup), 2)
    if any(order[i].kind != FORWARD or order[i + 1].kind != BACKWARD for i in steady):
        raise PipelineError(f"stage {stage}: order {list(order)} is not interleaved 1F1B with {warmup} warm-up forwards")
    units = [(action,) for action in order[:warmup]] + [(order[i], order[i + 1]) for i in steady]
    return units + [(action,) for action in order[warmup + 2 * (total - warmup):]]


def p2p_plan(order: Sequence[Action], pp: int, stage: int, virtual_stages: int) -> list:
    """The stage's actions with the p2p batches between them: a list of Action and Exchange.

    The batch before each unit of actions holds the sends that the previous unit produced and the
    receives that this unit needs, and a last batch holds the final sends. 1F1B's units are
    single actions (Megatron-Core's send_forward_recv_backward / send_backward_recv_forward);
    interleaved 1F1B runs each steady-state forward-backward pair as one unit (Megatron-Core's
    send_forward_backward_recv_forward_backward): with v chunks per stage, a lone send after the
    pair's forward could face the peer's lone send. With sends that block until received and no
    tags (NCCL), a batch that also holds the receive its peer is waiting for cannot deadlock that
    way; `parallel.p2p_check` replays every stage's plan under those rules.
    """
    chunks = pp * virtual_stages
    plan: list = []
    sends: tuple = ()
    for unit in _units(order, pp, stage, virtual_stages):
        recvs, produced = [], []
        for action in unit:
            k, j = action.chunk * pp + stage, action.microbatch
            if action.kind == FORWARD:
                recvs += [Message(FORWARD, k, j)] if k > 0 else []
                produced += [Message(FORWARD, k + 1, j)] if k < chunks - 1 else []
            else:
                recvs += [Message(BACKWARD, k, j)] if k < chunks - 1 else []
                produced += [Message(BACKWARD, k - 1, j)] if k > 0 else []
        if sends or recvs:
            plan.append(Exchange(sends, tuple(recvs)))
        plan.extend(unit)
        sends = tuple(produced)
    if sends:
        plan.append(Exchange(sends, ()))
    return plan


def message_peers(message: Message, pp: int) -> tuple[int, int]:
    """(sending stage, receiving stage) of `message`: model chunk k lives on stage k mod pp."""
    sender = message.model_chunk - 1 if message.kind == FORWARD else message.model_chunk + 1
    return sender % pp, message.model_chunk % pp


class StageComm:
    """Activations forward and gradients backward between this stage and its neighbours.

    Shapes are known in advance ([b, s_local, h] in `dtype`, on `device`), so nothing but the
    payload is sent. Model chunk k = chunk*pp + stage sends to k+1 on the next stage (wrapping from
    the last stage to the first for the next virtual chunk). `exchange` posts one `Exchange` of the
    plan as one batch (no tags: messages between two ranks match in the order posted, which the
    plan keeps equal on both sides) and waits for it; every send is booked in the 'pp' ledger as
    'send_forward' or 'send_backward'. `wait_seconds` accumulates the time spent blocked in
    exchanges, `compute_seconds` (kept by `run_schedule`) the forwards and backwards.
    """

    def __init__(self, group: Group, virtual_stages: int, shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device):
        self.group, self.stage, self.virtual_stages = group, group.rank, virtual_stages
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.num_model_chunks = group.size * virtual_stages
        self.wait_seconds = 0.0
        self.compute_seconds = 0.0

    def model_chunk(self, chunk: int) -> int:
        """Global model-chunk index of local `chunk`."""
        return chunk * self.group.size + self.stage

    def is_first(self, chunk: int) -> bool:
        """True for model chunk 0 (its input is tokens, not a received activation)."""
        return self.model_chunk(chunk) == 0

    def is_last(self, chunk: int) -> bool:
        """True for the last model chunk (its output is the loss)."""
        return self.model_chunk(chunk) == self.num_model_chunks - 1

    def exchange(self, step: Exchange, outbox: dict) -> dict:
        """Post `step`'s sends (tensors taken from `outbox`, keyed by Message) and receives as one
        batch, wait for all of them, and return {Message: received tensor}."""
        ops = []
        for message in step.sends:
            tensor = outbox.pop(message).detach()
            if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype or tensor.device != self.device:
                raise PipelineError(
                    f"stage {self.stage} sends {message!r} as {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, "
                    f"but the pipeline exchanges {self.shape} {self.dtype} on {self.device} "
                    f"(micro_batch_size, local sequence, hidden)")
            peer = message_peers(message, self.group.size)[1]
            purpose = "send_forward" if message.kind == FORWARD else "send_backward"
            ops.append(P2P(SEND, tensor.contiguous(), peer, purpose))
        received = {}
        for message in step.recvs:
            received[message] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(P2P(RECV, received[message], message_peers(message, self.group.size)[0]))
        start = time.perf_counter()
        for work in batch_isend_irecv(ops, self.group):
            work.wait()
        self.wait_seconds += time.perf_counter() - start
        return received


# ---------------------------------------------------------------------------------------------
# Running a schedule


ForwardStep = Callable[[int, int, Optional[torch.Tensor]], torch.Tensor]
"""(local chunk, microbatch, received input or None) -> output activation, or the scaled loss on the last model chunk."""


def release_sent_output(output: torch.Tensor) -> bool:
    """Free the data of a stage output whose send has completed (Megatron-Core's
    deallocate_output_tensor): its backward needs only its autograd node, run through the gradient
    edge taken at forward. Kept when the node saves the output itself (an exp-like last op, or a
    custom Function holding it) or when it is a view (freeing would not release the base); returns
    whether the data was freed."""
    node = output.grad_fn
    if node is None or output._base is not None or hasattr(node, "_saved_result"):
        return False
    try:
        saved = getattr(node, "saved_tensors", ())
    except RuntimeError:  # already released: nothing of it can be the output
        saved = ()
    if any(t.untyped_storage().data_ptr() == output.untyped_storage().data_ptr() for t in saved):
        return False
    output.data = torch.empty((1,), dtype=output.dtype, device=output.device)
    return True


def run_schedule(order: Sequence[Action], comm: StageComm, forward_step: ForwardStep,
                 before_backward: Optional[Callable[[int, int], None]] = None, free_sent_outputs: bool = True) -> None:
    """Execute `order` through its `p2p_plan`: exchanges, forwards and backwards in the plan's order.

    A forward takes its received input (none on model chunk 0), runs `forward_step` and leaves its
    output for the next exchange; a backward takes the received gradient of its output (none on the
    last model chunk, whose output is the loss already divided by the global token count, so its
    backward is `backward(loss)`), runs autograd and leaves its input's gradient for the next
    exchange. `before_backward(chunk, microbatch)` runs just before each backward (the trainer
    marks the last backward of each chunk for the DP gradient buffer there). With
    `free_sent_outputs`, an output's data is freed once its send completed (`release_sent_output`),
    so a stage holds at most one unsent output instead of every in-flight microbatch's; the rest
    of a microbatch's activations are dropped as soon as its backward has run.
    """
    pp, stage = comm.group.size, comm.stage
    in_flight: dict[tuple[int, int], tuple] = {}  # (chunk, microbatch) -> (input, output, output's edge)
    inbox: dict = {}
    outbox: dict = {}
    for step in p2p_plan(order, pp, stage, comm.virtual_stages):
        if isinstance(step, Exchange):
            sent = [outbox[m] for m in step.sends if m.kind == FORWARD]
            inbox.update(comm.exchange(step, outbox))
            for output in sent if free_sent_outputs else ():
                release_sent_output(output)
            continue
        key = (step.chunk, step.microbatch)
        k = comm.model_chunk(step.chunk)
        if step.kind == FORWARD:
            stage_input = None if comm.is_first(step.chunk) else inbox.pop(Message(FORWARD, k, step.microbatch))
            if stage_input is not None:
                stage_input.requires_grad_()
            start = time.perf_counter()
            output = forward_step(step.chunk, step.microbatch, stage_input)
            comm.compute_seconds += time.perf_counter() - start
            edge = None
            if not comm.is_last(step.chunk):
                outbox[Message(FORWARD, k + 1, step.microbatch)] = output
                edge = get_gradient_edge(output)  # backward through it even once the data is freed
            in_flight[key] = (stage_input, output, edge)
            continue
        stage_input, output, edge = in_flight.pop(key)
        output_grad = None if comm.is_last(step.chunk) else inbox.pop(Message(BACKWARD, k, step.microbatch))
        if before_backward is not None:
            before_backward(step.chunk, step.microbatch)
        start = time.perf_counter()
        torch.autograd.backward(output if edge is None else edge, output_grad)
        comm.compute_seconds += time.perf_counter() - start
        if not comm.is_first(step.chunk):
            outbox[Message(BACKWARD, k - 1, step.microbatch)] = stage_input.grad
        del stage_input, output, output_grad, edge  # or they would live on until the next forward
    if in_flight or inbox or outbox:
        raise PipelineError(f"schedule ended with work left: forwards never run backward {sorted(in_flight)}, "
                            f"unused receives {sorted(inbox)}, unsent tensors {sorted(outbox)}")


def one_f_one_b(comm: StageComm, microbatches: int, forward_step: ForwardStep,
                before_backward: Optional[Callable[[int, int], None]] = None) -> None:
    """Run 1F1B for this stage (one chunk) over `microbatches` microbatches."""
    run_schedule(one_f_one_b_order(comm.group.size, comm.stage, microbatches), comm, forward_step, before_backward)


def interleaved_one_f_one_b(comm: StageComm, microbatches: int, forward_step: ForwardStep,
                            before_backward: Optional[Callable[[int, int], None]] = None) -> None:
    """Run interleaved 1F1B for this stage's `comm.virtual_stages` chunks over `microbatches` microbatches."""
    order = interleaved_order(comm.group.size, comm.stage, microbatches, comm.virtual_stages)
    run_schedule(order, comm, forward_step, before_backward)
