"""ZeRO stages 1 and 2 over the data-parallel group (Rajbhandari et al. 2019, arXiv 1910.02054).

Megatron's distributed optimizer is the model. Parameters are laid out in reverse registration
order (the order backward produces their gradients) in flat buffers cut into buckets of about
`bucket_bytes`; each bucket is padded to a multiple of the DP size N_d and split into N_d equal
contiguous chunks, and DP rank r owns chunk r of every bucket (`ShardLayout`). A chunk may cut a
parameter in the middle, so the optimizer (parallel/zero_optimizer.py) works on flat pieces
(`Segment`s), never on whole parameters. The model's parameters become views of one flat
parameter buffer with the same layout, so the updated chunks are all-gathered straight into
the parameters.

Stage 1 (optimizer state sharded): the fp32 gradient buffer is full size and accumulates over
microbatches as in plain DP; in the last backward each complete bucket is reduce-scattered (in
place: the result lands in this rank's chunk) instead of all-reduced, overlapping with the rest
of backward. After the step each bucket's parameter chunk is all-gathered.
Traffic per step: reduce-scatter Psi + all-gather Psi = 2 Psi elements, whatever the number of
microbatches m. With overlap_param_gather (parallel.overlap_param_gather, Megatron's
--overlap-param-gather) the all-gathers stay in flight after the step, and each module waits for
its own buckets' gather when its next forward starts, so the gather of later layers hides behind
the forward of earlier ones.

Stage 2 (gradients sharded too): the only persistent gradient storage is this rank's shard
(Psi / N_d fp32). A bucket's full-size buffer exists only while its gradients of one microbatch
are being accumulated: as soon as the bucket is complete it is reduce-scattered into a
chunk-sized temporary, which is added into the shard when the collective has finished, and the
bucket buffer is released. Like DeepSpeed's stage 2, this reduces every microbatch (there is no
full buffer to accumulate in), so the traffic is reduce-scatter m Psi + all-gather Psi =
(m + 1) Psi elements per step: 2 Psi at m = 1, as in the paper.

reduce_dtype=bf16 (optim.grad_reduce_dtype) reduce-scatters a bf16 copy of each bucket (half the
bytes) and writes the summed chunk back into the fp32 gradients (stage 1) or adds it into the
fp32 shard (stage 2), so accumulation stays fp32 as in Megatron's --grad-reduce-in-bf16.

Psi counts the padded layout (padding elements travel too); `ShardLayout.padding` says how many.
Gradients are summed over the group, not averaged (the loss is divided by the global token
count), exactly as in parallel/data_parallel.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from parallel.collectives import Group, all_gather, reduce_scatter


def unique_trainable(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """Trainable (name, param) pairs with shared tensors (tied weights) kept once, in order."""
    seen, unique = set(), []
    for name, p in named_params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append((name, p))
    return unique


def cut_into_buckets(named_params: list[tuple[str, nn.Parameter]], bucket_bytes: int,
                     elem_bytes: int = 4) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive groups of parameters, each closed once it holds at least `bucket_bytes` of gradient."""
    buckets, current, size = [], [], 0
    for name, p in named_params:
        current.append((name, p))
        size += p.numel() * elem_bytes
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


@dataclass
class Segment:
    """The piece of one parameter that one DP rank owns: flat elements [param_offset, +length)."""

    name: str
    param: nn.Parameter
    bucket: int
    param_offset: int
    """First owned element of the flattened parameter."""
    length: int
    local_offset: int
    """Where the piece starts in this rank's flat shard (chunks of all buckets, concatenated)."""
    chunk_offset: int
    """Where the piece starts inside its bucket's chunk."""


