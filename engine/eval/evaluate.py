"""`apogee eval`: a checkpoint's loss, perplexity and bits per byte on held-out data, and its accuracy
and pass@k on tasks with checkable answers.

Data (`--data`): a dataset prefix (PREFIX.bin/.idx; its token ids are checked against the
model's vocabulary first, data_pipeline/token_range.py) or text / JSONL / Parquet inputs, which
are tokenized with the checkpoint's tokenizer (data_pipeline/preprocess.py, EOD after each
document). Its documents, concatenated in order, are cut into windows of seq_length + 1 tokens
that overlap by one, so every token after the first is predicted exactly once, with the
context of its window. loss is the mean next-token cross-entropy (nats), ppl = exp(loss), and,
for the byte tokenizer, bits_per_byte = the summed cross-entropy / ln 2 / the predicted bytes
(EOD predictions count in the sum, not as bytes).

Tasks (`--tasks`): {prompt, answer} lines (GRPO's format; {messages, answer} too); each prompt
gets `num_samples` completions (engine/eval/sample_job.py), each scored by a reward of
engine/rewards.py (exact_match, contains, module:function). accuracy is the share of completions
with reward 1, reward_mean their mean reward, and pass@k the unbiased estimator of Chen et al.
2021 (HumanEval): the mean over prompts of 1 - C(n - c, k) / C(n, k) for n samples of which c
are correct.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import tempfile
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from engine.eval.loading import ModelSource
from engine.eval.sample_job import SamplingRequest, sample_prompts


@dataclass
class EvalRequest:
    """What `apogee eval` measures on each checkpoint."""

    data: list = field(default_factory=list)
    """Dataset prefixes or text/JSONL inputs for loss, ppl and bits per byte."""
    tasks: list = field(default_factory=list)
    """{prompt, answer} JSONL files for accuracy and pass@k."""
    json_key: str = "text"
    """Text field of JSONL data inputs."""
    max_tokens: Optional[int] = None
    """Tokens of --data evaluated per input (None: all)."""
    batch_size: int = 8
    """Windows per forward pass."""
    seq_length: Optional[int] = None
    """Context of the data windows (None: the model's seq_length; at most it)."""
    reward: str = "exact_match"
    """The reward scoring a completion against its answer."""
    pass_k: list = field(default_factory=list)
    """k values of pass@k (each <= num_samples)."""
    chat: bool = False
    """Render task prompts with the chat template."""
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    """Decoding of the task completions."""


def data_prefix(spec: str, tokenizer_name: str, vocab_size: int, workdir: str, where: str) -> str:
    """A dataset prefix of `spec` whose ids fit the model: the prefix itself (its ids checked), or
    `spec` tokenized into `workdir`; DataError naming the file when it cannot be used."""
    from data_pipeline.indexed_dataset import dataset_exists
    from data_pipeline.token_range import check_token_ids

    from data_pipeline import DataError

    if dataset_exists(spec):
        try:
            check_token_ids(spec, vocab_size, None, option="model.vocab_size")
        except DataError as error:
            raise DataError(f"--data {spec} for {where}: {error}") from None
        return spec
    from data_pipeline.preprocess import preprocess

    # Checkpoints with the same tokenizer share one tokenized copy.
    prefix = str(Path(workdir) / f"data-{hashlib.sha256(repr((spec, tokenizer_name)).encode()).hexdigest()[:16]}")
    if not dataset_exists(prefix):
        with contextlib.redirect_stdout(sys.stderr):  # its summary line is a log, not a result
            preprocess([spec], prefix, tokenizer=tokenizer_name, workers=1, progress=False)
    return prefix


def token_stream(prefix: str, max_tokens: Optional[int]) -> np.ndarray:
    """Every token of the dataset's documents in order (the first max_tokens of them)."""
    from data_pipeline.indexed_dataset import IndexedDatasetReader

    tokens = IndexedDatasetReader(prefix).tokens
    return np.asarray(tokens[:max_tokens] if max_tokens else tokens, dtype=np.int64)


@torch.no_grad()
def stream_loss(model, tokens: np.ndarray, seq_length: int, batch_size: int, byte_vocab: Optional[int]) -> dict:
    """loss, ppl, tokens (and bits_per_byte when byte_vocab names the byte range) of a token stream."""
    if len(tokens) < 2:
        raise ValueError(f"{len(tokens)} tokens: at least 2 are needed to predict one")
    device = next(model.parameters()).device
    starts = list(range(0, len(tokens) - 1, seq_length))
    nll, count, predicted_bytes = 0.0, 0, 0
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        windows = [tokens[s:s + seq_length + 1] for s in group]
        for length in sorted({len(w) for w in windows}):  # the last window may be shorter
            rows = torch.from_numpy(np.stack([w for w in windows if len(w) == length])).to(device)
            logits = model(rows[:, :-1]).float()
            targets = rows[:, 1:]
            nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double())
            count += targets.numel()
            if byte_vocab is not None:
                predicted_bytes += int((targets < byte_vocab).sum())
    out = {"loss": nll / count, "tokens": count}
    out["ppl"] = math.exp(min(out["loss"], 700.0))
    if byte_vocab is not None:
        out["bits_per_byte"] = nll / math.log(2) / max(1, predicted_bytes)
    return out


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one prompt with `correct` of `samples` completions correct."""
    if samples - correct < k:
        return 1.0
    return 1.0 - comb(samples - correct, k) / comb(samples, k)


def task_scores(model, tokenizer, items: list, request: EvalRequest) -> dict:
    """accuracy, reward_mean, pass@k and the prompt count of the task prompts `items`."""
    from engine.rewards import reward_function

    reward = reward_function(request.reward)
    samples = sample_prompts(model, tokenizer, items, request.sampling, role="eval")
    rewards = [[float(reward(text, item.answer)) for _, text in pairs] for item, pairs in zip(items, samples)]
    flat = [r for row in rewards for r in row]
    out = {"accuracy": sum(r == 1 for r in flat) / len(flat), "reward_mean": sum(flat) / len(flat),
           "tasks": len(items)}
    for k in request.pass_k:
        out[f"pass@{k}"] = sum(pass_at_k(len(row), sum(r == 1 for r in row), k) for row in rewards) / len(rewards)
    return out


def evaluate_checkpoint(source: ModelSource, tokenizer, request: EvalRequest, task_items: list,
                        prefixes: list) -> dict:
    """The metrics of one checkpoint: loss/ppl/bits_per_byte over `prefixes`, task scores of `task_items`."""
    from engine.eval.loading import DTYPES, build_inference_model
    from parallel.topology import ParallelContext

    model = build_inference_model(source, ParallelContext.single(), DTYPES[request.sampling.dtype])
    row: dict = {"checkpoint": str(source.path), "step": source.step}
    if prefixes:
        byte_vocab = 256 if getattr(tokenizer, "name", None) == "byte" else None
        tokens = np.concatenate([token_stream(prefix, request.max_tokens) for prefix in prefixes])
        seq = min(request.seq_length or source.model.seq_length, source.model.seq_length)
        row.update(stream_loss(model, tokens, seq, request.batch_size, byte_vocab))
    if task_items:
        row.update(task_scores(model, tokenizer, task_items, request))
    return row


def prepare_inputs(source: ModelSource, tokenizer, request: EvalRequest, workdir: str) -> tuple[list, list]:
    """(dataset prefixes, task PromptItems) for one checkpoint, every input checked (DataError names
    the file and line) before any model runs."""
    from engine.eval.prompts import check_lengths, read_prompt_file

    where = str(source.path)
    prefixes = [data_prefix(spec, source.tokenizer, source.model.vocab_size, workdir, where) for spec in request.data]
    items = [item for path in request.tasks
             for item in read_prompt_file(path, tokenizer, request.chat, "--tasks", answer_key="answer")]
    check_lengths(items, request.sampling.max_new_tokens, source.model.seq_length)
    return prefixes, items


def evaluate_all(sources: list, tokenizers: list, request: EvalRequest, log=print) -> list[dict]:
    """One metrics row per checkpoint (`sources` and their tokenizers), every input checked first."""
    with tempfile.TemporaryDirectory(prefix="apogee-eval-") as workdir:
        prepared = [prepare_inputs(source, tokenizer, request, workdir) for source, tokenizer in zip(sources, tokenizers)]
        rows = []
        for source, tokenizer, (prefixes, items) in zip(sources, tokenizers, prepared):
            log(f"apogee: evaluating {source.path} ({source.kind})")
            rows.append(evaluate_checkpoint(source, tokenizer, request, items, prefixes))
    return rows
