"""Context parallelism: the sequence split over the 'cp' group, attention computed as a ring.

Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers") in the
load-balanced form of Megatron-Core / Transformer Engine's context parallelism: the sequence of
s tokens is cut into 2*cp chunks of n = s / (2*cp) tokens and CP rank r holds chunks r and
2*cp-1-r ("zigzag"). Under a causal mask an early chunk attends to few keys and a late one to
many, so pairing the i-th chunk from the front with the i-th from the back gives every rank the
same work. Everything outside attention is token-wise, so only attention communicates: each
rank keeps its queries and passes its K/V block around the ring (send to the next rank, receive
from the previous), cp-1 times.

Which keys a query chunk sees depends only on chunk order. At ring step i rank r holds the K/V
of source rank j = (r - i) mod cp, i.e. chunks j and 2cp-1-j:
- j == r (step 0): my own chunks. Local token order is increasing in position, so this is plain
  causal attention over the 2n local tokens.
- j <  r: j < r < 2cp-1-r < 2cp-1-j. The source's first chunk precedes both of mine, its second
  follows both: both my chunks see the first half of the K/V block fully, none of the second.
- j >  r: r < j <= cp-1 < 2cp-1-j < 2cp-1-r. Both source chunks follow my first chunk and precede
  my second: my second chunk (the second half of my queries) sees the whole K/V block fully.
So every off-diagonal block is an unmasked n x 2n or 2n x n attention, 2n^2 query-key pairs,
about as many as the causal diagonal block keeps, on every rank and at every step.

Each block runs the fused attention kernel in the model's dtype (parallel/block_attention.py:
ATen's flash attention on CPU) and returns its log-sum-exp; blocks are merged by it (online
softmax) in fp32 (fp64 inputs stay fp64, which lets tests compare with the full-sequence attention
to ~1e-12). The backward runs the ring again with each block's flash backward fed the saved
*final* output and LSE, which makes every block's gradients its exact share: K/V travel as in
forward, and a dK/dV accumulator (fp32) for each block travels with it, picking up every other
rank's contribution and arriving back at its owner after cp-1 hops. Only the rank's own q, k, v,
output and LSE are saved; autograd through the ring would keep every rank's K/V, which is
exactly what ring attention avoids.

The ring's messages follow NCCL's rules (`ring_plan`): each step is one batch that sends to the
next rank and receives from the previous one together (Transformer Engine's and Megatron's
send-recv pairs), with no tags, and the dK/dV accumulators travel in the same batches as the
next K/V, so at cp=2, where both neighbours are one peer, nothing waits on a lone send.

Traffic per attention call on each rank (booked under group 'cp', sender side), with
B_kv = b * (s/cp) * kv_heads * d * element_size the bytes of the local K (or V):
    forward   'ring_kv'           (cp-1) * 2 * B_kv
    backward  'ring_kv_backward'  (cp-1) * 2 * B_kv     (K/V again)
              'ring_dkv'          (cp-1) * 2 * B_kv * max(4, element_size) / element_size
                                  (the accumulators are fp32, or fp64 for fp64 inputs)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from parallel.block_attention import BlockMask, block_backward, block_forward, compute_dtype, merge_into
from parallel.collectives import P2P, RECV, SEND, Group, batch_isend_irecv


# ---------------------------------------------------------------------------------------------
# The load-balanced (zigzag) split of the sequence


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """Indices of the two sequence chunks (of 2*cp_size) that CP rank `cp_rank` holds."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in 0..{cp_size - 1} (cp_size={cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def split_for_context_parallel(tensor: Tensor, dim: int, cp_rank: int, cp_size: int) -> Tensor:
    """This CP rank's part of `tensor` along `dim`: chunks r and 2*cp-1-r of 2*cp, concatenated."""
    if cp_size == 1:
        return tensor
    length = tensor.shape[dim]
    if length % (2 * cp_size):
        raise ValueError(f"context-parallel split along dim {dim}: length {length} is not divisible "
                         f"by 2*cp = {2 * cp_size} (load-balanced chunks)")
    chunks = tensor.chunk(2 * cp_size, dim=dim)
    first, second = zigzag_chunks(cp_rank, cp_size)
    return torch.cat((chunks[first], chunks[second]), dim=dim)


def context_parallel_positions(seq_length: int, cp_rank: int, cp_size: int,
                               device: torch.device | str = "cpu") -> Tensor:
    """Global token positions [2 * seq_length / (2*cp)] of this CP rank's tokens (for RoPE)."""
    return split_for_context_parallel(torch.arange(seq_length, device=device), 0, cp_rank, cp_size)


