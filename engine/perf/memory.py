"""Memory per GPU in the performance model: activations as the engine saves them, model states as
it stores them, the microbatches a pipeline stage holds, and the transients on top.

Activations are a sum of named terms, one per tensor the engine's forward leaves for backward
(measured with engine/perf/activation_meter.py on the engine's own layers: the formula and the
engine agree within 1% over dense and MoE layers, recompute none/selective/full, tp with and
without SP and cp; bench/bench_activation_memory.py, tests/test_activation_memory.py). When the
engine changes what it saves (no fp32 RMSNorm copies, recompute modules), change the term here
and the bench shows whether it still agrees. Per layer and microbatch, with T = b * s/cp tokens,
T_r = T/t under sequence parallelism (else T), t = tp, activations in the model dtype (D bytes):

    RMSNorm (x2)       fp32 input 4h*T_r, fp32 normalised 4h*T_r, rsqrt 4*T_r, weight.float() 4h
    attention          input D*h*T (the norm output entering TP: all-gathered under SP, so full),
                       q, k after RoPE D*(q+kv)/t*T, v D*kv/t*T, core output D*q/t*T,
                       log-sum-exp 4*a/t*T, and a copy of the output for o_proj where the core
                       returns it [b, h, s, d]-contiguous (ring attention off CPU)
    SwiGLU MLP         input D*h*T, gate, up, silu(gate), their product: 4 * D*f/t*T
    MoE (for the MLP)  router input and weight in fp32, probabilities, top-k ids/weights, the
                       sort order, the routed copies (D*h*k*T), per expert gate/up/silu/product
                       (4 * D*f_e*k*T), expert outputs and their weighted copies (2 * D*h*k*T)
    selective          drops the core's log-sum-exp (and its output when o_proj saves a copy):
                       the engine recomputes the attention core only
    full               keeps the layer input alone, D*h*T_r

A chunk adds the RoPE tables, its received input (pipeline stages after the first), on the first
stage the embedding's masks (tp > 1), and on the last the final norm, the head's input and the
loss's tensors (bf16 logits at tp=1; the fp32 softmax of the vocab-parallel loss at tp > 1).
A stage holds `parallel.pipeline.max_in_flight` chunk-microbatches of its schedule at once, and
at its peak one layer's worth of backward work (gradients, recomputed tensors) or the loss's
fp32 work on the logits on top (`transient_bytes`).

Model states are the engine's: bf16 weights (2 bytes), fp32 main gradients (4), fp32 master
weights and Adam moments (12), sharded by ZeRO as parallel/zero.py and zero3.py do.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from engine.config import ModelConfig
from engine.perf.inputs import Assumptions, Layout
from parallel.pipeline import partition_layers, warmup_forwards

FP32 = 4
INDEX = 8  # int64 ids, orders, targets


@dataclass(frozen=True)
class ActivationShape:
    """One microbatch of one model chunk on one GPU, as the activation formula needs it."""

    b: int
    """Samples per microbatch."""
    s: int
    """Tokens per sample on this GPU: seq_length / cp."""
    h: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tp: int = 1
    sequence_parallel: bool = False
    experts: int = 0
    topk: int = 1
    expert_ffn: int = 0
    dtype_bytes: int = 2
    """Bytes per element of activations (bf16/fp8 runs: 2)."""
    core_output_copy: bool = False
    """Whether o_proj saves its own copy of the attention output: ring attention (cp > 1) off CPU
    returns [b, h, s, d]-contiguous blocks whose reshape copies; the flash kernels' output is a view."""
    ring_scores: bool = False
    """Whether ring attention materialises each block's fp32 scores (parallel/block_attention.py's
    matmul path, the one it takes off CPU): a transient of the diagonal block's scores and probabilities."""

    @classmethod
    def of(cls, cfg: ModelConfig, layout: Layout, dtype_bytes: int = 2, on_cpu: bool = False,
           ring_matmul: bool = True) -> "ActivationShape":
        """The shape of `cfg` under `layout`'s tp, sp, cp and micro-batch size (on a GPU unless on_cpu;
        ring_matmul: CP blocks as the engine's fp32 matmuls, not a fused kernel)."""
        ring = layout.cp > 1 and not on_cpu
        return cls(layout.micro_batch_size, cfg.seq_length // layout.cp, cfg.hidden_size, cfg.num_heads,
                   cfg.num_kv_heads, cfg.head_dim, cfg.ffn_hidden_size, cfg.padded_vocab_size, layout.tp,
                   layout.sequence_parallel and layout.tp > 1, cfg.num_experts, cfg.moe_topk,
                   cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size, dtype_bytes, ring, ring and ring_matmul)

    @property
    def tokens(self) -> int:
        """Tokens of the microbatch on this GPU (b * s/cp)."""
        return self.b * self.s

    @property
    def residual_tokens(self) -> float:
        """Tokens of the residual stream on this GPU: divided by tp under sequence parallelism."""
        return self.tokens / self.tp if self.sequence_parallel else self.tokens


