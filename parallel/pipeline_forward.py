"""A forward-only pass through the pipeline (evaluation): no backward, no activations kept.

Megatron runs validation through its schedules with forward_only=True; here the order is plain
arithmetic: each stage runs, microbatch after microbatch, the forwards of its chunks in model
order (chunk c of stage r is model chunk c*pp + r, parallel/pipeline.py). Its p2p plan follows
`pipeline.p2p_plan`'s rule: the batch before each forward holds the send the previous forward
produced and the receive this one needs, so the messages travel as one chain in model-chunk order
and, with sends that block until received and no tags, cannot deadlock (tests replay the plans
with parallel/p2p_check.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from parallel.pipeline import FORWARD, Action, Exchange, Message, StageComm


def forward_only_order(microbatches: int, virtual_stages: int = 1) -> list[Action]:
    """A stage's forwards: for each microbatch, its chunks in model order."""
    return [Action(FORWARD, c, j) for j in range(microbatches) for c in range(virtual_stages)]


def forward_only_plan(pp: int, stage: int, microbatches: int, virtual_stages: int = 1) -> list:
    """The stage's forwards with the p2p batches between them (a list of Action and Exchange)."""
    chunks = pp * virtual_stages
    plan: list = []
    sends: tuple = ()
    for action in forward_only_order(microbatches, virtual_stages):
        k, j = action.chunk * pp + stage, action.microbatch
        recvs = (Message(FORWARD, k, j),) if k > 0 else ()
        if sends or recvs:
            plan.append(Exchange(sends, recvs))
        plan.append(action)
        sends = (Message(FORWARD, k + 1, j),) if k < chunks - 1 else ()
    if sends:
        plan.append(Exchange(sends, ()))
    return plan


def run_forward_only(comm: StageComm, microbatches: int,
                     forward_step: Callable[[int, int, Optional[torch.Tensor]], torch.Tensor]) -> None:
    """Execute the forward-only plan: forward_step(chunk, microbatch, received input or None) runs
    each forward (its output is sent on unless it is the last model chunk's)."""
    inbox: dict = {}
    outbox: dict = {}
    pp = comm.group.size
    for step in forward_only_plan(pp, comm.stage, microbatches, comm.virtual_stages):
        if isinstance(step, Exchange):
            inbox.update(comm.exchange(step, outbox))
            continue
        k = comm.model_chunk(step.chunk)
        stage_input = None if comm.is_first(step.chunk) else inbox.pop(Message(FORWARD, k, step.microbatch))
        output = forward_step(step.chunk, step.microbatch, stage_input)
        if not comm.is_last(step.chunk):
            outbox[Message(FORWARD, k + 1, step.microbatch)] = output
