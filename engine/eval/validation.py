"""Validation during training: the held-out data of a run and the validation pass (train.eval_interval).

Validation data is addressed like training data, by (batch, microbatch, dp rank): batch i of a
pass is global batch i of the validation stream, i < train.eval_iters, the same batches every
pass (Megatron's validation iterator moves on from pass to pass; fixed batches make passes
comparable). For the pre-training blend it is the 'valid' part of `data.split` of every input,
blended with `data.weights` (the documents and order of megatron-core's
BlendedMegatronDatasetBuilder), or `data.valid_inputs`; a stage with its own data holds out its
own file (`Stage.build_validation_data`: sft/dpo/grpo.valid_inputs).

A pass changes nothing the training reads: it runs under no_grad (no gradient, no MoE balance
loss), draws no random numbers from a shared stream, leaves the fp8 amaxes of the step as they
were, and reads its data by position, so a run is bitwise the same with and without validation.
Each rank computes the sums its trainer's `validation_sums` returns for its microbatches (the
language-model loss and token count by default; the pipeline's last stage holds them at pp > 1),
summed over the data/context-parallel ranks and the pipeline: every layout gives the single-rank
values. `validation_metrics` turns the sums into metrics.jsonl keys (val_loss, val_ppl, ...).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from engine.config import ApogeeConfig, ConfigError
from parallel.collectives import all_reduce
from parallel.pipeline import StageComm

NO_VALIDATION_DATA = ("train.eval_interval={interval}: there is no validation data; set data.split with a "
                      "validation part (e.g. data.split='969,30,1') or data.valid_inputs=[PREFIX]")


def blend_validation_data(cfg: ApogeeConfig):
    """The pre-training blend's validation data (see the module doc); ConfigError when there is none."""
    from data_pipeline.corpus import ensure_corpus
    from data_pipeline.gpt_dataset import split_fractions
    from data_pipeline.loader import TrainingData

    d, t = cfg.data, cfg.train
    if d.valid_inputs:
        prefixes, weights, split, part = [ensure_corpus(s, d.cache_dir, d.tokenizer) for s in d.valid_inputs], None, "1,0,0", 0
    elif split_fractions(d.split)[1] > 0:
        prefixes = [ensure_corpus(s, d.cache_dir, d.tokenizer) for s in d.inputs]
        weights, split, part = d.weights, d.split, 1
    else:
        raise ConfigError(NO_VALIDATION_DATA.format(interval=t.eval_interval))
    return TrainingData(prefixes=prefixes, weights=weights, seq_length=cfg.model.seq_length, seed=cfg.seed,
                        global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                        steps=t.eval_iters, cache_dir=d.cache_dir, reserve_steps=0, split=split, part=part,
                        document_mask=d.document_mask, reset_position_ids=d.reset_position_ids)


def check_validation_prefixes(cfg: ApogeeConfig) -> None:
    """Refuse validation datasets with token ids past the model's vocabulary (before ranks start)."""
    from data_pipeline.corpus import ensure_corpus
    from data_pipeline.token_range import check_token_ids

    for spec in cfg.data.valid_inputs:
        prefix = ensure_corpus(spec, cfg.data.cache_dir, cfg.data.tokenizer)
        check_token_ids(prefix, cfg.model.vocab_size, cfg.data.cache_dir, option="model.vocab_size")


def eval_due(trainer, done: int) -> bool:
    """Whether a validation pass follows step `done` (1-based): every eval_interval steps and after the last."""
    interval = trainer.cfg.train.eval_interval
    return (getattr(trainer, "validation_data", None) is not None and interval > 0
            and (done % interval == 0 or done == trainer.cfg.train.steps))


@contextmanager
def fp8_amaxes_kept(trainer):
    """Leave the fp8 amaxes of the step as they were: a validation forward must not move the scales."""
    roles = [role for meta in trainer.fp8.metas.values() for role in meta.roles()] if trainer.fp8 is not None else []
    saved = [role.amax.clone() for role in roles]
    try:
        yield
    finally:
        for role, amax in zip(roles, saved):
            role.amax = amax


def lm_validation_sums(trainer, microbatches: list) -> torch.Tensor:
    """[loss sum, trained-token count] of this rank's share of `microbatches` (fp64 sums)."""
    sums = torch.zeros(2, dtype=torch.float64)
    if trainer.pp.size > 1:
        return pipeline_validation_sums(trainer, microbatches)
    for microbatch in microbatches:
        inputs, targets, positions, loss_mask = trainer.prepare_microbatch(microbatch)
        loss_sum, count = trainer.loss_fn(trainer.model(inputs, positions=positions,
                                                         documents=trainer.documents(microbatch)), targets, loss_mask)
        sums += torch.stack([loss_sum.double().cpu(), count.double().cpu()])
    return sums


def pipeline_validation_sums(trainer, microbatches: list) -> torch.Tensor:
    """lm_validation_sums through the pipeline's forward-only pass (the last stage holds the sums)."""
    from parallel.pipeline_forward import run_forward_only

    p = trainer.cfg.parallel
    sums = torch.zeros(2, dtype=torch.float64)
    local_seq = trainer.cfg.model.seq_length // trainer.cp.size // (trainer.tp.size if p.sequence_parallel else 1)
    shape = (trainer.cfg.train.micro_batch_size, local_seq, trainer.cfg.model.hidden_size)
    comm = StageComm(trainer.pp, len(trainer.chunks), shape, trainer.dtype, trainer.ctx.device)

    def forward_step(chunk: int, j: int, stage_input):
        inputs, targets, positions, loss_mask = trainer.prepare_microbatch(microbatches[j])
        model = trainer.chunks[chunk]
        output = model(inputs if model.pre_process else stage_input, positions=positions,
                       documents=trainer.documents(microbatches[j]))
        if model.post_process:
            loss_sum, count = trainer.loss_fn(output, targets, loss_mask)
            sums.add_(torch.stack([loss_sum.double().cpu(), count.double().cpu()]))
        return output

    run_forward_only(comm, len(microbatches), forward_step)
    return sums


def lm_validation_metrics(sums: torch.Tensor) -> dict:
    """val_loss (mean per trained token) and val_ppl = exp(val_loss) from the reduced sums."""
    loss = float(sums[0] / max(1.0, float(sums[1])))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def run_validation(trainer, data) -> dict:
    """One validation pass over train.eval_iters batches of `data` (every rank calls it); the
    trainer's validation_metrics of the sums over all ranks, and val_time (seconds)."""
    start = time.perf_counter()
    total = None
    was_training = [chunk.training for chunk in trainer.chunks]
    with torch.no_grad(), fp8_amaxes_kept(trainer):
        for chunk in trainer.chunks:
            chunk.eval()
        try:
            for batch in range(trainer.cfg.train.eval_iters):
                microbatches = [data.microbatch(batch, j, trainer.dp.rank, trainer.dp.size)
                                for j in range(trainer.num_microbatches)]
                sums = trainer.validation_sums(microbatches)
                total = sums if total is None else total + sums
        finally:
            for chunk, mode in zip(trainer.chunks, was_training):
                chunk.train(mode)
    total = total.to(trainer.ctx.device)
    # The sums are per data-parallel (and context-parallel) rank, and on the last stage only.
    for group in (trainer.grad_group, trainer.pp):
        if group.size > 1:
            all_reduce(total, group, purpose="validation")
    metrics = trainer.validation_metrics(total.cpu())
    metrics["val_time"] = time.perf_counter() - start
    return metrics
