"""Expert parallelism: routed tokens go to the rank that holds their expert and come back (all-to-all).

The EP group's member i holds experts [i * E_local, (i + 1) * E_local). A rank hands `dispatch`
its routed token copies sorted by global expert id with the per-expert counts; two all-to-alls
follow (Megatron's alltoall token dispatcher): the counts, so every rank knows how many rows it
receives from whom for each of its experts, then the rows themselves. Received rows arrive
grouped by source rank; `dispatch` regroups them by local expert, so each expert sees one
contiguous block. `combine` undoes both steps. Every step is differentiable: gradients travel
back the same way. With one member both are identities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parallel.collectives import Group, all_to_all
from parallel.mappings import all_to_all_autograd


@dataclass
class DispatchPlan:
    """What `combine` needs to send expert outputs back: the splits and the regrouping order."""

    sent: list
    received: list
    order: Tensor  # received rows (by source, then expert) -> rows grouped by local expert


class ExpertParallelDispatcher:
    """Token exchange for `num_experts` experts spread evenly over `group` (see the module doc)."""

    def __init__(self, group: Group, num_experts: int):
        if num_experts % group.size:
            raise ValueError(f"{num_experts} experts cannot be spread evenly over {group.size} ranks")
        self.group = group
        self.num_experts = num_experts
        self.local_experts = num_experts // group.size
        self.first_expert = group.rank * self.local_experts

    def dispatch(self, rows: Tensor, counts: Tensor) -> tuple[Tensor, list, DispatchPlan]:
        """rows [N, h] sorted by global expert, counts [E] -> (rows for this rank's experts grouped
        by local expert, rows per local expert, the plan for `combine`)."""
        ep, local = self.group.size, self.local_experts
        counts = counts.to(torch.int64)
        # received[src, e]: rows that member src routes to this rank's local expert e.
        received = all_to_all(counts.view(ep, local), [1] * ep, [1] * ep, self.group, purpose="ep_counts")
        send = counts.view(ep, local).sum(1).tolist()
        recv = received.sum(1).tolist()
        rows = all_to_all_autograd(rows, recv, send, self.group, purpose="ep_dispatch")
        # Row k arrived in segment (src, e); a stable sort on (e, src) groups rows by local expert
        # and keeps every source's rows in their original order.
        segment = torch.arange(ep * local, device=rows.device).view(ep, local).t().reshape(-1)
        rank_of_segment = torch.empty_like(segment)
        rank_of_segment[segment] = torch.arange(ep * local, device=rows.device)
        key = torch.repeat_interleave(rank_of_segment, received.reshape(-1).to(rows.device))
        order = torch.argsort(key, stable=True)
        return rows[order], received.sum(0).tolist(), DispatchPlan(send, recv, order)

    def combine(self, rows: Tensor, plan: DispatchPlan) -> Tensor:
        """Expert outputs grouped by local expert -> this rank's routed rows, in `dispatch`'s input order."""
        back = torch.empty_like(rows).index_copy(0, plan.order, rows)  # row order[k] <- row k
        return all_to_all_autograd(back, plan.sent, plan.received, self.group, purpose="ep_combine")
