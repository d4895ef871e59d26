"""`apogee generate`'s job: prompts in, completions out, on one process or on tensor-parallel ranks.

Completion c of prompt p draws from a generator seeded by (seed, 'generate', p, c), so a run is
reproducible and the same on one rank or several. With nproc > 1 the ranks are started by the
elastic agent (engine/job/launch.py), each builds its tensor-parallel slice of the model
(engine/eval/loading.py), and rank 0 writes the results to a file the parent process reads.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from engine.eval.generate import Generator, completion_text
from engine.eval.loading import DTYPES, ModelSource, build_inference_model
from engine.eval.prompts import PromptItem
from parallel.random import generator


@dataclass
class SamplingRequest:
    """What to sample: the decoding settings of `apogee generate` (and of `apogee eval --tasks`)."""

    max_new_tokens: int = 64
    """Most tokens generated per completion."""
    temperature: float = 0.0
    """0: greedy; else the softmax temperature."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    seed: int = 1234
    """Seed of every completion's generator."""
    num_samples: int = 1
    """Completions per prompt."""
    stop: list = field(default_factory=list)
    """Stop strings: a completion ends once its text contains one (the text is cut before it)."""
    use_cache: bool = True
    """Decode with the KV cache (false re-runs the sequence for each token)."""
    dtype: str = "fp32"
    """fp32 or bf16."""


def sample_prompts(model, tokenizer, items: list[PromptItem], request: SamplingRequest, tp=None,
                   role: str = "generate") -> list[list]:
    """Per prompt, its request.num_samples (Completion, text) pairs."""
    sampler = Generator(model, min(tokenizer.vocab_size, model.cfg.vocab_size), tokenizer.eos_id, tp,
                        use_cache=request.use_cache, pad_id=tokenizer.pad_id,
                        device=next(model.parameters()).device)
    out = []
    for index, item in enumerate(items):
        generators = [generator(request.seed, role, index, c) for c in range(request.num_samples)]
        completions = sampler.generate(item.ids, generators, request.max_new_tokens, request.temperature,
                                       request.top_p, request.stop, tokenizer.decode if request.stop else None)
        out.append([(c, completion_text(c, tokenizer.decode, tokenizer.eos_id, request.stop)) for c in completions])
    return out


def result_records(items: list[PromptItem], samples: list[list]) -> list[dict]:
    """The --json objects: prompt, prompt_ids, completion_ids, text and finish_reason of the first
    completion, and every completion under 'samples' when there are several."""
    records = []
    for item, pairs in zip(items, samples):
        runs = [{"completion_ids": c.ids, "text": text, "finish_reason": c.finish} for c, text in pairs]
        record = {"prompt": item.text, "prompt_ids": list(item.ids), **runs[0]}
        if len(runs) > 1:
            record["samples"] = runs
        records.append(record)
    return records


def generate_on_rank(source: ModelSource, items: list[PromptItem], request: SamplingRequest, ctx,
                     out_file: Optional[str] = None) -> list[dict]:
    """This rank's part of the job (every TP rank samples the same tokens); rank 0 writes `out_file`."""
    from data_pipeline.tokenizer import get_tokenizer
    from parallel.collectives import CommLedger

    ledger = CommLedger()
    model = build_inference_model(source, ctx, DTYPES[request.dtype], ledger)
    tp = ctx.comm_group("tp", ledger) if ctx.world_size > 1 else None
    records = result_records(items, sample_prompts(model, get_tokenizer(source.tokenizer), items, request, tp))
    if out_file is not None and ctx.rank == 0:
        with open(out_file, "w") as handle:
            json.dump(records, handle)
    return records


def generation_rank_main(source: ModelSource, items: list[PromptItem], request: SamplingRequest, out_file: str) -> None:
    """The elastic agent's entry point for `apogee generate --nproc N` (N tensor-parallel ranks)."""
    from engine.job.launch import cpu_threads_per_rank, detect_launcher, init_distributed
    from parallel.layout import ParallelLayout
    from parallel.process_group import leave
    from parallel.topology import ParallelContext

    info = detect_launcher()
    torch.set_num_threads(cpu_threads_per_rank(info.local_world_size))
    device = init_distributed(info)
    try:
        ctx = ParallelContext.create(ParallelLayout(tp=info.world_size, dp=1), device=device)
        generate_on_rank(source, items, request, ctx, out_file)
    finally:
        leave()


def run_generation(source: ModelSource, items: list[PromptItem], request: SamplingRequest, nproc: int = 1) -> list[dict]:
    """Completions of every prompt: in this process, or on `nproc` tensor-parallel local ranks."""
    if nproc == 1:
        from parallel.topology import ParallelContext

        return generate_on_rank(source, items, request, ParallelContext.single())
    from engine.job.launch import launch_local

    handle, out_file = tempfile.mkstemp(prefix="apogee-generate-", suffix=".json")
    os.close(handle)
    try:
        status = launch_local(nproc, generation_rank_main, (source, items, request, out_file))
        if status != 0:
            raise RuntimeError(f"apogee generate: a rank failed (exit status {status})")
        with open(out_file) as results:
            return json.load(results)
    finally:
        os.unlink(out_file)


def request_dict(request: SamplingRequest) -> dict:
    """The request as a plain dict (for logs and reports)."""
    return asdict(request)
