"""Peak activation bytes per pipeline stage, measured, next to Korthikanti et al.'s formulas.

Measured: during one real training step on gloo ranks, every tensor autograd saves for backward
is tracked (torch.autograd.graph.saved_tensors_hooks) until autograd frees it; parameters are
left out. "peak" is the most bytes of distinct activation storage alive at once on the stage;
"1 mb" is the same with one microbatch per step (so peak / 1 mb = microbatches held at once).

Formulas (Korthikanti et al. 2022, arXiv 2205.05198, per layer, b samples of s tokens):
  GPT, 16-bit, no parallelism:  s*b*h*(34 + 5*a*s/h) bytes; with flash attention 34*s*b*h.
  This layer, fp32, adapted term by term (what each op saves): RMSNorm keeps its input and the
  normalised x (GPT's LayerNorm: input only) plus an s*b rsqrt; Q and K after RoPE are h + h_kv
  (GQA) instead of 2h and V is h_kv; CPU SDPA is a flash kernel, so no a*s^2*b scores, only an
  a*s*b log-sum-exp; no dropout masks; SwiGLU keeps gate, silu, up and their product (4f) where
  GPT's GeLU MLP keeps 2 * 4h. Per token: 8h + 2h_kv + 4f + a + 2 elements, times 4 bytes.
Stage extras, not in the per-layer formula: RoPE cos/sin (2*s*d per chunk); on the last stage
the final norm (3h + 1 per token) and the log-softmax the loss saves (V per token).
Schedule: 1F1B stage r holds pp - r microbatches (the first stage p, i.e. L layers' worth);
interleaved, Korthikanti's first-stage factor is 1 + (p-1)/(p*m) of that.
Run: python bench/bench_activation_memory.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["model.hidden_size=128", "model.num_heads=8", "model.num_kv_heads=4", "model.ffn_hidden_size=256",
         "model.vocab_size=128", "model.seq_length=64", "model.num_layers=8", "train.micro_batch_size=2"]
LAYOUTS = {2: [(2, 1, 1), (2, 1, 8), (2, 2, 8)], 4: [(4, 1, 1), (4, 1, 8), (4, 2, 8)]}  # (pp, v, m)


class LiveActivations:
    """Bytes of distinct non-parameter storages saved for backward and not yet freed; and their peak."""

    def __init__(self, parameters):
        self.excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self.excluded:
            return tensor
        nbytes = tensor.untyped_storage().nbytes()
        if not self.refs.get(ptr):
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        return _Saved(tensor, ptr, nbytes, self)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            self.current -= nbytes


class _Saved:
    """A saved tensor; when autograd drops it (after backward), its bytes leave the live count."""

    __slots__ = ("tensor", "ptr", "nbytes", "tracker")

    def __init__(self, tensor, ptr, nbytes, tracker):
        self.tensor, self.ptr, self.nbytes, self.tracker = tensor, ptr, nbytes, tracker

    def __del__(self):
        self.tracker.release(self.ptr, self.nbytes)


def _worker(rank: int, world_size: int, layouts: list) -> list:
    import torch

    from engine.train.trainer import Trainer
    from bench.common import context_for, small_config
    from engine.train.synthetic_data import SyntheticData

    results = []
    for pp, v, m in layouts:
        overrides = [*MODEL, f"parallel.pp={pp}", f"parallel.virtual_stages={v}", f"train.global_batch_size={2 * m}"]
        cfg = small_config(overrides, world_size, 1)
        ctx = context_for(cfg)
        trainer = Trainer(cfg, ctx, SyntheticData.for_config(cfg))
        tracker = LiveActivations(p for _, p in trainer.named_parameters())
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            trainer.train_step(0)
        layers = sum(len(chunk.layers) for chunk in trainer.chunks)
        results.append(dict(pp=pp, v=v, m=m, rank=ctx.pp_rank, peak=tracker.peak, layers=layers))
    return results


def layer_bytes(cfg, dtype_bytes: int = 4) -> dict:
    """Per-layer activation bytes of one microbatch: this layer's adapted count and the GPT formulas."""
    m, b = cfg.model, cfg.train.micro_batch_size
    s, h, a, f = m.seq_length, m.hidden_size, m.num_heads, m.ffn_hidden_size
    h_kv = m.num_kv_heads * m.head_dim
    return {"adapted": s * b * (8 * h + 2 * h_kv + 4 * f + a + 2) * dtype_bytes,
            "gpt_16bit": s * b * h * (34 + 5 * a * s / h), "gpt_16bit_flash": 34 * s * b * h}


def main() -> None:
    from parallel.pipeline import max_in_flight, schedule_order
    from parallel.spawn import run_distributed
    from bench.common import small_config

    cfg = small_config(MODEL, 1, 1)
    per_layer = layer_bytes(cfg)
    m_, b = cfg.model, cfg.train.micro_batch_size
    cos_sin = 2 * m_.seq_length * m_.head_dim * 4
    head = m_.seq_length * b * (3 * m_.hidden_size + 1 + m_.vocab_size) * 4
    print(f"per layer, one microbatch (b={b}, s={m_.seq_length}, h={m_.hidden_size}, a={m_.num_heads}, "
          f"h_kv={m_.num_kv_heads * m_.head_dim}, f={m_.ffn_hidden_size}): adapted fp32 {per_layer['adapted']:,} B; "
          f"GPT 16-bit {per_layer['gpt_16bit']:,.0f} B (flash {per_layer['gpt_16bit_flash']:,} B)")
    print(f"{'layout':<14} {'stage':>5} {'layers':>6} {'held':>4} {'measured peak':>14} {'formula peak':>13} "
          f"{'ratio':>6} {'GPT16 flash x held':>19}")
    for world, layouts in LAYOUTS.items():
        per_rank = run_distributed(_worker, world, layouts, timeout=900)
        for index, (pp, v, m) in enumerate(layouts):
            for rank_results in per_rank:
                r = rank_results[index]
                order = schedule_order(pp, r["rank"], m, v)
                chunks_held = max_in_flight(order)  # microbatch-chunks alive at the peak
                layers_per_chunk = r["layers"] // v
                predicted = chunks_held * (layers_per_chunk * per_layer["adapted"] + cos_sin)
                if r["rank"] == pp - 1:
                    predicted += head  # one microbatch's head is alive at a time (forward then its backward)
                gpt = chunks_held * layers_per_chunk * per_layer["gpt_16bit_flash"]
                name = f"pp={pp} v={v} m={m}"
                print(f"{name:<14} {r['rank']:>5} {r['layers']:>6} {chunks_held:>4} {r['peak']:>14,} "
                      f"{predicted:>13,} {r['peak'] / predicted:>6.3f} {gpt:>19,}")
            if v > 1:  # first stage, in units of the L layers 1F1B's first stage holds
                held = max_in_flight(schedule_order(pp, 0, m, v)) / (pp * v)
                print(f"  first stage holds {held:.3f} x L layers' activations; Korthikanti's 1 + (p-1)/(p*m) = "
                      f"{1 + (pp - 1) / (pp * m):.3f} (Megatron's warm-up of 2(p-1) + (v-1)p forwards holds more)")


if __name__ == "__main__":
    main()
