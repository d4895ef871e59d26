"""Training throughput: Apogee vs transformers' LlamaForCausalLM on the same config and batch.

Both contenders start from the same weights (Apogee's `init_parameters`, exported through
`engine.model.hf_interop`) and train on the same random tokens with the same AdamW hyper-parameters:
- Apogee: bf16 parameters with fp32 masters and fp32 main_grad (GradBuffer), MasterWeightOptimizer
  (fused AdamW), built the way engine/train/trainer.py builds a single-rank step;
- transformers: fp32 weights under torch.autocast(cpu, bf16), torch.optim.AdamW (fused when
  available), the same loss (summed token cross-entropy divided by the token count) and clipping.
Steps are timed interleaved (A, B, A, B, ...) because the machine is shared and noisy: the ratio
is the median over back-to-back pairs, throughput and MFU are at the median step time (and, in
brackets, at the best step, the least disturbed one). MFU divides Megatron's model FLOPs
(engine.train.metrics.flops_per_step) by the bf16 matmul peak measured in the same run.

    PYTHONPATH=. python bench/bench_train.py            # ~50M and ~150M at seq 512, 4096 tokens/step
    PYTHONPATH=. python bench/bench_train.py --quick    # tiny smoke run, 2 steps

Results, 2026-11-22, 2-core Xeon (AMX bf16) VM shared with 4+ other engineers' jobs (load
average 2-20 during the runs), torch 2.13 CPU, transformers 5.23, seq 512, Apogee compiled per
layer. Per run: tok/s and MFU at the median step (best step in brackets), ratio = median pair.

  tokens/step  model  params  peak GF/s  tok/s Apogee  tok/s HF  ratio  MFU Apogee      MFU HF       load
  2048         150M   148.3M     1780          705        546    1.30x  30.5% (33.1%)   23.6% (24.9%)  ~3
  4096          50M    56.4M     1747        2,404      1,713    1.42x  34.7% (37.9%)   24.7% (27.6%)  ~2
  4096         150M   148.3M     1675          474        366    1.49x  21.8% (40.7%)   16.8% (28.8%)  2-5
  2048          50M    56.4M      362*         122         97    1.53x  --              --             10-20

(*) a peak measured under heavy load: MFU from that run is meaningless, its ratio still holds.

Quiet machine (load < 0.3), 150M, 4096 tokens/step, 3 interleaved repetitions, 2026-11-22,
before the block-causal attention backward (engine/model/cpu_attention.py):
  seq 512  (mbs 8): 844 vs 567 tok/s, ratio 1.47x, MFU Apogee 36.6% (best 38.6%), HF 24.6%
  seq 1024 (mbs 4): 863 vs 593 tok/s, ratio 1.44x, MFU Apogee 36.9% (best 38.1%), HF 25.4%
The profile then showed ATen's CPU flash-attention backward at ~25% of Apogee's step (it ignores
the causal mask and runs small GEMM tiles; transformers uses the same kernel). With the block
backward (session 2, same command, `--sizes 50M 150M --seq 512 1024 --tokens 4096 --steps 2`):

  model  seq  mbs  tok/s Apogee  tok/s HF  ratio  MFU Apogee  MFU HF   peak GF/s (max of the run)
  50M    512    8     2,079        1,343   1.60x   34.0%      22.0%    1543
  50M   1024    4     1,704        1,046   1.58x   29.3%      18.0%    1543
  150M   512    8       847          513   1.63x   42.3%      25.6%    1543
  150M  1024    4       766          478   1.51x   39.6%      24.7%    1543

(seq 1024 takes ATen's backward: past seq 512 the block backward is slower, see MAX_SEQ.) An
earlier run the same day whose peak measured 1856 GFLOP/s gave, for 150M: seq 512 1.70x at
37.4% MFU, seq 1024 1.58x at 35.0% (then with the block backward at 1024 too). The measured peak itself varies 1420-1860 GFLOP/s on this
shared VM, so MFU moves with it: against the highest peak ever measured here (1856), the 150M
seq-512 row above is 35.2%. Both targets (>= 1.5x transformers, >= 35% MFU on ~150M) are met.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
import torch.nn.functional as F

from engine.config import ModelConfig, OptimConfig
from engine.model.hf_interop import hf_config, to_hf_state_dict
from engine.train.metrics import flops_per_step, measure_cpu_bf16_peak
from engine.model.decoder import LlamaModel, count_parameters, init_parameters, lm_loss
from engine.train.optim import build_optimizer
from parallel.collectives import CommLedger, Group
from parallel.data_parallel import GradBuffer

SIZES = MappingProxyType({
    "tiny": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
                        vocab_size=512, seq_length=64),
    "50M": ModelConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, ffn_hidden_size=1408,
                       vocab_size=32000, seq_length=512),
    "150M": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, ffn_hidden_size=2560,
                        vocab_size=32000, seq_length=512),
})
"""Benchmark model configs by label (untied embeddings, Llama-style GQA)."""


@dataclass
class Case:
    """One benchmark row: a model config (with its sequence length) and a micro batch size."""

    label: str
    model: ModelConfig
    micro_batch: int


class ApogeeStep:
    """One Apogee training step over a [b, s+1] token batch, assembled as engine/train/trainer.py does."""

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, seed: int, compile_layers: bool):
        self.model = LlamaModel(cfg)
        init_parameters(self.model, seed)
        self.model.to(dtype=torch.bfloat16)
        if compile_layers:
            from engine.model.compile import compile_layers as compile_fn
            compile_fn(self.model)
        single = Group("dp", None, 1, 0, CommLedger())
        self.grads = GradBuffer(self.model.named_parameters(), single)
        self.optimizer = build_optimizer(self.model, optim)
        self.cfg, self.lr = cfg, optim.lr

    def __call__(self, tokens: torch.Tensor) -> float:
        self.grads.start_step()
        logits = self.model(tokens[:, :-1])
        loss_sum, count = lm_loss(logits, tokens[:, 1:])
        (loss_sum / count).backward()
        self.grads.finish()
        self.optimizer.step(self.lr)
        return float(loss_sum.detach()) / int(count)


class HFStep:
    """One transformers LlamaForCausalLM step: fp32 weights, bf16 autocast, torch AdamW."""

    def __init__(self, cfg: ModelConfig, optim: OptimConfig, seed: int):
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(**hf_config(cfg), attn_implementation="sdpa")
        self.model = LlamaForCausalLM(hf_cfg)
        # The same starting weights as Apogee's, so the first losses can be compared.
        reference = LlamaModel(cfg)
        init_parameters(reference, seed)
        self.model.load_state_dict(to_hf_state_dict(reference.state_dict(), cfg), strict=False)
        del reference
        self.model.train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        try:
            self.optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)
        self.clip = optim.clip_grad

    def __call__(self, tokens: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].reshape(-1))
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())


def time_step(step, tokens: torch.Tensor) -> float:
    """Wall-clock seconds of one training step."""
    start = time.perf_counter()
    step(tokens)
    return time.perf_counter() - start


def run_case(case: Case, args) -> dict:
    """Build both contenders for `case`, warm up, time them step by step interleaved; return the row.

    Pairs (Apogee step, HF step) on the same batch run back to back, so both see nearly the same
    load from other processes: the ratio is the median over pairs of HF time / Apogee time.
    Throughput and MFU are given at the median step time and at the best one (the least disturbed
    step, closest to what an idle machine does).
    """
    cfg, b = case.model, case.micro_batch
    optim = OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (b, cfg.seq_length + 1), generator=gen)
               for _ in range(args.steps)]
    apogee = ApogeeStep(cfg, optim, seed=1234, compile_layers=args.compile)
    hf = HFStep(cfg, optim, seed=1234)
    first = (apogee(batches[0]), hf(batches[0]))  # also the first warm-up step
    for tokens in batches[1:args.warmup]:
        apogee(tokens)
        hf(tokens)
    times = {"apogee": [], "hf": []}
    for rep in range(args.reps):
        for tokens in batches:
            times["apogee"].append(time_step(apogee, tokens))
            times["hf"].append(time_step(hf, tokens))
        print(f"  {case.label} seq {cfg.seq_length} rep {rep + 1}/{args.reps}: s/step Apogee "
              f"{times['apogee'][-1]:.2f}, HF {times['hf'][-1]:.2f}", flush=True)
    tokens, flops = b * cfg.seq_length, flops_per_step(cfg, b)
    t_a, t_h = statistics.median(times["apogee"]), statistics.median(times["hf"])
    best_a, best_h = min(times["apogee"]), min(times["hf"])
    ratio = statistics.median(h / a for a, h in zip(times["apogee"], times["hf"]))
    return dict(model=case.label, params=count_parameters(cfg), seq=cfg.seq_length, mbs=b,
                tok_a=tokens / t_a, tok_h=tokens / t_h, ratio=ratio, best_ratio=best_h / best_a,
                flops_a=flops / t_a, flops_h=flops / t_h, best_flops_a=flops / best_a,
                best_flops_h=flops / best_h, loss0=first)


def print_table(rows: list, peak: float, compiled: bool) -> None:
    """The results table: median step (best step in brackets); ratio = median of paired HF/Apogee times."""
    print(f"\nmeasured bf16 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads); "
          f"Apogee {'torch.compile per layer' if compiled else 'eager'}")
    head = (f"{'model':>6} {'params':>8} {'seq':>5} {'mbs':>4} {'tok/s Apogee':>13} {'tok/s HF':>9} "
            f"{'ratio (best)':>13} {'MFU Apogee (best)':>18} {'MFU HF (best)':>14}   first loss Apogee / HF")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:>6} {r['params'] / 1e6:>7.1f}M {r['seq']:>5} {r['mbs']:>4} {r['tok_a']:>13,.0f} "
              f"{r['tok_h']:>9,.0f} {r['ratio']:>5.2f}x ({r['best_ratio']:.2f}x) "
              f"{100 * r['flops_a'] / peak:>9.1f}% ({100 * r['best_flops_a'] / peak:4.1f}%) "
              f"{100 * r['flops_h'] / peak:>5.1f}% ({100 * r['best_flops_h'] / peak:4.1f}%)   "
              f"{r['loss0'][0]:.4f} / {r['loss0'][1]:.4f}")


def main(argv=None) -> None:
    """Command line: sizes, sequence length, micro batch, steps and repetitions."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps, 1 repetition (smoke test)")
    parser.add_argument("--sizes", nargs="+", default=["50M", "150M"], choices=sorted(SIZES))
    parser.add_argument("--seq", type=int, nargs="+", default=[512], help="sequence lengths to run each size at")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (micro batch = tokens // seq)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (pairs) per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender first")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run Apogee eagerly (default: torch.compile of each decoder layer)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seq, args.tokens, args.steps, args.warmup, args.reps = ["tiny"], [64], 128, 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    measure_peak = lambda: measure_cpu_bf16_peak(seconds=0.2 if args.quick else 2.0, size=512 if args.quick else 2048)
    # Other processes only ever lower a measurement: the best of several is the machine's peak,
    # and MFU against it is the conservative figure.
    peaks = [measure_peak()]
    rows = []
    for label in args.sizes:
        for seq in args.seq:
            case = Case(label, replace(SIZES[label], seq_length=seq), max(1, args.tokens // seq))
            rows.append(run_case(case, args))
            peaks.append(measure_peak())
            print_table(rows[-1:], max(peaks), args.compile)
    print_table(rows, max(peaks), args.compile)


if __name__ == "__main__":
    main()