class ShardLayout:
    """Buckets of parameters in a flat buffer, each padded to a multiple of N_d and split N_d ways.

    `buckets` are lists of (name, param). Bucket b occupies [starts[b], starts[b] + sizes[b]) of
    the flat buffer (sizes are padded); DP rank r owns its chunk r, of sizes[b] / N_d elements.
    """

    def __init__(self, buckets: list[list[tuple[str, nn.Parameter]]], dp_size: int):
        self.buckets = buckets
        self.dp_size = dp_size
        self.starts, self.sizes = [], []
        self.offsets: dict[int, int] = {}  # id(param) -> offset in the flat buffer
        offset = 0
        for bucket in buckets:
            start = offset
            for _, p in bucket:
                self.offsets[id(p)] = offset
                offset += p.numel()
            padded = -(-(offset - start) // dp_size) * dp_size
            self.starts.append(start)
            self.sizes.append(padded)
            offset = start + padded
        self.numel = offset
        self.padding = self.numel - sum(p.numel() for bucket in buckets for _, p in bucket)

    def chunk_size(self, bucket: int) -> int:
        """Elements of one rank's chunk of `bucket`."""
        return self.sizes[bucket] // self.dp_size

    def chunk_range(self, bucket: int, rank: int) -> tuple[int, int]:
        """[start, end) of rank `rank`'s chunk of `bucket` in the flat buffer."""
        start = self.starts[bucket] + rank * self.chunk_size(bucket)
        return start, start + self.chunk_size(bucket)

    def shard_numel(self) -> int:
        """Elements of one rank's shard (its chunk of every bucket)."""
        return sum(self.chunk_size(b) for b in range(len(self.buckets)))

    def segments(self, rank: int) -> list[Segment]:
        """The non-empty pieces of parameters that `rank` owns, in shard order."""
        segments, local = [], 0
        for b, bucket in enumerate(self.buckets):
            lo, hi = self.chunk_range(b, rank)
            for name, p in bucket:
                start = self.offsets[id(p)]
                first, last = max(lo, start), min(hi, start + p.numel())
                if first < last:
                    segments.append(Segment(name, p, b, first - start, last - first, local + first - lo, first - lo))
            local += hi - lo
        return segments


def param_piece(flat: Tensor, layout: ShardLayout, segment: Segment) -> Tensor:
    """The slice of a layout-shaped flat buffer that holds `segment`."""
    start = layout.offsets[id(segment.param)] + segment.param_offset
    return flat[start:start + segment.length]


class ShardedGradBuffer:
    """Stage 1 or 2: gradients reduce-scattered per bucket during backward; parameters all-gathered
    after the step. Same step interface as GradBuffer: start_step(), is_last_microbatch, finish().

    After `finish()`, `grad_shard(segment)` is the DP-summed gradient of each owned segment.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], group: Group, stage: int,
                 bucket_bytes: int = 25 * 2**20, reduce_dtype: torch.dtype = torch.float32,
                 overlap_param_gather: bool = False):
        if stage not in (1, 2):
            raise ValueError(f"parallel.zero={stage}: ShardedGradBuffer implements stages 1 and 2")
        self.stage, self.group = stage, group
        self.reduce_dtype = reduce_dtype if group.size > 1 else torch.float32  # nothing to reduce at dp=1
        self.named_params = list(reversed(unique_trainable(named_params)))
        self.layout = ShardLayout(cut_into_buckets(self.named_params, bucket_bytes), group.size)
        self.segments = self.layout.segments(group.rank)
        params = [p for _, p in self.named_params]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"ZeRO needs one parameter dtype, found {sorted(map(str, dtypes))}")
        device = params[0].device
        # Parameters become views of one flat buffer, so the all-gather writes them directly.
        self.param_buffer = torch.zeros(self.layout.numel, dtype=params[0].dtype, device=device)
        with torch.no_grad():
            for p in params:
                view = self.param_buffer[self.layout.offsets[id(p)]:][:p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
        if stage == 1:
            self.grad_buffer: Optional[Tensor] = torch.zeros(self.layout.numel, dtype=torch.float32, device=device)
            self.shard: Optional[Tensor] = None
        else:
            self.grad_buffer = None
            self.shard = torch.zeros(self.layout.shard_numel(), dtype=torch.float32, device=device)
        n = len(self.layout.buckets)
        sizes = [self.layout.chunk_size(b) for b in range(n)]
        self._shard_starts = [sum(sizes[:b]) for b in range(n)]  # where bucket b's chunk sits in the shard
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.layout.buckets) for _, p in bucket}
        self._bucket_grads: list[Optional[Tensor]] = [None] * n  # stage 2: live only within a microbatch
        self._pending: list[set] = [set() for _ in range(n)]
        self._unwritten: list[set] = [set() for _ in range(n)]
        # (work handle, chunk it lands in, fp32 chunk to copy that into or None) of a launched reduce-scatter
        self._in_flight: list[Optional[tuple]] = [None] * n
        self._shard_written = [False] * n  # stage 2: this step's first reduced chunk is copied, later ones added
        self.is_last_microbatch = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]
        self.overlap_param_gather = overlap_param_gather
        self._gathers: list = [None] * n  # bucket b's parameter all-gather still in flight (overlap)

    # ------------------------------------------------------------------ gradients in backward

    def _chunk(self, flat: Tensor, bucket: int) -> Tensor:
        start, end = self.layout.chunk_range(bucket, self.group.rank)
        return flat[start - self.layout.starts[bucket]:end - self.layout.starts[bucket]]

    def _bucket_grad(self, b: int) -> Tensor:
        """The full-size gradient buffer of bucket b (allocated on demand at stage 2)."""
        if self.stage == 1:
            start = self.layout.starts[b]
            return self.grad_buffer[start:start + self.layout.sizes[b]]
        if self._bucket_grads[b] is None:
            self._complete(b)  # the previous microbatch's reduction of this bucket must land first
            data = torch.empty(self.layout.sizes[b], dtype=torch.float32, device=self.shard.device)
            used = sum(p.numel() for _, p in self.layout.buckets[b])
            data[used:].zero_()  # padding; every parameter's slot is written by its first gradient
            self._bucket_grads[b] = data
            self._unwritten[b] = set(id(p) for _, p in self.layout.buckets[b])
            self._pending[b] = set(self._unwritten[b])
        return self._bucket_grads[b]

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        b = self._bucket_of[id(param)]
        if self._in_flight[b] is not None and self.stage == 1:
            raise RuntimeError("ShardedGradBuffer: a gradient arrived after its bucket's reduce-scatter was launched; "
                               "run one backward per microbatch and set is_last_microbatch only for the last")
        data = self._bucket_grad(b)
        offset = self.layout.offsets[id(param)] - self.layout.starts[b]
        slot = data[offset:offset + param.numel()].view_as(param)
        if id(param) in self._unwritten[b]:
            slot.copy_(param.grad)  # first gradient: overwrite instead of zero + add
            self._unwritten[b].discard(id(param))
        else:
            slot.add_(param.grad)
        param.grad = None
        if self.stage == 1 and not self.is_last_microbatch:
            return
        self._pending[b].discard(id(param))
        if not self._pending[b]:
            self._launch(b)

    def _launch(self, b: int) -> None:
        """Reduce-scatter bucket b's gradient; stage 1 in place, stage 2 into a temporary chunk."""
        data = self._bucket_grad(b)
        for _, p in self.layout.buckets[b]:  # parameters that got no gradient contribute zeros
            if id(p) in self._unwritten[b]:
                offset = self.layout.offsets[id(p)] - self.layout.starts[b]
                data[offset:offset + p.numel()].zero_()
        self._unwritten[b] = set()
        copy_to = None
        if self.reduce_dtype != data.dtype:  # reduce a low-precision copy; the fp32 data stays as is
            wire = data.to(self.reduce_dtype)
            out = self._chunk(wire, b)
            copy_to = self._chunk(data, b) if self.stage == 1 else None
            data = wire
        else:
            out = self._chunk(data, b) if self.stage == 1 else data.new_empty(self.layout.chunk_size(b))
        handle = reduce_scatter(out, data, self.group, async_op=True)
        self._in_flight[b] = (handle, out, copy_to)
        if self.stage == 2:
            self._bucket_grads[b] = None  # released once the collective has finished with it

    def _complete(self, b: int) -> None:
        """Wait for bucket b's reduce-scatter; stage 2 accumulates the chunk into the shard."""
        if self._in_flight[b] is None:
            return
        handle, out, copy_to = self._in_flight[b]
        if handle is not None:
            handle.wait()
        if copy_to is not None:
            copy_to.copy_(out)
        if self.stage == 2:
            chunk = self._chunk_of_shard(b)
            if self._shard_written[b]:
                chunk.add_(out)
            else:
                chunk.copy_(out)
                self._shard_written[b] = True
        self._in_flight[b] = None

    def _chunk_of_shard(self, b: int) -> Tensor:
        start = self._shard_starts[b]
        return self.shard[start:start + self.layout.chunk_size(b)]

    def start_step(self) -> None:
        """Begin a step: gradients restart from zero (lazily: first gradients overwrite)."""
        for b, bucket in enumerate(self.layout.buckets):
            self._in_flight[b] = None
            self._shard_written[b] = False
            self._bucket_grads[b] = None
            self._unwritten[b] = set(id(p) for _, p in bucket)
            self._pending[b] = set(self._unwritten[b])

    def finish(self) -> None:
        """Launch what backward did not (buckets with parameters that got no gradient), wait for all."""
        # The optimizer writes this rank's chunks next: no gather of the last step may still read them.
        self.wait_params()
        for b in range(len(self.layout.buckets)):
            if self._in_flight[b] is None and (self.stage == 1 or self._bucket_grads[b] is not None):
                self._launch(b)
        for b in range(len(self.layout.buckets)):
            self._complete(b)
            if self.stage == 2 and not self._shard_written[b]:
                self._chunk_of_shard(b).zero_()  # no gradient reached this bucket in the whole step
        self._pending = [set() for _ in self.layout.buckets]

    def grad_shard(self, segment: Segment) -> Tensor:
        """The reduced fp32 gradient of an owned segment (valid after finish)."""
        if self.stage == 1:
            return param_piece(self.grad_buffer, self.layout, segment)
        return self.shard[segment.local_offset:segment.local_offset + segment.length]

    def param_shard(self, segment: Segment) -> Tensor:
        """The parameter values of an owned segment (a view the optimizer updates)."""
        return param_piece(self.param_buffer, self.layout, segment)

    # ------------------------------------------------------------------ parameters after the step

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Every rank's updated chunks into every rank's parameters, one all-gather per bucket.

        Launched in forward order (buckets are in reverse registration order, so the first layers
        sit in the last buckets). Without overlap every gather is waited for here; with it each
        stays in flight until a module that holds its parameters starts its forward
        (`install_forward_waits`), or until `wait_params` (any other reader: checkpoints, the
        guard, the next `finish`).
        """
        for b in reversed(range(len(self.layout.buckets))):
            start = self.layout.starts[b]
            full = self.param_buffer[start:start + self.layout.sizes[b]]
            # gloo and NCCL accept the input as a view of the output (Megatron gathers in place).
            self._gathers[b] = all_gather(full, self._chunk(full, b), self.group, async_op=True)
        if not self.overlap_param_gather:
            self.wait_params()

    def wait_params(self, buckets: Optional[Iterable[int]] = None) -> None:
        """Block until the parameter all-gathers of `buckets` (default: all) have landed."""
        for b in (range(len(self._gathers)) if buckets is None else buckets):
            handle, self._gathers[b] = self._gathers[b], None
            if handle is not None:
                handle.wait()

    def install_forward_waits(self, chunks: Iterable[nn.Module]) -> None:
        """A forward pre-hook on every module with parameters of its own: wait for their buckets only,
        so the gather of later layers keeps running behind the forward of earlier ones."""
        for chunk in chunks:
            for module in chunk.modules():
                buckets = sorted({self._bucket_of[id(p)] for p in module.parameters(recurse=False)
                                  if id(p) in self._bucket_of})
                if buckets:
                    self._hooks.append(module.register_forward_pre_hook(
                        lambda _module, _args, buckets=buckets: self.wait_params(buckets)))

    @contextmanager
    def gathered(self):
        """Every parameter whole for the duration (readers outside forward: tests, export)."""
        self.wait_params()
        yield

    # ------------------------------------------------------------------ bookkeeping

    def memory_bytes(self) -> dict:
        """Persistent per-rank bytes of parameters and gradients (stage 2's per-bucket buffers,
        alive only while a bucket is being filled and reduced, are not counted)."""
        grads = self.grad_buffer if self.stage == 1 else self.shard
        return {"params": self.param_buffer.numel() * self.param_buffer.element_size(),
                "grads": grads.numel() * grads.element_size()}

    @property
    def buckets(self) -> list:
        """The layout's buckets (lists of (name, param)), for tests and reports."""
        return self.layout.buckets

    @property
    def num_bytes(self) -> int:
        """Bytes of one full (padded) gradient buffer: the reduce-scatter payload of one pass."""
        return self.layout.numel * 4

    def remove_hooks(self) -> None:
        """Detach from the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
