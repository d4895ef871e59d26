"""The training state as DCP-savable views: every tensor under its global name and shape, as the
rectangles ("pieces") this rank holds, with no copies.

A column-parallel weight is one piece at row offset tp_rank * rows; a replicated tensor is one
piece at offset 0, written once however many ranks hold it (DCP deduplicates identical pieces); a
ZeRO shard of a flattened parameter is a few rectangles. DCP records the pieces of all ranks in its
metadata and, on load, reads for each rank the overlap of what was saved with what the new layout
asks for, so a checkpoint saved at tp=2 x pp=2 loads at tp=1 x dp=4 unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from parallel.sharding import shard_of


class GlobalShards(torch.Tensor):
    """A checkpoint view of a globally-shaped tensor: this rank's pieces and their offsets.

    It implements DCP's checkpointable protocol (__create_write_items__, __create_chunk_list__,
    __get_tensor_shard__), so DCP saves and loads the pieces in place; it supports no tensor math.
    """

    @staticmethod
    def __new__(cls, global_shape, pieces: list[tuple[tuple[int, ...], torch.Tensor]]):
        first = pieces[0][1]
        view = torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=first.dtype, device=first.device)
        view._pieces = [(torch.Size(offset), tensor) for offset, tensor in pieces]
        view._properties = TensorProperties.create_from_tensor(first)
        return view

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"GlobalShards is a checkpoint view; {func} is not supported")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, offset), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offset, sizes=t.shape),
                                                      properties=self._properties, size=self.shape))
                for offset, t in self._pieces]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offset, sizes=t.shape) for offset, t in self._pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offset, t in self._pieces:
            if offset == index.offset:
                return t
        raise ValueError(f"{index.fqn}: this rank holds no piece at offset {tuple(index.offset)}")

    @property
    def pieces(self) -> list[tuple[torch.Size, torch.Tensor]]:
        """(global offset, local tensor) of every piece held here."""
        return self._pieces

    def snapshot(self, staging: Optional["GlobalShards"] = None) -> "GlobalShards":
        """The same view over host-memory copies (what an asynchronous save writes).

        `staging`, a previous snapshot of the same view, is reused: copying into memory that is
        already mapped costs a fraction of allocating it anew each time.
        """
        if staging is None or [t.shape for _, t in staging.pieces] != [t.shape for _, t in self._pieces]:
            return GlobalShards(self.shape, [(o, t.detach().to("cpu", copy=True)) for o, t in self._pieces])
        for (_, target), (_, source) in zip(staging.pieces, self._pieces):
            target.copy_(source.detach())
        return staging


def param_view(param: torch.Tensor, tensor: Optional[torch.Tensor] = None) -> GlobalShards:
    """`tensor` (default: the parameter itself), placed like `param` in the global tensor.

    A tensor- or expert-parallel shard ((dim, rank, world), parallel.sharding) sits at offset rank * size
    along dim; anything else is the whole tensor at offset 0.
    """
    tensor = param.data if tensor is None else tensor
    shape, offset = list(tensor.shape), [0] * tensor.dim()
    shard = shard_of(param)
    if shard is not None:
        dim, rank, world = shard
        offset[dim] = rank * shape[dim]
        shape[dim] *= world
    return GlobalShards(shape, [(tuple(offset), tensor)])


def flat_pieces(param: torch.Tensor, flat_offset: int, flat: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
    """Elements [flat_offset, +len) of `param`'s flattened local tensor as rectangles of the global tensor.

    ZeRO cuts the flattened parameter anywhere, so a rank's piece of a matrix is a partial row,
    whole rows and a partial row: three rectangles at most, each with its global offset (the
    tensor-parallel shard's own offset added). Parameters are 1-D or 2-D.
    """
    shape = tuple(param.shape)
    shard = shard_of(param)
    base = [0] * len(shape)
    if shard is not None:
        base[shard[0]] = shard[1] * shape[shard[0]]
    if len(shape) == 1:
        return [((base[0] + flat_offset,), flat)]
    rows, cols = shape
    pieces, start, end = [], flat_offset, flat_offset + flat.numel()
    while start < end:
        row, col = divmod(start, cols)
        if col or end - start < cols:  # a partial row
            length = min(cols - col, end - start)
            block = flat[start - flat_offset:start - flat_offset + length].view(1, length)
        else:  # as many whole rows as remain
            count = (end - start) // cols
            length, block = count * cols, flat[start - flat_offset:start - flat_offset + count * cols].view(count, cols)
        pieces.append(((base[0] + row, base[1] + col), block))
        start += length
    return pieces


def _piece_views(entries: list[tuple[torch.Tensor, int, torch.Tensor]]) -> GlobalShards:
    """One view of the pieces (param, flat offset, flat tensor) of one global tensor."""
    param = entries[0][0]
    global_shape = list(param.shape)
    shard = shard_of(param)
    if shard is not None:
        global_shape[shard[0]] *= shard[2]
    pieces = [piece for p, offset, flat in entries for piece in flat_pieces(p, offset, flat)]
    return GlobalShards(global_shape, pieces)


def zero_views(grads, optimizer, tie_embeddings: bool) -> dict[str, Any]:
    """Views of a ZeRO rank's share: its pieces of every state tensor (and, at stage 3, of the weights).

    Keys are those of the plain layout, so any stage and any layout can load them: fp32 pieces
    are their own masters (saved as the weights), bf16 pieces add 'optim/<name>/master'.
    """
    views: dict[str, Any] = {}
    _ensure_adam_state(optimizer)
    state = optimizer.sharded_state_dict()
    step = 0.0
    by_key: dict[str, list] = {}
    for segment, piece in zip(grads.segments, [grads.param_shard(s) for s in grads.segments]):
        entry = state[segment.name]
        name = "embed_tokens.weight" if tie_embeddings and segment.name == "lm_head.weight" else segment.name
        keys = {f"optim/{name}/{k}": entry[k].local for k in ("exp_avg", "exp_avg_sq")}
        if entry["master"].local.dtype != piece.dtype:
            keys[f"optim/{name}/master"] = entry["master"].local
        if not hasattr(grads, "all_gather_params"):  # stage 3: the weights exist only as pieces
            keys[f"model/{name}"] = piece
        for key, flat in keys.items():
            by_key.setdefault(key, []).append((segment.param, segment.param_offset, flat))
        step = entry.get("step", step)
    for key, entries in by_key.items():
        views[key] = _piece_views(entries)
    views["optim/step"] = torch.tensor(float(step))
    return views


def model_views(named_params, tie_embeddings: bool = False) -> dict[str, GlobalShards]:
    """'model/<name>' -> view of each parameter (tied duplicates appear once, under the first name).

    With tied embeddings, a last pipeline stage's own copy of the output matrix is the embedding:
    it is saved and loaded under 'model/embed_tokens.weight', so any layout finds it.
    """
    views, seen = {}, set()
    for name, p in named_params:
        if id(p) not in seen:
            seen.add(id(p))
            key = "embed_tokens.weight" if tie_embeddings and name == "lm_head.weight" else name
            views[f"model/{key}"] = param_view(p)
    return views


def _ensure_adam_state(optimizer) -> None:
    """Create AdamW's moments (zeros) before the first step, so there is state to save or load into."""
    torch_opt = optimizer.optimizer
    for group in torch_opt.param_groups:
        for master in group["params"]:
            state = torch_opt.state[master]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)


