"""Parity tolerances from a measured noise floor instead of a constant tuned on one machine.

A layout reproduces the single-rank run only up to rounding, and how much rounding is left after N
optimizer steps depends on the CPU (AVX2, AVX-512 and AMX take different GEMM kernels, blocked
differently) and on the config (AdamW turns rounding noise in a near-zero gradient into an update
of O(lr), so a few weights carry most of the difference). So each parity test measures it on the
machine it runs on: the floor is the single-rank reference trained a second time by `Reordered`,
the same math with the reductions the compared layout reorders summed in another order. Three
scopes (`floor_scope` picks one from the run's overrides):

- 'microbatches', for layouts whose ranks run whole microbatches (data and pipeline parallelism,
  ZeRO against plain DP): the microbatches of each step in reverse order, which reorders the sum of
  their gradients and losses -- all that DP, PP and ZeRO change;
- 'all', for layouts that split a microbatch (tensor, sequence, context and expert parallelism):
  also the samples of each microbatch reversed (the order of every weight gradient's sum over
  tokens) and the hidden units, FFN units and attention heads (KV groups with their query heads)
  permuted in every weight and permuted back at the end (the order of every GEMM's inner sum,
  forward and backward, and of RMSNorm's sum: what a TP split-K reorders);
- 'masters', instead of 'microbatches' for bf16 and fp8 runs: after the first update every fp32
  master moves by one ulp, up or down at random, once. Reordering whole-microbatch sums of bf16
  gradients is exact in fp32 on the tiny model (that floor is 0), yet any last-bit difference of
  an update (ZeRO sums the gradient norm shard by shard, a pipeline stage adds its gradients in
  another order) flips a bf16 rounding of a parameter now and then, which the next steps carry
  on; this scope makes such flips.

    tolerance = max(FACTOR * floor, MIN_ULPS * eps_fp32 * scale)

for the per-step loss (relative, scale 1; absolute for losses near zero, scale the largest |loss|)
and for the final weights (absolute, scale the largest |weight|).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS32 = torch.finfo(torch.float32).eps
"""2**-23: the spacing of fp32 numbers in [1, 2)."""

FACTOR = 4.0
"""Tolerance over the floor. Summing n terms in another order moves an fp32 sum by a random walk
of ~sqrt(n) * eps * rms(term) (Higham, Accuracy and Stability of Numerical Algorithms, 4.2), and a
p-way sharded reduction (p partial sums, then a p-term all-reduce) is one such reordering: it
differs from the single-rank order by the same ~sqrt(n) eps, not by p times more (the collective
adds log2(p) <= 3 roundings, small next to n >= 64 terms). The floor reorders the same reductions,
so a correct layout's difference is another draw from the floor's distribution. Measured on the
development machine (a 2-core x86 VM): the weight floor of one config varies up to 2x with the
permutation drawn (4.9e-6 to 9.5e-6, dense fp32, ten steps), and the parity tests' layouts come
out at 0 to 1.7 times their floor (the most: context parallelism, whose ring attention also
reorders the softmax sums over keys, which no single-rank perturbation reaches). 4 = 2 (a low
draw of the floor) x 2 (a high draw of the layout). A real layout bug lands 2,700x (a wrong TP
shard) and 12,000x (one of 21 gradient buckets not reduced) above it: tests/test_parity_tp_dp.py."""

MIN_ULPS = 4
"""The smallest tolerance, in fp32 spacings of the compared values' scale: a floor that happens
to be 0 (a perturbation no kernel on this machine rounds differently) must not demand bitwise
equality of layouts that sum in another order."""


def _flip_rows(value, blocks: int):
    """`value` with the rows (dim 0) of each of its `blocks` equal blocks in reverse order."""
    if value is None:  # a microbatch without a loss mask
        return None
    if isinstance(value, torch.Tensor):
        return torch.cat([block.flip(0) for block in value.chunk(blocks)]) if value.dim() else value
    flipped = [_flip_rows(v, blocks) for v in value]
    return type(value)(*flipped) if hasattr(value, "_fields") else type(value)(flipped)


def reorder_microbatches(microbatches: list, blocks: int = 1) -> list:
    """The same microbatches in another order: the list reversed, the rows of each reversed.

    A microbatch is a tensor, a tuple of tensors (tokens, loss mask) or a NamedTuple of row-indexed
    tensors (GRPO's rollouts). blocks=2 keeps DPO's pairs: its rows are mbs chosen sequences,
    then their mbs rejected ones, and each half is reversed in place.
    """
    return [_flip_rows(microbatch, blocks) for microbatch in reversed(microbatches)]


def _head_permutation(kv_perm: torch.Tensor, heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """Row order of a [heads * head_dim] projection that moves KV group kv_perm[i] to place i."""
    heads = (kv_perm[:, None] * heads_per_kv + torch.arange(heads_per_kv)).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def feature_permutations(model_cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random order of each feature axis: 'h' (hidden), 'ffn' (dense FFN units), 'moe_ffn'
    (each expert's units), 'q' and 'kv' (query/key-value projection rows, whole heads, GQA kept)."""
    gen = torch.Generator().manual_seed(seed)
    m = model_cfg
    kv_perm = torch.randperm(m.num_kv_heads, generator=gen)
    return {"h": torch.randperm(m.hidden_size, generator=gen),
            "ffn": torch.randperm(m.ffn_hidden_size, generator=gen),
            "moe_ffn": torch.randperm(m.moe_ffn_hidden_size or m.ffn_hidden_size, generator=gen),
            "q": _head_permutation(kv_perm, m.num_heads // m.num_kv_heads, m.head_dim),
            "kv": _head_permutation(kv_perm, 1, m.head_dim)}


_AXES = {  # module.tensor (a name's last two parts) -> feature axis of each dimension (None: not permuted)
    "embed_tokens.weight": (None, "h"), "lm_head.weight": (None, "h"), "norm.weight": ("h",),
    "input_layernorm.weight": ("h",), "post_attention_layernorm.weight": ("h",),
    "q_proj.weight": ("q", "h"), "k_proj.weight": ("kv", "h"), "v_proj.weight": ("kv", "h"),
    "o_proj.weight": ("h", "q"), "q_norm.weight": (None,), "k_norm.weight": (None,),
    "gate_proj.weight": ("ffn", "h"), "up_proj.weight": ("ffn", "h"), "down_proj.weight": ("h", "ffn"),
    "router.weight": (None, "h"),
}


def _axes(name: str, moe: bool) -> tuple:
    base, _, adapter = name.rpartition(".")
    if adapter in ("lora_A", "lora_B"):  # A [r, in] and B [out, r] of the adapted projection
        out_axis, in_axis = _axes(base + ".weight", moe)
        return (None, in_axis) if adapter == "lora_A" else (out_axis, None)
    suffix = ".".join(name.split(".")[-2:])  # module and tensor: 'q_norm.weight' is not 'norm.weight'
    if suffix not in _AXES:
        raise KeyError(f"{name}: no feature axes known for '{suffix}'; add it to tests/noise_floor.py _AXES "
                       f"(known: {', '.join(_AXES)})")
    # Expert weights stack E matrices along dim 0 ([E * ffn, h], [E * h, ffn]).
    return tuple("moe_ffn" if moe and a == "ffn" else a for a in _AXES[suffix])


def permute_features(name: str, value: torch.Tensor, perms: dict, moe: bool, inverse: bool = False) -> torch.Tensor:
    """`value` of parameter `name` with its feature axes in the order `perms` (or back, inverse=True)."""
    for dim, axis in enumerate(_axes(name, moe)):
        if axis is None:
            continue
        order = perms[axis] if not inverse else torch.argsort(perms[axis])
        blocks = value.shape[dim] // order.numel()  # stacked expert matrices: the same order in each
        index = (torch.arange(blocks)[:, None] * order.numel() + order).reshape(-1)
        value = value.index_select(dim, index.to(value.device))
    return value


def permute_model(named_parameters, model_cfg, perms: dict) -> None:
    """Permute the feature axes of every parameter in place (a tied weight once)."""
    seen = set()
    with torch.no_grad():
        for name, p in named_parameters:
            if id(p) not in seen:
                seen.add(id(p))
                p.copy_(permute_features(name, p, perms, bool(model_cfg.num_experts)))


def unpermute_state(state: dict, model_cfg, perms: dict) -> dict:
    """A full state dict of a permuted model in the original feature order."""
    return {name: permute_features(name, value, perms, bool(model_cfg.num_experts), inverse=True)
            for name, value in state.items()}


SCOPES = ("microbatches", "all", "masters")
"""What `Reordered` reorders (module docstring)."""


def floor_scope(overrides: list[str]) -> str:
    """The scope of a run's --set overrides: 'all' when it splits microbatches over tp, cp or ep
    ranks, else 'masters' in bf16 or fp8, else 'microbatches' (module docstring)."""
    settings = dict(override.partition("=")[::2] for override in overrides)
    if any(int(settings.get(f"parallel.{dim}", 1)) > 1 for dim in ("tp", "cp", "ep")):
        return "all"
    return "masters" if settings.get("precision.dtype", "fp32") != "fp32" else "microbatches"


class Reordered:
    """The floor's perturbation of one single-rank trainer, in `scope` (SCOPES): features permuted
    now ('all'), each step's microbatches reordered or masters nudged (`microbatches`), the final
    state permuted back (`state`).

        floor = Reordered(trainer, "all")
        for step in range(steps):
            trainer.train_step(step, floor.microbatches(step, trainer.microbatches(step)))
        state = floor.state(gather_full_state_dict(trainer.chunks, ctx))
    """

    def __init__(self, trainer, scope: str, blocks: int = 1, seed: int = 0):
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}: expected one of {SCOPES}")
        self.trainer, self.model_cfg, self.scope, self.blocks, self.seed = trainer, trainer.cfg.model, scope, blocks, seed
        self.perms = feature_permutations(self.model_cfg, seed) if scope == "all" else None
        if self.perms is not None:
            permute_model(trainer.named_parameters(), self.model_cfg, self.perms)
            trainer.optimizer.sync_masters_from_params()  # low-precision params keep fp32 masters

    def microbatches(self, step: int, microbatches: list) -> list:
        """Step `step`'s microbatches in the floor's order (`reorder_microbatches`; only reversed
        for 'microbatches'; unchanged for 'masters', which moves every master by one ulp before step 1)."""
        if self.scope == "masters":
            if step == 1:
                self._nudge_masters()
            return microbatches
        if self.scope == "microbatches":
            return list(reversed(microbatches))
        return reorder_microbatches(microbatches, self.blocks)

    @torch.no_grad()
    def _nudge_masters(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        for master in self.trainer.optimizer.masters:
            up = torch.randint(0, 2, master.shape, generator=gen).bool().to(master.device)
            master.copy_(torch.nextafter(master, torch.where(up, torch.inf, -torch.inf).to(master.dtype)))

    def state(self, state: dict) -> dict:
        """The final full state dict in the reference's feature order."""
        return state if self.perms is None else unpermute_state(state, self.model_cfg, self.perms)


def max_loss_diff(losses: list[float], reference: list[float], relative: bool = True) -> float:
    """max over steps of |loss - reference| (/ |reference| when relative)."""
    if len(losses) != len(reference):
        raise AssertionError(f"{len(losses)} losses vs {len(reference)} reference steps")
    return max(abs(a - b) / (abs(b) if relative else 1.0) for a, b in zip(losses, reference))


def max_weight_diff(state: dict, reference: dict) -> float:
    """max over parameters of max |w - w_ref|; the names and shapes must match."""
    if set(state) != set(reference):
        raise AssertionError(f"parameter names differ: {sorted(set(state) ^ set(reference))[:6]}")
    worst = 0.0
    for name, value in state.items():
        if value.shape != reference[name].shape:
            raise AssertionError(f"{name}: shape {tuple(value.shape)} vs {tuple(reference[name].shape)}")
        worst = max(worst, (value.float() - reference[name].float()).abs().max().item())
    return worst


@dataclass(frozen=True)
class Tolerance:
    """Loss and weight tolerances of one config family, with the floors they come from."""

    loss_floor: float
    """max per-step loss difference of the reordered single-rank run (relative unless relative_loss is False)."""
    weight_floor: float
    """max |weight difference| of the reordered single-rank run after the last step."""
    loss: float
    weight: float
    relative_loss: bool = True
    """False for losses that cross zero (GRPO): absolute differences."""

    @classmethod
    def measured(cls, reference: tuple[list, dict], reordered: tuple[list, dict], relative_loss: bool = True) -> "Tolerance":
        """From the (losses, state dict) of the reference and of its reordered run (`reordered_run`)."""
        (ref_losses, ref_state), (losses, state) = reference, reordered
        loss_floor = max_loss_diff(losses, ref_losses, relative_loss)
        weight_floor = max_weight_diff(state, ref_state)
        loss_scale = 1.0 if relative_loss else max(abs(x) for x in ref_losses)
        weight_scale = max(v.abs().max().item() for v in ref_state.values())
        return cls(loss_floor, weight_floor, max(FACTOR * loss_floor, MIN_ULPS * EPS32 * loss_scale),
                   max(FACTOR * weight_floor, MIN_ULPS * EPS32 * weight_scale), relative_loss)

    def check(self, name: str, losses: list, state: dict, ref_losses: list, ref_state: dict) -> tuple[float, float]:
        """Assert the run's losses and final weights are within tolerance of the reference; print
        the differences next to the floors and tolerances (shown by pytest -s and on failure)."""
        loss_diff = max_loss_diff(losses, ref_losses, self.relative_loss)
        weight_diff = max_weight_diff(state, ref_state)
        kind = "relative " if self.relative_loss else ""
        report = (f"{name}: max {kind}loss diff {loss_diff:.2e} (tolerance {self.loss:.2e}, floor {self.loss_floor:.2e}), "
                  f"max weight diff {weight_diff:.2e} (tolerance {self.weight:.2e}, floor {self.weight_floor:.2e})")
        print(report)
        assert loss_diff <= self.loss and weight_diff <= self.weight, (report, losses, ref_losses)
        return loss_diff, weight_diff