def merge_context_parallel_shards(shards: Sequence[Tensor], dim: int) -> Tensor:
    """Inverse of `split_for_context_parallel`: every CP rank's part, in rank order -> the full tensor."""
    cp_size = len(shards)
    chunks: list = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        first, second = zigzag_chunks(rank, cp_size)
        chunks[first], chunks[second] = shard.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def document_work_shares(document_ids: Tensor, cp_size: int) -> list[float]:
    """Each CP rank's fraction of the unmasked query-key pairs of causal attention within documents
    (document_ids [b, s]: a query sees the earlier keys of its document) under the zigzag split.
    With one document per row every rank gets 1/cp; short documents move the balance, which
    this measures (tests/test_parity_documents.py prints it)."""
    ids = document_ids.long()
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    # A query's work is the keys of its document up to itself: its offset in the document + 1.
    first = torch.cummax(torch.where(start, positions, torch.zeros_like(positions)), dim=1).values
    work = (positions - first + 1).double()
    total = float(work.sum())
    return [float(split_for_context_parallel(work, 1, r, cp_size).sum()) / total for r in range(cp_size)]


# ---------------------------------------------------------------------------------------------
# Which blocks see each other


def _visible(step: int, cp_rank: int, cp_size: int, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) that see each other at ring `step` (see the module docstring)."""
    source = (cp_rank - step) % cp_size
    if source == cp_rank:
        return slice(None), slice(None), True
    if source < cp_rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


SKIP = "skip"
"""A ring block in which no query sees a key (documents that do not meet): its kernel is not run."""


def ring_document_masks(document_ids: Tensor, cp_rank: int, cp_size: int, dtype: torch.dtype) -> list:
    """Per ring step, what document masking leaves of the visible block (`_visible`): None (every
    pair of it is seen: the plain kernel), SKIP (no pair: no kernel), or a BlockMask.

    document_ids [b, s] are the full sequence's (every CP rank holds them: they are the sample's,
    a few bytes per token, so nothing travels with the K/V); the source rank's chunks are cut from
    them as its tokens were, so a key's document and position cross the split exactly. Built once
    per forward and shared by every layer (one host sync per ring step for SKIP / all-visible).
    """
    half = document_ids.shape[1] // cp_size // 2
    mine = split_for_context_parallel(document_ids, 1, cp_rank, cp_size)
    masks = []
    for step in range(cp_size):
        source = (cp_rank - step) % cp_size
        rows, keys, causal = _visible(step, cp_rank, cp_size, half)
        theirs = split_for_context_parallel(document_ids, 1, source, cp_size)
        visible = mine[:, rows, None] == theirs[:, None, keys]
        if causal:  # the diagonal block: local order is position order, so causal is the lower triangle
            visible &= torch.ones(visible.shape[-2:], dtype=torch.bool, device=visible.device).tril_()
            masks.append(BlockMask.from_visible(visible, dtype))
        elif not bool(visible.any()):
            masks.append(SKIP)
        else:
            masks.append(None if bool(visible.all()) else BlockMask.from_visible(visible, dtype))
    return masks


# ---------------------------------------------------------------------------------------------
# The ring


KV, DKV = "kv", "dkv"
"""The two messages of the ring: a K/V block, and a block's dK/dV accumulator (backward only)."""


def ring_plan(cp_size: int, backward: bool) -> list[tuple[str, ...]]:
    """The batches of one ring pass: entry i is what every rank sends to the next rank and receives
    from the previous one, in that order, in the batch posted at the start of ring step i (its
    transfer overlaps step i's block); in backward one more entry follows the last step.

    Forward: the K/V for step i+1 (none at the last step). Backward: the same K/V, and from step 2
    on the accumulator of the block held at step i-1 (the block a rank first sees at step 1 starts
    its accumulator there); the batch after the last step brings every accumulator home. Each
    batch is one send and one receive per message with the same peers on every rank, so at cp=2,
    where the next and the previous rank are one peer, the two ranks post facing sends in one batch
    together with the receives each waits for (NCCL's grouped p2p cannot deadlock on that).
    """
    plan = [tuple(([KV] if step < cp_size - 1 else []) + ([DKV] if backward and step >= 2 else []))
            for step in range(cp_size)]
    return plan + [(DKV,)] if backward and cp_size > 1 else plan


