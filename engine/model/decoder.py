"""Llama-style decoder: RMSNorm, RoPE (Llama-3 scaling), SwiGLU, grouped-query attention.

The model holds no parallel code (torchtitan style). Tensor parallelism is applied from outside
by swapping `nn.Linear`/`nn.Embedding` modules for parallel versions, which is why:
- projections are plain `nn.Linear(bias=False)` with Hugging Face names;
- attention derives its *local* head counts from the projection outputs at forward time;
- reshapes use -1, never the global hidden size.
`layers` is an `nn.ModuleDict` keyed by the global layer index, so a parameter has the same name
in every pipeline layout, and `init_parameters` draws each parameter's value from its name only.

Sequence layout is [batch, seq, hidden] throughout.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig
from engine.model.cpu_attention import causal_attention
from engine.model.document_attention import DocumentSegments, document_attention
from engine.model.kv_cache import KVCache, ModelCache
from engine.model.moe import MoE
from parallel.sharding import shard_of
from parallel.tiled_random import normal_slice_, slice_bounds


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019); computes in fp32 and casts back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics: bf16 squares overflow/underflow and the mean loses digits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(head_dim: int, base: float, scaling: Optional[dict] = None) -> Tensor:
    """Inverse frequencies of RoPE in fp32, with Llama-3 frequency scaling when `scaling` is set.

    `scaling` = {factor, low_freq_factor, high_freq_factor, original_max_position}; identical to
    Hugging Face's rope_type 'llama3': long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin tables [..., s, 1, head_dim] in fp32 for the given token positions."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # broadcast over heads
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [b, s, heads, head_dim] by position: x * cos + rotate_half(x) * sin.

    Uses the rotate_half convention (non-interleaved halves), the same as Hugging Face's
    LlamaForCausalLM and Megatron's default, so HF q/k weights load without permutation (HF's
    conversion script already permuted Meta's interleaved checkpoint into this layout).
    The angles are computed in fp32 (`rope_cos_sin`), where precision matters at large
    positions; the rotation itself runs in x's dtype, as in HF and Megatron (in bf16 an fp32
    rotation would cost ~3x for one rounding less).
    """
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# Attention and MLP


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and optional QK-norm; the core is swappable."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Context parallelism replaces this with ring attention.
        self.core: Callable[[Tensor, Tensor, Tensor], Tensor] = causal_attention
        self.recompute_core = cfg.recompute == "selective"

    def core_attention(self, q: Tensor, k: Tensor, v: Tensor,
                       documents: Optional[DocumentSegments] = None) -> Tensor:
        """Run the attention core (within each document when `documents` is given), recomputing it
        in backward under selective recompute."""
        if documents is not None:
            if self.core is causal_attention:
                core = lambda q_, k_, v_: document_attention(q_, k_, v_, documents)  # noqa: E731
            elif getattr(self.core, "takes_documents", False):  # ring attention: masks its own blocks
                core = lambda q_, k_, v_: self.core(q_, k_, v_, documents)  # noqa: E731
            else:
                raise ValueError(f"document masks need an attention core that takes them, not {self.core!r}")
        else:
            core = self.core
        if self.recompute_core and torch.is_grad_enabled():
            return checkpoint(core, q, k, v, use_reentrant=False)
        return core(q, k, v)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional["KVCache"] = None,
                documents: Optional[DocumentSegments] = None) -> Tensor:
        """x [b, s, h] -> [b, s, h]. With a `cache` (generation), the new keys and values are
        appended to it and the s new queries attend to every cached position before them. With
        `documents`, a token attends only to earlier tokens of its own document."""
        b, s, _ = x.shape
        # Local head counts come from the (possibly sharded) projection widths.
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # [b, s, h, d] -> [b, h, s, d] as views: the CPU flash kernel reads this layout directly.
        if cache is None:
            out = self.core_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)
        else:
            out = cache.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.core)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.num_experts else MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache] = None,
                documents: Optional[DocumentSegments] = None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, documents)
        return h + self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------------------------------------
# The model


class LlamaModel(nn.Module):
    """The decoder, or the slice of it one pipeline stage holds.

    layer_ids: global indices of the layers held here (default: all).
    pre_process: owns `embed_tokens`; the input is token ids [b, s]. Otherwise hidden states [b, s, h].
    post_process: owns the final `norm` and `lm_head`; the output is logits [b, s, V] (see
    `drop_padded_vocab` for the rows past vocab_size). Otherwise
    hidden states. With tie_embeddings on a model that also pre-processes, there is no `lm_head`
    and the logits use `embed_tokens.weight`; a post-process-only stage keeps its own `lm_head`,
    initialised equal to the embedding (see `init_parameters`).
    Parameters are created uninitialised in value terms: call `init_parameters(model, seed)`.
    """

    def __init__(self, cfg: ModelConfig, layer_ids: Optional[Sequence[int]] = None,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size) if pre_process else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if post_process else None
        tied_here = cfg.tie_embeddings and pre_process
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False) if post_process and not tied_here else None
        # A plain attribute, not a buffer: model.to(bf16) must not round the frequencies.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)

    def output_weight(self) -> Tensor:
        """The [V, h] matrix that produces logits (the embedding when tied); V is padded_vocab_size."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, x: Tensor, positions: Optional[Tensor] = None,
                cache: Optional[ModelCache] = None, documents: Optional[Tensor] = None) -> Tensor:
        """Token ids (or hidden states) [b, s] -> logits (or hidden states) [b, s, ...].

        positions: [s] or [b, s] token positions for RoPE (default arange(s)); context
        parallelism passes the non-contiguous positions of its sequence chunks. cache: the
        generation's KV caches by layer name (`ModelCache`); the caller passes the positions of the
        new tokens (engine/eval/generate.py). documents: [b, s] document id of each token of the
        full sequence (data_pipeline's Microbatch.document_ids): attention stays within documents.
        """
        h = self.embed_tokens(x) if self.pre_process else x
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)  # once per forward, not per layer
        full_recompute = self.cfg.recompute == "full" and torch.is_grad_enabled()
        segments = None if documents is None else DocumentSegments(documents)  # once, for every layer
        for name, layer in self.layers.items():
            if full_recompute:
                h = checkpoint(layer, h, cos, sin, None, segments, use_reentrant=False)
            elif cache is not None:
                h = layer(h, cos, sin, cache[name])
            else:
                h = layer(h, cos, sin, None, segments)
        if not self.post_process:
            return h
        weight = self.output_weight()
        return drop_padded_vocab(F.linear(self.norm(h), weight), self.cfg.vocab_size, shard_of(weight))

    def num_parameters(self, embedding: bool = True) -> int:
        """Parameters held by this module (shared tensors once); see `count_parameters`."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if not embedding and name.split(".")[0] in ("embed_tokens", "lm_head"):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total


def drop_padded_vocab(logits: Tensor, vocab_size: int, shard: Optional[tuple[int, int, int]]) -> Tensor:
    """Logits without the padding rows' columns (ids >= vocab_size): unsharded, the first vocab_size
    columns (a view: exactly the unpadded model's logits); a vocabulary shard (dim, rank, world) keeps
    its width (the vocab-parallel loss needs equal shards) with its padding columns at the dtype's
    lowest value, so exp() gives exactly 0 and no gradient reaches them (not -inf: differences stay finite)."""
    local = logits.shape[-1]
    start = shard[1] * local if shard is not None else 0
    valid = min(max(vocab_size - start, 0), local)
    if valid == local:
        return logits
    if shard is None:
        return logits[..., :valid]
    keep = torch.arange(local, device=logits.device) < valid
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def count_parameters(cfg: ModelConfig, embedding: bool = True) -> int:
    """Analytic parameter count of the whole model; embedding=False leaves out embed_tokens and lm_head."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2
    qk_norm = 2 * d if cfg.qk_norm else 0
    if cfg.num_experts:  # router + E experts
        mlp = h * cfg.num_experts + cfg.num_experts * 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    else:
        mlp = 3 * h * cfg.ffn_hidden_size
    layer = attn + qk_norm + mlp + 2 * h
    total = cfg.num_layers * layer + h  # + final norm
    if embedding:
        total += cfg.padded_vocab_size * h * (1 if cfg.tie_embeddings else 2)
    return total


# ---------------------------------------------------------------------------------------------
# Loss and initialisation


class _LowPrecisionCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of bf16/fp16 logits [N, V] with fp32 math, a block of rows at a time.

    Same values as F.cross_entropy(logits.float()) up to fp32 rounding, but neither the fp32 copy
    of the logits nor the fp32 log-softmax that autograd would save ([N, V] each) is ever
    materialised: forward keeps the fp32 log-sum-exp per row ([N]), and backward rebuilds
    softmax - one_hot block by block and writes the gradient straight in the logits' dtype.
    The [N, V] passes are memory-bound on CPU; this cuts them from ~9 to ~3 (~2.5x faster at
    V=32000).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        rows = ce_block_rows(logits.shape[-1], logits.device.type)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            torch.logsumexp(logits[start:start + rows].float(), dim=-1, out=lse[start:start + rows])
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(-1, targets[:, None]).squeeze(-1).float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        rows = ce_block_rows(logits.shape[-1], logits.device.type)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            probs = logits[start:end].float().sub_(lse[start:end, None]).exp_()
            probs[torch.arange(end - start, device=probs.device), targets[start:end]] -= 1.0
            grad_logits[start:end] = probs.mul_(grad[start:end, None])
        return grad_logits, None


CE_BLOCK_ELEMENTS = {"cpu": 2**21, "cuda": 2**27}
"""fp32 elements per block of the blockwise loss. CPU: ~8 MB, in cache between the cast, the
reduction and the exp (best at 64 rows of 32000). GPU: 512 MiB, a few blocks (8 per 8k tokens at
vocab 128256), not thousands of launch-bound ones (priced in engine/perf/inputs.py)."""


def ce_block_rows(vocab: int, device_type: str = "cpu") -> int:
    """Rows per block of the blockwise cross-entropy at this vocabulary on this device type."""
    return max(1, CE_BLOCK_ELEMENTS.get(device_type, CE_BLOCK_ELEMENTS["cuda"]) // vocab)


def lm_loss(logits: Tensor, targets: Tensor, z_loss_weight: float = 0.0,
            loss_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy (+ z_loss_weight * logsumexp^2) in fp32, and the token count.

    Returns (loss_sum fp32 scalar, token_count int64 scalar); the caller divides, so sums can be
    reduced across microbatches and ranks first. loss_mask (same shape as targets) zeroes tokens.
    """
    targets = targets.reshape(-1)
    if logits.dtype in (torch.bfloat16, torch.float16) and not z_loss_weight:
        # Blockwise fp32 math without an fp32 copy of the logits (fp32 logits keep the path below).
        per_token = _LowPrecisionCrossEntropy.apply(logits.flatten(0, -2), targets)
        return _reduce_tokens(per_token, targets, loss_mask)
    logits32 = logits.float().flatten(0, -2)
    if z_loss_weight:
        # One log_softmax serves both terms: logsumexp = target logit - target log-prob.
        target_logp = F.log_softmax(logits32, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        lse = logits32.gather(-1, targets[:, None]).squeeze(-1) - target_logp
        per_token = z_loss_weight * lse.square() - target_logp  # PaLM's z-loss keeps logits near 0
    else:
        per_token = F.cross_entropy(logits32, targets, reduction="none")  # fused, no [N, V] scatter
    return _reduce_tokens(per_token, targets, loss_mask)


def _reduce_tokens(per_token: Tensor, targets: Tensor, loss_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(sum of the per-token losses where loss_mask is set, their count)."""
    if loss_mask is None:
        return per_token.sum(), torch.tensor(targets.numel(), device=targets.device)
    loss_mask = loss_mask.reshape(-1).to(per_token.dtype)
    return (per_token * loss_mask).sum(), loss_mask.sum().long()


def _init_std(name: str, shape: list, cfg: ModelConfig) -> float:
    """Megatron's scaled init: residual-output projections shrink with depth. A LoRA A matrix
    [r, in] draws with std 1/sqrt(in) (engine/model/lora.py)."""
    if name.endswith("lora_A"):
        return 1.0 / math.sqrt(shape[1])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return cfg.init_std


@torch.no_grad()
def init_parameters(model: LlamaModel, seed: int) -> None:
    """Give every parameter the value that depends only on (seed, its name), drawing only this rank's slice.

    Normals for weights (scaled for o_proj/down_proj), ones for norms, zeros for LoRA B and for the
    vocabulary padding rows (so a Hugging Face round trip, which drops them, is exact). A
    normal weight is the global tensor of parallel/tiled_random.py: tiles seeded with
    derive_seed(seed, "init", name, tile row, tile column), drawn in fp32 on the CPU. A parameter
    marked as a tensor- or expert-parallel shard (dim, rank, world) (parallel.sharding) draws only
    the tiles its chunk `rank` covers, so a shard equals the slice of the single-rank weight and no
    rank ever builds the full tensor. Parameters may live on any device and dtype (the fp32 draw is
    rounded once into it). A separate `lm_head` of a tied model draws from the embedding's name, so
    a last pipeline stage starts equal to the first stage's embedding.
    """
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    cfg = model.cfg
    for name, param in model.named_parameters():
        shape = list(param.shape)
        shard = shard_of(param)
        if shard is not None:
            dim, rank, world = shard
            shape[dim] *= world
        if id(param) in norm_params:
            param.fill_(1.0)
        elif name.endswith("lora_B"):  # adapters start at zero: the run starts at the base model
            param.zero_()
        else:
            key = "embed_tokens.weight" if cfg.tie_embeddings and name == "lm_head.weight" else name
            normal_slice_(param.data, shape, slice_bounds(shape, shard), _init_std(name, shape, cfg), seed, "init", key)
            if name in ("embed_tokens.weight", "lm_head.weight"):  # padding rows: no gradient reaches them, they stay 0
                first_row = slice_bounds(shape, shard)[0][0]
                param[max(0, cfg.vocab_size - first_row):] = 0