def _norm_terms(prefix: str, x: ActivationShape) -> dict:
    """RMSNorm computes in fp32 (engine/model/decoder.py): pow and mul save the fp32 input, the
    weight multiply the fp32 normalised x, rsqrt its result; in bf16 runs weight.float() is a copy."""
    tr = x.residual_tokens
    terms = {f"{prefix}.fp32_input": FP32 * x.h * tr, f"{prefix}.fp32_normalised": FP32 * x.h * tr,
             f"{prefix}.rsqrt": FP32 * tr}
    if x.dtype_bytes < FP32:
        terms[f"{prefix}.weight_fp32"] = FP32 * x.h
    return terms


def _moe_terms(x: ActivationShape) -> dict:
    """What engine/model/moe.py saves per layer (routed copies counted at their average k * T)."""
    t, d, k, e = x.tokens, x.dtype_bytes, x.topk, x.experts
    copies = k * t
    terms = {"moe.router_input_fp32": FP32 * x.h * t, "moe.router_weight_fp32": FP32 * x.h * e,
             "moe.probs": FP32 * e * t, "moe.topk_experts": INDEX * copies, "moe.topk_probs": FP32 * copies,
             "moe.topk_sum": FP32 * t, "moe.order": INDEX * copies, "moe.token_of_copy": INDEX * copies,
             "moe.rows": d * x.h * copies, "moe.expert_output": d * x.h * copies, "moe.weighted": d * x.h * copies,
             "moe.combine_weights": d * copies, "moe.aux_fraction": FP32 * e * x.b}
    for name in ("gate", "up", "silu", "product"):
        terms[f"moe.expert_{name}"] = d * x.expert_ffn * copies
    return terms


def layer_terms(x: ActivationShape, recompute: str = "none") -> dict:
    """Bytes one decoder layer keeps for backward per microbatch, by saved tensor (module docstring)."""
    d, t, tokens = x.dtype_bytes, x.tp, x.tokens
    if recompute == "full":
        return {"layer.input": d * x.h * x.residual_tokens}
    q, kv = x.heads * x.head_dim, x.kv_heads * x.head_dim
    terms = _norm_terms("input_norm", x)
    terms.update({"attention.input": d * x.h * tokens, "attention.q_rope": d * q / t * tokens,
                  "attention.k_rope": d * kv / t * tokens, "attention.v": d * kv / t * tokens})
    core = {"attention.core_output": d * q / t * tokens, "attention.lse": FP32 * x.heads / t * tokens}
    if recompute == "selective":  # the checkpointed core keeps only its inputs (q, k, v)
        core = {} if x.core_output_copy else {"attention.core_output": core["attention.core_output"]}
    terms.update(core)
    if x.core_output_copy:
        terms["attention.o_proj_input"] = d * q / t * tokens
    terms.update(_norm_terms("post_norm", x))
    if x.experts:
        terms.update(_moe_terms(x))
    else:
        terms["mlp.input"] = d * x.h * tokens
        for name in ("gate", "up", "silu", "product"):
            terms[f"mlp.{name}"] = d * x.ffn / t * tokens
    return terms