class _RingBatch:
    """One posted ring batch: tensors sent to the next rank, buffers filled from the previous one."""

    def __init__(self, group: Group, messages: tuple[str, ...], tensors: dict, purposes: dict):
        self.messages = messages
        self.received = {name: torch.empty_like(tensors[name]) for name in messages}
        following, preceding = (group.rank + 1) % group.size, (group.rank - 1) % group.size
        ops = [P2P(SEND, tensors[name], following, purposes[name]) for name in messages]
        ops += [P2P(RECV, self.received[name], preceding) for name in messages]
        self._works = batch_isend_irecv(ops, group)

    def wait(self) -> dict:
        """Block until the whole batch is done; returns {message: received tensor}."""
        for work in self._works:
            work.wait()
        return self.received


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: Group, masks: Optional[list]) -> Tensor:
        s_local, d = q.shape[2], q.shape[3]
        scale = 1.0 / math.sqrt(d)
        half = s_local // 2
        compute = compute_dtype(q.dtype)
        kv = torch.stack((k, v)).contiguous()  # one message per step
        out = lse = None
        for step, messages in enumerate(ring_plan(group.size, backward=False)):
            batch = _RingBatch(group, messages, {KV: kv}, {KV: "ring_kv"})  # overlaps this block's kernel
            rows, keys, causal = _visible(step, group.rank, group.size, half)
            mask = None if masks is None else masks[step]
            if mask is not SKIP:  # a skipped block's K/V still travels: every rank keeps the ring's plan
                block_out, block_lse = block_forward(q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys], scale,
                                                     causal and mask is None, mask=mask)
                if out is None:  # step 0: the causal diagonal block covers every query row (each sees itself)
                    out, lse = block_out.to(compute), block_lse.to(compute)
                else:
                    merge_into(out[:, :, rows], lse[:, :, rows], block_out.to(compute), block_lse.to(compute))
            kv = batch.wait().get(KV, kv)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.masks = group, scale, masks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, masks = ctx.group, ctx.scale, ctx.masks
        half = q.shape[2] // 2
        compute = compute_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros(q.shape, dtype=compute, device=q.device)
        kv = torch.stack((k, v)).contiguous()
        plan = ring_plan(group.size, backward=True)
        purposes = {KV: "ring_kv_backward", DKV: "ring_dkv"}
        own_grad_kv = finished = None  # finished: the accumulator of the previous step's block, to pass on
        for step in range(group.size):
            batch = _RingBatch(group, plan[step], {KV: kv, DKV: finished}, purposes)
            rows, keys, causal = _visible(step, group.rank, group.size, half)
            mask = None if masks is None else masks[step]
            # dK/dV of the K/V block held at this step: [2, b, hkv, s_local, d], accumulated in fp32.
            grad_kv = torch.zeros((2, *k.shape), dtype=compute, device=k.device)
            if mask is not SKIP:  # a skipped block adds nothing, but its accumulator travels on
                # Each block's backward takes the final output and LSE, so its gradients are exact shares.
                block_dq, block_dk, block_dv = block_backward(
                    grad_out[:, :, rows], q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys], out[:, :, rows],
                    lse[:, :, rows], scale, causal and mask is None, mask=mask)
                grad_q[:, :, rows] += block_dq
                grad_kv[0, :, :, keys] = block_dk
                grad_kv[1, :, :, keys] = block_dv
            received = batch.wait()
            if step == 0:
                own_grad_kv = grad_kv
            else:
                # The accumulator of this block arrived from the previous rank (none at step 1,
                # where the block is first seen by a non-owner); add to it and pass it on next.
                if DKV in received:
                    grad_kv += received[DKV]
                finished = grad_kv
            kv = received.get(KV, kv)
        if group.size > 1:  # the batch after the last step: every accumulator reaches its owner
            own_grad_kv += _RingBatch(group, plan[-1], {DKV: finished}, purposes).wait()[DKV]
        return grad_q.to(q.dtype), own_grad_kv[0].to(k.dtype), own_grad_kv[1].to(v.dtype), None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: Group, masks: Optional[list] = None) -> Tensor:
    """Causal attention of this CP rank's zigzag tokens over the whole sequence, as a ring.

    q [b, hq, s/cp, d], k/v [b, hkv, s/cp, d] (hq a multiple of hkv: grouped-query attention),
    holding chunks r and 2cp-1-r of the sequence in that order (`split_for_context_parallel`).
    Returns [b, hq, s/cp, d], equal to those rows of causal attention over the full sequence;
    with `masks` (`ring_document_masks`), of causal attention within each document.
    """
    if q.shape[2] % 2:
        raise ValueError(f"ring attention needs an even local sequence (two zigzag chunks), got {q.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    return _RingAttention.apply(q, k, v, group, masks)


class RingAttention:
    """Attention core (engine.model.decoder.Attention.core) bound to a CP group: `core(q, k, v)`, or
    `core(q, k, v, documents)` with the full sequence's document ids and a per-forward cache."""

    takes_documents = True
    """The decoder hands this core the document ids itself (the local core is swapped for document attention)."""

    def __init__(self, group: Group):
        self.group = group

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, documents=None) -> Tensor:
        masks = None
        if documents is not None:  # engine.model.document_attention.DocumentSegments: ids and a cache
            key = ("ring_masks", self.group.rank, self.group.size, q.dtype, q.device)
            if key not in documents.cache:  # once per forward, shared by every layer
                documents.cache[key] = ring_document_masks(documents.ids.to(q.device), self.group.rank,
                                                           self.group.size, q.dtype)
            masks = documents.cache[key]
        return ring_attention(q, k, v, self.group, masks)

    def __repr__(self) -> str:
        return f"RingAttention(cp={self.group.size})"
