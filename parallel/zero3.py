"""ZeRO stage 3: parameters stored as flat shards, gathered per layer on demand (FSDP-like).

Each model chunk is cut into units: every decoder layer is one, and everything outside the
layers (embedding, final norm, output head) is the chunk's root unit. A unit's parameters are
views of one flat buffer laid out like a ZeRO-1/2 bucket (`zero.ShardLayout`: padded to a multiple
of N_d, rank r owning chunk r); only the chunks persist. The unit's buffer is materialised by an
all-gather when the unit is needed and its storage is freed (resized to zero bytes, so autograd's
saved views of the weights see the data again when it is re-gathered, FSDP1's technique) right
after use:

    forward   chunk pre-hook: gather root, prefetch layer 0 | layer i pre-hook: wait for i,
              prefetch i+1 | layer i post-hook: free i | chunk post-hook: free root
    backward  an identity autograd Function on each unit's output re-gathers the unit (and
              prefetches the one before it) when the gradient reaches it; once every parameter
              of the unit has its gradient, the unit's fp32 gradient buffer is reduce-scattered
              asynchronously into this rank's gradient shard and the unit is freed again.

Gradients are reduce-scattered every microbatch (there is nowhere else to accumulate them), so a
step of m microbatches moves m (2 Psi all-gathered + Psi reduce-scattered) = 3 m Psi elements;
3 Psi at m = 1, the paper's figure. Psi counts the padded layout.

Parameters must not be read outside forward/backward while freed: use `gathered()` (for export
and tests). Full activation recomputation would re-run a layer's forward during backward after
the post-hook freed it and is refused.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from parallel.collectives import CommLedger, Group, all_gather, reduce_scatter
from parallel.zero import Segment, ShardLayout, unique_trainable


class _Unit:
    """One gather/free unit: parameters, their flat full buffer and the state of that buffer."""

    def __init__(self, index: int, params: list[tuple[str, nn.Parameter]]):
        self.index = index
        self.params = params
        self.full: Optional[Tensor] = None
        self.gathered = False
        self.handle = None  # an all-gather in flight
        self.grad: Optional[Tensor] = None  # fp32 full-size gradient of the current backward
        self.pending: set = set()
        self.unwritten: set = set()
        self.next: Optional[_Unit] = None  # prefetched when this one starts forward
        self.backward_next: Optional[_Unit] = None  # prefetched when this one starts backward


class _GatherForBackward(torch.autograd.Function):
    """Identity on a unit's output whose backward gathers the unit before its gradients are computed."""

    @staticmethod
    def forward(ctx, x, owner, unit):
        ctx.owner, ctx.unit = owner, unit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.owner._before_backward(ctx.unit)
        return grad, None, None