def optimizer_views(optimizer) -> dict[str, Any]:
    """'optim/<name>/{exp_avg,exp_avg_sq,master}' views and the shared step count.

    The plain optimizer keeps state shaped like each parameter's local shard, so the state sits
    where its parameter sits (ZeRO's flat pieces are mapped by `zero_views`).
    """
    _ensure_adam_state(optimizer)
    views: dict[str, Any] = {}
    step = 0.0
    for name, p, master in zip(optimizer.names, optimizer.params, optimizer.masters):
        state = optimizer.optimizer.state[master]
        views[f"optim/{name}/exp_avg"] = param_view(p, state["exp_avg"])
        views[f"optim/{name}/exp_avg_sq"] = param_view(p, state["exp_avg_sq"])
        if master is not p:
            views[f"optim/{name}/master"] = param_view(p, master)
        step = float(state["step"])
    views["optim/step"] = torch.tensor(step)
    return views


@torch.no_grad()
def sync_masters(optimizer) -> None:
    """fp32 masters re-read from the (loaded) low-precision weights, for any optimizer kind."""
    params = getattr(optimizer, "param_pieces", None) or optimizer.params
    for p, master in zip(params, optimizer.masters):
        if p is not master:
            master.copy_(p)


def load_optimizer_step(optimizer, step_tensor: torch.Tensor) -> None:
    """Set AdamW's per-parameter step count (one shared value) after a load."""
    for state in optimizer.optimizer.state.values():
        state["step"].fill_(float(step_tensor))


def state_views(trainer) -> dict[str, Any]:
    """Everything a checkpoint holds of `trainer`'s tensors (weights, optimizer, fp8 recipe state), as views."""
    tied = trainer.cfg.model.tie_embeddings
    if trainer.cfg.parallel.zero == 0:
        views = model_views(trainer.named_parameters(), tied)
        views.update(optimizer_views(trainer.optimizer))
    else:
        views = zero_views(trainer.grads, trainer.optimizer, tied)
        if hasattr(trainer.grads, "all_gather_params"):  # stages 1-2 hold every weight whole
            views.update(model_views(trainer.named_parameters(), tied))
    # Replicated state keyed by layer (fp8 recipe state): one copy saved, every rank loads it in place.
    views.update(getattr(trainer, "checkpoint_tensors", dict)())
    return views