def chunk_terms(x: ActivationShape, first: bool, last: bool, received: bool = False) -> dict:
    """Bytes a model chunk keeps per microbatch outside its layers: RoPE tables, its received input
    (held by the pipeline for its gradient), the embedding's masks, the final norm, head and loss."""
    d, tokens = x.dtype_bytes, x.tokens
    terms = {"rope.cos_sin": 2 * d * x.s * x.head_dim}
    if received:
        terms["stage.input"] = d * x.h * x.residual_tokens
    if first and x.tp > 1:  # VocabParallelEmbedding: local ids and the in-shard mask
        terms.update({"embedding.local_ids": INDEX * tokens, "embedding.mask": tokens})
    if last:
        terms.update(_norm_terms("final_norm", x))
        terms["head.input"] = d * x.h * tokens
        if x.tp == 1:  # the blockwise bf16 loss saves the logits, the fp32 LSE and the targets
            terms.update({"loss.logits": d * x.vocab * tokens, "loss.lse": FP32 * tokens, "loss.targets": INDEX * tokens})
        else:  # vocab-parallel: the fp32 softmax of this rank's vocabulary slice
            terms.update({"loss.softmax_fp32": FP32 * x.vocab / x.tp * tokens, "loss.in_shard": tokens,
                          "loss.local_targets": INDEX * tokens, "loss.lse": FP32 * tokens})
    return terms


def transient_bytes(x: ActivationShape, recompute: str, first: bool, last: bool) -> dict:
    """Peak bytes on top of the held activations, by cause (rougher than the held bytes: the bench
    shows them within ~25% on the engine): the gradients a layer's backward produces (dense: two
    ffn-wide bf16 gradients; MoE: ~6 routed-copy-wide ones); under full recomputation the recomputed
    layer's activations beside them; the loss's fp32 work on the logits (tp > 1: the logits, their
    fp32 copy, shifted and exp beside the saved softmax, 10 V/t bytes per token; tp=1: the bf16
    gradient of the logits); the dense bf16 gradient of the embedding or output matrix before it
    is added into the fp32 main grad; ring attention's fp32 block scores where it materialises them."""
    d = x.dtype_bytes
    work = 6 * d * x.h * x.topk * x.tokens if x.experts else 2 * d * x.ffn / x.tp * x.tokens
    out = {"layer_backward": work}
    if recompute == "full":
        out["recomputed_layer"] = sum(layer_terms(x, "none").values()) + (work if x.experts else 0.0)
    if x.ring_scores:  # the diagonal block's fp32 scores and probabilities (backward: probs and dS)
        out["ring_scores"] = 2 * FP32 * x.b * x.heads / x.tp * x.s * x.s
    if last:
        out["loss"] = (10 * x.vocab / x.tp if x.tp > 1 else d * x.vocab) * x.tokens
    if first or last:
        out["embedding_grad"] = d * x.vocab / x.tp * x.h
    return out


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, tp: int, sequence_parallel: bool,
                               recompute: str, flash_attention: bool = True) -> float:
    """Korthikanti et al. 2022's 16-bit per-layer activation bytes for GPT (kept for comparison;
    the engine's own are `layer_terms`): TP s*b*h*(10 + 24/t + 5*a*s/(h*t)); TP+SP
    (s*b*h/t)*(34 + 5*a*s/h); selective recomputation or flash attention drop the 5*a*s/h score
    term; full recomputation keeps the layer input, 2*s*b*h (divided by t under SP)."""
    scores = 0.0 if (flash_attention or recompute == "selective") else 5 * a * s / h
    if recompute == "full":
        return 2 * s * b * h / (tp if sequence_parallel else 1)
    if sequence_parallel:
        return s * b * h / tp * (34 + scores)
    return s * b * h * (10 + 24 / tp + scores / tp)


