"""Packing: trained tokens per second of packed SFT rows vs one padded example per row, and the
cost of document masking in pre-training.

SFT: a fixed set of examples whose lengths follow a long tail (log-normal, mean ~ seq_length / 4,
clipped to [8, seq_length + 1]), prompts untrained. The same small fp32 model trains the same
number of steps of `micro_batch_size` rows on it padded (data_pipeline/sft.py: one example per
row) and packed (data_pipeline/packing.py: best-fit decreasing, each example attending to itself
only), interleaved in rounds so both see the same machine state. Trained tokens are the targets
whose loss counts (the loss masks' sum); padding is the fraction of row tokens that are pad.

Pre-training: steps of the same kind of model at seq 2048 on rows of documents (lengths ~
log-normal, mean ~ 400 tokens) with data.document_mask (per-document attention, positions reset)
vs without (one causal window), side by side.

Run: python bench/bench_packing.py [--steps N] [--rounds R] [--threads T]
Last line: `packing: trained tokens/s packed/padded = R`.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEQ = 512
MODEL = ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=352",
         "model.vocab_size=384", "model.num_layers=2", "precision.dtype=fp32", "optim.warmup_steps=1"]


def long_tail_examples(count: int, seq_length: int, seed: int = 0) -> list:
    """(tokens, trained) examples with log-normal lengths of mean ~ seq_length / 4 (sigma 1: a long tail)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(seq_length / 4) - sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    examples = []
    for _ in range(count):
        n = int(min(seq_length + 1, max(8, math.exp(mu + sigma * float(torch.randn(1, generator=gen))))))
        prompt = int(torch.randint(1, n // 2 + 1, (1,), generator=gen))
        tokens = torch.randint(1, 256, (n,), generator=gen).tolist()
        examples.append((tokens, [0] * prompt + [1] * (n - prompt)))
    return examples


def _trainer(overrides: list, data, steps: int):
    from bench.common import small_config
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = small_config([*MODEL, *overrides], 1, steps)
    return Trainer(cfg, ParallelContext.single(), data)


def _timed_steps(trainer, first: int, steps: int, microbatches=None) -> tuple[float, float, float]:
    """(seconds, trained tokens, real tokens) of `steps` steps from `first`."""
    seconds = trained = real = 0.0
    for step in range(first, first + steps):
        batch = microbatches(step) if microbatches else trainer.microbatches(step)
        trained += float(sum(mb.loss_mask.sum() for mb in batch if mb.loss_mask is not None))
        real += float(sum((mb.tokens != 0).sum() for mb in batch))
        start = time.perf_counter()
        trainer.train_step(step, batch)
        seconds += time.perf_counter() - start
    return seconds, trained, real


def bench_sft(steps: int, rounds: int, mbs: int = 4) -> float:
    """Print trained tokens/s and padding of padded vs packed SFT; return the packed/padded ratio."""
    from data_pipeline.packing import PackedSFTData
    from data_pipeline.sft import SFTData

    examples = long_tail_examples(512, SEQ)
    lengths = [len(t) for t, _ in examples]
    print(f"sft: {len(examples)} examples, lengths mean {sum(lengths) / len(lengths):.0f} "
          f"(seq_length {SEQ}), median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}")
    sizes = [f"model.seq_length={SEQ}", f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs}"]
    total = steps * rounds + 1
    runs = {"padded": SFTData(examples, SEQ, 1, mbs, mbs, pad_id=0),
            "packed": PackedSFTData(examples, SEQ, 1, mbs, mbs, pad_id=0)}
    trainers = {name: _trainer(sizes, data, total) for name, data in runs.items()}
    sums = {name: [0.0, 0.0, 0.0] for name in runs}
    for name, trainer in trainers.items():
        _timed_steps(trainer, 0, 1)  # warm-up step
    for r in range(rounds):
        for name, trainer in trainers.items():
            for i, value in enumerate(_timed_steps(trainer, 1 + r * steps, steps)):
                sums[name][i] += value
    rate = {}
    for name, (seconds, trained, real) in sums.items():
        rows = steps * rounds * mbs
        rate[name] = trained / seconds
        print(f"sft {name}: {trained / seconds:9.0f} trained tokens/s, {rows / seconds:6.1f} rows/s, "
              f"{real / rows:5.1f} example tokens per row, padding {1 - real / (rows * (SEQ + 1)):.1%}")
    print(f"sft packed: {runs['packed'].rows.rows_per_epoch} rows per epoch for {len(examples)} examples "
          f"(epoch padding {runs['packed'].rows.padding_fraction():.1%})")
    return rate["packed"] / rate["padded"]


def bench_document_mask(steps: int, seq: int = 2048) -> None:
    """Print pre-training step time at `seq` with and without document masks (same tokens)."""
    import torch

    from data_pipeline.documents import document_layout
    from data_pipeline.microbatch import Microbatch

    gen = torch.Generator().manual_seed(1)
    lengths, total = [], 0
    while total < seq + 1:  # documents of mean ~400 tokens
        n = min(seq + 1 - total, max(16, int(math.exp(math.log(400) - 0.5 + float(torch.randn(1, generator=gen))))))
        lengths.append(n)
        total += n
    tokens = torch.randint(1, 384, (1, seq + 1), generator=gen)
    ids, positions, boundary = document_layout(lengths, seq)
    batches = {"no mask": [Microbatch(tokens)],
               "document mask": [Microbatch(tokens, boundary[None], ids[None], positions[None])]}
    sizes = [f"model.seq_length={seq}", "train.micro_batch_size=1", "train.global_batch_size=1"]
    trainers = {name: _trainer(sizes, None, steps + 1) for name in batches}
    for name, trainer in trainers.items():
        _timed_steps(trainer, 0, 1, lambda step, b=batches[name]: b)
    seconds = {name: _timed_steps(trainer, 1, steps, lambda step, b=batches[name]: b)[0] / steps
               for name, trainer in trainers.items()}
    work = sum(n * (n + 1) / 2 for n in lengths) / (seq * (seq + 1) / 2)
    print(f"pretrain seq {seq}: {len(lengths)} documents (mean {seq / len(lengths):.0f} tokens), attention pairs "
          f"computed with the mask {work:.1%} of causal")
    for name, value in seconds.items():
        print(f"pretrain {name}: {value * 1000:7.1f} ms/step")
    print(f"pretrain: document mask step time / no mask = {seconds['document mask'] / seconds['no mask']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and layout")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of padded / packed")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads (0: torch's default); 1 steadies timings on a shared, loaded machine")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench_document_mask(args.steps)
    ratio = bench_sft(args.steps, args.rounds)
    print(f"packing: trained tokens/s packed/padded = {ratio:.2f}")


if __name__ == "__main__":
    main()