class ShardedParameters:
    """Stage 3 over `group`: same step interface as GradBuffer (start_step, is_last_microbatch,
    finish); the optimizer steps `param_shard`/`grad_shard` pieces of this rank's shard."""

    def __init__(self, chunks: list[nn.Module], group: Group):
        self.group = group
        self.is_last_microbatch = True  # gradients are reduced every microbatch at stage 3
        units, self._hooks = [], []
        for chunk in chunks:
            if getattr(getattr(chunk, "cfg", None), "recompute", "none") == "full":
                raise NotImplementedError("parallel.zero=3 with model.recompute=full: a recomputed layer would "
                                          "run on freed parameters; use recompute none or selective")
            units.extend(self._wrap_chunk(chunk, len(units)))
        self.units = units
        self.layout = ShardLayout([u.params for u in units], group.size)
        self.segments: list[Segment] = self.layout.segments(group.rank)
        self._unit_of = {id(p): u for u in units for _, p in u.params}
        first = units[0].params[0][1] if units else torch.zeros(0)
        shard_numel = self.layout.shard_numel()
        self.param_shard_flat = torch.zeros(shard_numel, dtype=first.dtype, device=first.device)
        self.grad_shard_flat = torch.zeros(shard_numel, dtype=torch.float32, device=first.device)
        self._chunk_start = []
        local = 0
        for unit in units:
            self._chunk_start.append(local)
            self._shard_unit(unit)
            local += self.layout.chunk_size(unit.index)
        self._in_flight: list[tuple] = []  # (unit, handle, temporary chunk) of launched reduce-scatters
        self._written = [False] * len(units)
        for unit in units:
            for _, p in unit.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    # ------------------------------------------------------------------ construction

    def _wrap_chunk(self, chunk: nn.Module, first_index: int) -> list[_Unit]:
        layers = list(getattr(chunk, "layers", {}).values()) if hasattr(chunk, "layers") else []
        in_layer = {id(p) for layer in layers for p in layer.parameters()}
        named = unique_trainable(chunk.named_parameters())
        global_name = {id(p): n for n, p in named}  # optimizer state is keyed by the chunk's names
        root_params = [(n, p) for n, p in named if id(p) not in in_layer]
        units, layer_units = [], []
        root = _Unit(first_index, root_params) if root_params else None
        if root is not None:
            units.append(root)
        for layer in layers:
            params = [(global_name[id(p)], p) for _, p in unique_trainable(layer.named_parameters())]
            if not params:
                continue
            unit = _Unit(first_index + len(units), params)
            units.append(unit)
            layer_units.append(unit)
            self._hooks.append(layer.register_forward_pre_hook(lambda m, args, u=unit: self._before_forward(u)))
            self._hooks.append(layer.register_forward_hook(lambda m, args, out, u=unit: self._after_forward(u, out)))
        for earlier, later in zip(layer_units, layer_units[1:]):
            earlier.next, later.backward_next = later, earlier
        if root is not None and layer_units:
            root.backward_next = layer_units[-1]  # the head's backward runs first, then the last layer
        self._hooks.append(chunk.register_forward_pre_hook(
            lambda m, args: self._chunk_before_forward(root, layer_units)))
        self._hooks.append(chunk.register_forward_hook(
            lambda m, args, out: self._chunk_after_forward(root, layer_units, out)))
        return units

    @torch.no_grad()
    def _shard_unit(self, unit: _Unit) -> None:
        """Lay the unit's parameters out in its flat buffer, keep this rank's chunk, free the rest."""
        p0 = unit.params[0][1]
        unit.full = torch.zeros(self.layout.sizes[unit.index], dtype=p0.dtype, device=p0.device)
        base = self.layout.starts[unit.index]
        for _, p in unit.params:
            offset = self.layout.offsets[id(p)] - base
            view = unit.full[offset:offset + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view
        self._shard_of(unit).copy_(self._own_chunk(unit))
        self._free(unit)

    def _own_chunk(self, unit: _Unit) -> Tensor:
        size = self.layout.chunk_size(unit.index)
        return unit.full[self.group.rank * size:(self.group.rank + 1) * size]

    def _shard_of(self, unit: _Unit, flat: Optional[Tensor] = None) -> Tensor:
        flat = self.param_shard_flat if flat is None else flat
        start = self._chunk_start[unit.index]
        return flat[start:start + self.layout.chunk_size(unit.index)]

    # ------------------------------------------------------------------ gather and free

    def _gather(self, unit: Optional[_Unit], wait: bool = True, group: Optional[Group] = None) -> None:
        if unit is None:
            return
        if not unit.gathered:
            unit.full.untyped_storage().resize_(unit.full.numel() * unit.full.element_size())
            unit.handle = all_gather(unit.full, self._shard_of(unit), group or self.group, async_op=True)
            unit.gathered = True
        if wait and unit.handle is not None:
            unit.handle.wait()
            unit.handle = None

    def _free(self, unit: Optional[_Unit]) -> None:
        if unit is None:
            return
        if unit.handle is not None:
            unit.handle.wait()
            unit.handle = None
        unit.full.untyped_storage().resize_(0)
        unit.gathered = False

    def _chunk_before_forward(self, root, layer_units) -> None:
        self._gather(root)
        if layer_units:
            self._gather(layer_units[0], wait=False)

    def _before_forward(self, unit: _Unit) -> None:
        self._gather(unit)
        self._gather(unit.next, wait=False)

    def _after_forward(self, unit: _Unit, output):
        self._free(unit)
        return self._mark_backward(unit, output)

    def _chunk_after_forward(self, root, layer_units, output):
        self._free(root)
        if root is None:  # a chunk without root parameters: the last layer's boundary suffices
            return output
        return self._mark_backward(root, output)

    def _mark_backward(self, unit: _Unit, output):
        if isinstance(output, Tensor) and output.requires_grad and torch.is_grad_enabled():
            return _GatherForBackward.apply(output, self, unit)
        return output

    def _before_backward(self, unit: _Unit) -> None:
        self._gather(unit)
        self._gather(unit.backward_next, wait=False)

    @contextmanager
    def gathered(self):
        """Every unit gathered for the duration (export, checkpoints, tests); booked in a ledger of its own."""
        quiet = Group(self.group.name, self.group.process_group, self.group.size, self.group.rank, CommLedger(),
                      self.group.device)
        for unit in self.units:
            self._gather(unit, group=quiet)
        try:
            yield
        finally:
            for unit in self.units:
                self._free(unit)

    # ------------------------------------------------------------------ gradients

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        unit = self._unit_of[id(param)]
        if unit.grad is None:
            unit.grad = torch.empty(self.layout.sizes[unit.index], dtype=torch.float32, device=param.device)
            used = sum(p.numel() for _, p in unit.params)
            unit.grad[used:].zero_()
            unit.unwritten = {id(p) for _, p in unit.params}
            unit.pending = set(unit.unwritten)
        offset = self.layout.offsets[id(param)] - self.layout.starts[unit.index]
        slot = unit.grad[offset:offset + param.numel()].view_as(param)
        if id(param) in unit.unwritten:
            slot.copy_(param.grad)
            unit.unwritten.discard(id(param))
        else:
            slot.add_(param.grad)
        param.grad = None
        unit.pending.discard(id(param))
        if not unit.pending:
            self._reduce_scatter(unit)

    def _reduce_scatter(self, unit: _Unit) -> None:
        """Launch the unit's gradient reduce-scatter; finish earlier ones (one in flight bounds memory)."""
        self._complete_reductions()
        base = self.layout.starts[unit.index]
        for _, p in unit.params:
            if id(p) in unit.unwritten:  # no gradient this microbatch: contributes zeros
                offset = self.layout.offsets[id(p)] - base
                unit.grad[offset:offset + p.numel()].zero_()
        out = unit.grad.new_empty(self.layout.chunk_size(unit.index))
        handle = reduce_scatter(out, unit.grad, self.group, async_op=True)
        self._in_flight.append((unit, handle, out))
        unit.grad = None
        self._free(unit)  # every use of the weights in this backward is done

    def _complete_reductions(self) -> None:
        for unit, handle, out in self._in_flight:
            if handle is not None:
                handle.wait()
            shard = self._shard_of(unit, self.grad_shard_flat)
            if self._written[unit.index]:
                shard.add_(out)
            else:
                shard.copy_(out)
                self._written[unit.index] = True
        self._in_flight = []

    def start_step(self) -> None:
        """Begin a step: the gradient shard restarts from zero (lazily: the first reduction overwrites)."""
        self._written = [False] * len(self.units)

    def finish(self) -> None:
        """Reduce units whose backward left parameters without gradient, wait for every reduction."""
        for unit in self.units:
            if unit.grad is not None:
                self._reduce_scatter(unit)
        self._complete_reductions()
        for unit in self.units:
            if not self._written[unit.index]:
                self._shard_of(unit, self.grad_shard_flat).zero_()
            self._free(unit)

    # ------------------------------------------------------------------ the optimizer's view

    def param_shard(self, segment: Segment) -> Tensor:
        """This rank's parameter values of an owned segment (the optimizer updates them in place)."""
        return self.param_shard_flat[segment.local_offset:segment.local_offset + segment.length]

    def grad_shard(self, segment: Segment) -> Tensor:
        """The DP-summed fp32 gradient of an owned segment (valid after finish)."""
        return self.grad_shard_flat[segment.local_offset:segment.local_offset + segment.length]

    def memory_bytes(self) -> dict:
        """Persistent per-rank bytes of parameter and gradient shards (gathered units not counted)."""
        return {"params": self.param_shard_flat.numel() * self.param_shard_flat.element_size(),
                "grads": self.grad_shard_flat.numel() * self.grad_shard_flat.element_size()}

    @property
    def buckets(self) -> list:
        """The units' parameter lists (the reduce-scatter granularity)."""
        return [u.params for u in self.units]

    @property
    def num_bytes(self) -> int:
        """Bytes of one full (padded) fp32 gradient pass: the reduce-scatter payload per microbatch."""
        return self.layout.numel * 4

    def remove_hooks(self) -> None:
        """Detach every module and parameter hook."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