def in_flight_microbatches(pp: int, microbatches: int, virtual_stages: int = 1, stage: int = 0) -> float:
    """Microbatches' activations (in units of the stage's whole layer set) that `stage` holds at
    once in the engine's schedule: pp - stage in 1F1B (fewer if m is smaller); interleaved, its
    warm-up of 2(p-r-1) + (v-1)p chunk-forwards plus one, over v."""
    return held_chunk_forwards(pp, stage, microbatches, virtual_stages) / virtual_stages


def held_chunk_forwards(pp: int, stage: int, microbatches: int, virtual_stages: int) -> int:
    """Most chunk-forwards of `stage` whose backward has not run yet in the engine's schedule
    (parallel.pipeline): its warm-up forwards plus the first steady-state one, at most all m*v
    (equal to max_in_flight(schedule_order(...)); tests check it)."""
    return min(warmup_forwards(pp, stage, microbatches, virtual_stages) + 1, microbatches * virtual_stages)


def model_state_bytes(psi: float, n_d: int, zero: int, grad_bytes: int = 4, param_bytes: int = 2) -> dict:
    """Parameters, gradients and Adam state per GPU for Psi parameters over N_d ranks, as the
    engine stores them: bf16 weights, fp32 main grads, fp32 master + m + v (K = 12); ZeRO-1 shards
    the optimizer, 2 the gradients too, 3 the weights too. With grad_bytes=2 this is the ZeRO
    paper's accounting: 16 Psi; 4 Psi + 12 Psi/N_d; 2 Psi + 14 Psi/N_d; 16 Psi/N_d."""
    return {"params": param_bytes * psi / (n_d if zero >= 3 else 1),
            "grads": grad_bytes * psi / (n_d if zero >= 2 else 1),
            "optimizer": 12 * psi / (n_d if zero >= 1 else 1)}


