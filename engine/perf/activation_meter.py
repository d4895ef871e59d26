"""Bytes a forward leaves alive for its backward, measured on the engine's own modules.

`ActivationMeter` watches a forward in two ways and counts, once it has returned, the distinct
storages still alive among what it saw:
- saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks): every tensor autograd saves for
  backward outside a checkpointed region;
- a dispatch mode that notes the storage of every op's output: non-reentrant activation
  checkpointing installs its own hooks inside its region (so the outer hooks never see what it
  recomputes, correctly) and keeps the region's *inputs* in its recomputation frame, outside
  autograd's saved tensors; those inputs are outputs of earlier ops, and stay alive only through
  that frame.
Only storages allocated during the forward count (an op's output that is a view of, or written
into, one of its inputs is not new: views of parameters are left out). The caller drops its own
references (logits) before reading the meter, so what remains alive is what autograd's graph
holds: the activation memory of that forward. Storages are tracked by weak reference
(torch.multiprocessing's StorageWeakRef), so nothing is kept alive by the meter itself.

engine/perf/memory.py holds the formula these measurements check (bench/bench_activation_memory.py,
tests/test_activation_memory.py).
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else 0


class _OutputStorages(TorchDispatchMode):
    """Notes a weak reference to every storage an op allocates (outputs that are not views of, or
    written into, one of its inputs: views of parameters are not activations)."""

    def __init__(self, meter: "ActivationMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(leaf) for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and _storage_key(leaf) not in inputs:
                self.meter.note(leaf)
        self.meter.sample()
        return out


class ActivationMeter:
    """Context manager over a forward (and backward); `alive_bytes()` once the forward returned:
    bytes of the distinct storages it allocated that are still alive; `peak`: the most alive at once.

    `alive_bytes(saved_only=True)` counts only the storages autograd's saved-tensor hooks saw.
    """

    def __init__(self):
        self._refs: dict[int, tuple[StorageWeakRef, int, bool]] = {}
        self.peak = 0
        """Most bytes alive at once among the storages allocated inside the context (after any op)."""
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._mode = _OutputStorages(self)

    def note(self, tensor: torch.Tensor) -> None:
        """Remember the storage `tensor` was just allocated in (weakly)."""
        key = _storage_key(tensor)
        storage = tensor.untyped_storage() if key else None
        if storage is not None and storage.nbytes():
            self._refs[key] = (StorageWeakRef(storage), storage.nbytes(), False)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # Only storages allocated during the forward count (a saved weight is a parameter).
        known = self._refs.get(_storage_key(tensor))
        if known is not None and not known[0].expired():
            self._refs[_storage_key(tensor)] = (known[0], known[1], True)
        return tensor

    def __enter__(self) -> "ActivationMeter":
        self._hooks.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._hooks.__exit__(*exc)

    def sample(self) -> None:
        """Update `peak` with the bytes alive now, forgetting storages that were freed."""
        expired = [key for key, (ref, _, _) in self._refs.items() if ref.expired()]
        for key in expired:
            del self._refs[key]
        self.peak = max(self.peak, sum(nbytes for _, nbytes, _ in self._refs.values()))

    def alive_bytes(self, saved_only: bool = False) -> int:
        """Bytes of the distinct storages seen during the forward that are still alive now."""
        return sum(nbytes for ref, nbytes, saved in self._refs.values()
                   if not ref.expired() and (saved or not saved_only))


# ---------------------------------------------------------------------------------------------
# One microbatch of a config, measured and predicted (the bench and its test share these)


def measure_microbatch(cfg, ctx) -> dict:
    """Bytes of one microbatch through this rank's model chunk of `cfg` (pp=1) built by the engine's
    Trainer: 'held' after forward and loss (what backward needs), 'saved' the part autograd's
    hooks saw, 'peak' the most alive during forward, loss and backward."""
    from engine.train.synthetic_data import SyntheticData
    from engine.train.trainer import Trainer

    trainer = Trainer(cfg, ctx, SyntheticData.for_config(cfg))
    inputs, targets, positions, loss_mask = trainer.prepare_microbatch(trainer.microbatches(0)[0])
    trainer.grads.start_step()
    with ActivationMeter() as meter:
        logits = trainer.model(inputs, positions=positions)
        loss, _ = trainer.loss_fn(logits, targets, loss_mask)
        del logits
        held, saved = meter.alive_bytes(), meter.alive_bytes(saved_only=True)
        (loss / trainer.step_tokens).backward()
    trainer.grads.finish()
    return {"held": held, "saved": saved, "peak": meter.peak}


def measure_depths(rank: int, world_size: int, configs: list, depths: tuple = (2, 4)) -> list:
    """run_distributed body: for each list of config overrides in `configs`, `measure_microbatch` at
    each model depth in `depths` (model.num_layers; the per-layer bytes are the difference).
    Returns, per config, {depth: measurement} of this rank."""
    from engine.config import load_config
    from engine.config_validation import validate
    from parallel.topology import ParallelContext

    results = []
    for overrides in configs:
        by_depth = {}
        for depth in depths:
            cfg = validate(load_config(None, [*overrides, f"model.num_layers={depth}"]), world_size)
            by_depth[depth] = measure_microbatch(cfg, ParallelContext.create(cfg.parallel))
        results.append(by_depth)
    return results


def compare_with_formula(overrides: list, world_size: int, by_depth: dict) -> dict:
    """One configuration's `measure_depths` result next to engine/perf/memory.py's formula: bytes per
    layer (the difference of the two depths over their layer count) and for the deepest model,
    measured and predicted, and the deviation (the larger relative error of the two)."""
    from engine.config import load_config
    from engine.config_validation import validate
    from engine.perf.inputs import Layout
    from engine.perf.memory import microbatch_bytes

    low, high = min(by_depth), max(by_depth)
    cfg = validate(load_config(None, [*overrides, f"model.num_layers={high}"]), world_size)
    p = cfg.parallel
    layout = Layout(tp=p.tp, cp=p.cp, dp=p.dp, sequence_parallel=p.sequence_parallel, recompute=cfg.model.recompute,
                    micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size)
    formula = microbatch_bytes(cfg.model, layout, on_cpu=True)
    layer = (by_depth[high]["held"] - by_depth[low]["held"]) / (high - low)
    hooks = (by_depth[high]["saved"] - by_depth[low]["saved"]) / (high - low)
    deviation = max(abs(layer / formula["layer"] - 1), abs(by_depth[high]["held"] / formula["held"] - 1))
    return {"layer": layer, "layer_formula": formula["layer"], "hooks": hooks, "held": by_depth[high]["held"],
            "held_formula": formula["held"], "peak": by_depth[high]["peak"], "peak_formula": formula["peak"],
            "deviation": deviation}