def stage_parameters(cfg: ModelConfig, layout: Layout, layers: int, first: bool, last: bool) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of a stage with `layers` layers holds: dense weights over
    tp (norms too, a negligible simplification), experts over ep, the embedding on the first stage
    and the output layer on the last (once when tied on a single stage), both of padded_vocab_size rows."""
    h, q, kv = cfg.hidden_size, cfg.head_dim * cfg.num_heads, cfg.head_dim * cfg.num_kv_heads
    dense = h * (2 * q + 2 * kv) + 2 * h + (h * cfg.num_experts if cfg.num_experts else 3 * h * cfg.ffn_hidden_size)
    expert = cfg.num_experts * 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    embeddings = (first + last - (first and last and cfg.tie_embeddings)) * cfg.padded_vocab_size * h + last * h
    return (layers * dense + embeddings) / layout.tp, layers * expert / layout.ep


@dataclass
class MemoryEstimate:
    """Peak bytes per GPU on the fullest pipeline stage, by kind."""

    params: float
    """bf16 weights (with ZeRO-3: the shard plus the gathered layers in use)."""
    grads: float
    """fp32 gradient buffers (with ZeRO-2/3: the shard plus the buckets being reduced)."""
    optimizer: float
    """fp32 master weights and Adam moments."""
    activations: float
    """Saved activations of the microbatches held at once, plus the transients at the peak."""
    reserved: float
    """CUDA context, NCCL buffers, fragmentation (Assumptions.reserved_bytes)."""

    @property
    def total(self) -> float:
        """Sum of all kinds, in bytes."""
        return self.params + self.grads + self.optimizer + self.activations + self.reserved


def stage_layers(cfg: ModelConfig, layout: Layout, stage: int) -> tuple[int, ...]:
    """Layers in each of `stage`'s chunks (parallel.pipeline's partition)."""
    return _chunk_sizes(cfg.num_layers, layout.pp, layout.virtual_stages, stage)


@lru_cache(maxsize=4096)
def _chunk_sizes(num_layers: int, pp: int, virtual_stages: int, stage: int) -> tuple[int, ...]:
    chunks = partition_layers(num_layers, pp, virtual_stages)
    return tuple(len(chunks[c * pp + stage]) for c in range(virtual_stages))


def stage_memory(cfg: ModelConfig, lay: Layout, assume: Assumptions, stage: int,
                 bucket_bytes: float = 25 * 2**20) -> MemoryEstimate:
    """Peak bytes per GPU of pipeline stage `stage` (the first holds most microbatches, the last the loss)."""
    first, last = stage == 0, stage == lay.pp - 1
    layers = stage_layers(cfg, lay, stage)
    dense, expert = stage_parameters(cfg, lay, sum(layers), first, last)
    n_d, n_e = lay.dp * lay.cp, max(1, lay.dp * lay.cp // lay.ep)
    states = [model_state_bytes(dense, n_d, lay.zero), model_state_bytes(expert, n_e, lay.zero)]
    params, grads, optimizer = (sum(s[k] for s in states) for k in ("params", "grads", "optimizer"))
    if lay.zero == 2:  # a bucket being filled and one being reduced, full size, fp32
        grads += 2 * bucket_bytes
    if lay.zero >= 3:  # the layer in use and the one prefetched (bf16), and their fp32 grad buffers
        unit = sum(stage_parameters(cfg, lay, 1, False, False))
        params, grads = params + 2 * 2 * unit, grads + 2 * 4 * unit
    x = ActivationShape.of(cfg, lay, ring_matmul=assume.cp_attention == "matmul")
    per_layer = sum(layer_terms(x, lay.recompute).values())
    m, v = lay.microbatches, lay.virtual_stages
    held_chunks = held_chunk_forwards(lay.pp, stage, m, v)
    # The chunk-microbatches held at the peak (spread over the stage's chunks), each with its layers
    # and extras; the loss's tensors once: the last model chunk runs each backward right after its
    # forward (the engine's schedule), so one microbatch's head is alive at a time.
    per_chunk = [n * per_layer + sum(chunk_terms(x, first and c == 0, False, received=not (first and c == 0)).values())
                 for c, n in enumerate(layers)]
    head = sum(chunk_terms(x, False, True).values()) - sum(chunk_terms(x, False, False).values()) if last else 0.0
    held = held_chunks / v * sum(per_chunk) + head
    activations = held + max(transient_bytes(x, lay.recompute, first, last).values())
    return MemoryEstimate(params, grads, optimizer, activations, assume.reserved_bytes)


def peak_memory(cfg: ModelConfig, lay: Layout, assume: Assumptions) -> MemoryEstimate:
    """The fullest stage's MemoryEstimate: the first (most microbatches in flight) or the last (the loss)."""
    stages = {0, lay.pp - 1}
    return max((stage_memory(cfg, lay, assume, r) for r in stages), key=lambda e: e.total)




def microbatch_bytes(cfg: ModelConfig, lay: Layout, on_cpu: bool = False) -> dict:
    """One microbatch through a whole model on one GPU (pp=1), by the formula: 'layer' bytes per
    layer, 'chunk' the rest (embedding, head, loss, RoPE), 'held' = layers * layer + chunk (what
    backward needs), 'peak' = held + the largest transient."""
    x = ActivationShape.of(cfg, lay, on_cpu=on_cpu)
    layer = sum(layer_terms(x, lay.recompute).values())
    chunk = sum(chunk_terms(x, True, True).values())
    held = cfg.num_layers * layer + chunk
    return {"layer": layer, "chunk": chunk, "held": held,
            "peak": held + max(transient_bytes(x, lay.recompute, True, True).values())}
