"""The pre-training step loop of one rank.

A step is a pure function of (model and optimizer state, step index): its microbatches come from
`TrainingData.microbatch(step, j, dp_rank, dp_size)` and never from an iterator's hidden position,
so re-running step k from the same state gives a bitwise-equal loss (replay), and a resumed run
continues exactly where an uninterrupted one would be.

One step: zero the fp32 gradient buffer -> forward/backward every microbatch (the DP reduction of
each gradient bucket starts during the last backward) -> wait for the reductions -> clip and
AdamW with the scheduled learning rate -> log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from data_pipeline.loader import data_batch_index
from data_pipeline.microbatch import Microbatch
from engine.config import ApogeeConfig
from engine.model.meta_init import materialize, meta_model
from engine.model.lora import apply_lora
from engine.model.moe import set_aux_loss_scale, take_aux_loss
from engine.model.parallelize import (all_reduce_tied_embedding_grads, counts_in_norm, expert_gradient_group,
                                      finish_sequence_parallel_grads, grad_norm_sq_reduce, gradient_reduction_group,
                                      loss_function, parallelize_model)
from engine.model.fp8.training import Fp8Training
from engine.resilience.hooks import ResilienceHooks
from engine.resilience.spikes import SpikeDetector
from engine.resilience.stragglers import StepTimer
from engine.state.init_from import initialize_chunks
from engine.state.export import tokenizer_source
from engine.train.events import EventLog
from engine.train.grad_sync import build_grad_sync, memory_bytes
from engine.train.metrics import PeakFlops, flops_per_step
from engine.train.optim import lr_at
from parallel.collectives import CommLedger, all_reduce
from parallel.context_parallel import split_for_context_parallel
from parallel.pipeline import StageComm, run_schedule, schedule_order, stage_layer_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass
class StepResult:
    """What one optimizer step produced (the loss is the global-batch mean over all tokens)."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    iteration_time: float
    load_balancing_loss: Optional[float] = None
    """MoE models: the balance loss per MoE layer (coeff included; coeff for a perfectly balanced router)."""
    extra: dict = dataclasses.field(default_factory=dict)
    """Objective-specific metrics of the step (e.g. DPO's reward_accuracy), logged as they are."""
    compute_time: Optional[float] = None
    """Seconds this rank computed (CUDA: GPU time of a recent step's forward and backward)."""
    wait_time: Optional[float] = None
    """Seconds of the step this rank spent blocked in collectives (iteration_time - compute_time)."""


class Trainer:
    """Builds this rank's model, gradient buffer and optimizer, and runs training steps."""

    validation_data = None
    """Held-out data for the validation passes (engine/eval/validation.py), set by the runner; None: none."""

    def __init__(self, cfg: ApogeeConfig, ctx, data, run_dir: Optional[Path] = None,
                 peak: Optional[PeakFlops] = None, resilience: Optional[ResilienceHooks] = None):
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.events = EventLog(self.run_dir, ctx.rank) if self.run_dir is not None else None
        hooks = resilience or ResilienceHooks()
        # engine/resilience: rehearsed faults before each step, a watchdog beaten after it, SIGUSR1.
        self.fault_injector, self.heartbeat, self.stop_request = hooks.fault_injector, hooks.heartbeat, hooks.stop_request
        self.last_local_loss = torch.zeros(())  # this rank's loss sum of the last step, before reduction
        self.ledger = CommLedger()
        if hasattr(self.heartbeat, "watch"):  # a hang is attributed with this ledger's collective counters
            self.heartbeat.watch(self.ledger, ctx.world_size)
        self.dp = ctx.comm_group("dp", self.ledger)
        self.world = ctx.comm_group("world", self.ledger)
        self.tp = ctx.comm_group("tp", self.ledger)
        self.cp = ctx.comm_group("cp", self.ledger)
        self.pp = ctx.comm_group("pp", self.ledger)
        self.stage_comm: Optional[StageComm] = None  # the last step's p2p (its wait time is the bubble)
        # Gradients and the loss sum are reduced over dp x cp; data is sharded over dp only.
        self.grad_group = gradient_reduction_group(ctx, self.ledger)
        self.dtype = DTYPES[cfg.precision.dtype]
        # fp8: the decoder GEMMs run in fp8, through Transformer Engine or its emulation (engine/model/fp8/).
        self.fp8 = Fp8Training(cfg, ctx, self.ledger) if cfg.precision.dtype == "fp8" else None
        self.chunks = self.build_model_chunks()
        if self.fp8 is not None:
            self.fp8.convert(self.chunks)
            if ctx.rank == 0:
                print(f"apogee: {self.fp8.log_line}", flush=True)
        self.loss_fn = loss_function(cfg, ctx, self.ledger)
        # parallel.zero selects plain DP (GradBuffer + MasterWeightOptimizer) or a ZeRO stage.
        # Expert weights reduce over expert-dp, the ranks that hold the same experts (ep > 1).
        self.expert_group = expert_gradient_group(ctx, self.ledger) if cfg.parallel.ep > 1 else None
        self.grads, self.optimizer = build_grad_sync(cfg, self.chunks, self.grad_group,
                                                     counts_in_norm(ctx, cfg.model.tie_embeddings), self.tp,
                                                     self.expert_group)
        self.grad_norm_sq_reduce = grad_norm_sq_reduce(ctx, self.ledger)
        # Sequence parallelism shards the residual stream, so RoPE is given the full positions.
        self.positions = torch.arange(cfg.model.seq_length, device=ctx.device)
        self.peak = peak
        self.step_flops = flops_per_step(cfg.model, cfg.train.global_batch_size)
        self.global_tokens = cfg.train.global_batch_size * cfg.model.seq_length
        self.step_tokens = self.global_tokens  # the tokens the step's loss averages over (loss_divisor)
        set_aux_loss_scale(self.chunks, self.global_tokens)  # MoE balance loss, averaged like the LM loss
        # The step guard fingerprints this trainer's buffers and parameters: built last.
        self.guard = hooks.make_guard(self) if hooks.make_guard is not None else None
        self.stragglers = hooks.make_stragglers(self) if hooks.make_stragglers and ctx.world_size > 1 else None
        self.step_timer = StepTimer(ctx.device)  # compute vs wait time of each step (stragglers)

    def build_model_chunks(self) -> list[torch.nn.Module]:
        """This rank's model chunks (one, or several with interleaved pipeline stages), parallelised
        and initialised. Tensor parallelism is applied on the meta device, before init, so each rank
        materialises and draws only its shard (engine/model/meta_init.py)."""
        p = self.cfg.parallel
        if p.pp == 1:
            return [self._build_chunk(None, pre_process=True, post_process=True)]
        # Chunk c of stage r is model chunk c*pp + r: the embedding lives in model chunk 0 (first
        # stage, chunk 0), the head and loss in the last one (last stage, last chunk).
        layer_ids = stage_layer_ids(self.cfg.model.num_layers, p.pp, p.virtual_stages, self.ctx.pp_rank)
        last = len(layer_ids) - 1
        return [self._build_chunk(ids, pre_process=self.ctx.is_first_stage and c == 0,
                                  post_process=self.ctx.is_last_stage and c == last)
                for c, ids in enumerate(layer_ids)]

    def _build_chunk(self, layer_ids, pre_process: bool, post_process: bool) -> torch.nn.Module:
        # Built and parallelised on the meta device; only this rank's shard ever gets storage.
        model = meta_model(self.cfg.model, layer_ids, pre_process=pre_process, post_process=post_process)
        model = parallelize_model(model, self.cfg, self.ctx, self.ledger)
        lora = self.cfg.lora
        if lora.rank:  # adapters on the (parallel) layers, before init gives them values
            apply_lora(model, lora.rank, lora.alpha, tuple(lora.targets))
        model = materialize(model, self.cfg.seed, self.ctx.device, self.dtype)
        if self.cfg.train.compile:  # opt-in: compiles each decoder layer in place (names unchanged)
            from engine.model.compile import compile_layers
            compile_layers(model)
        return model

    def frozen_reference(self) -> list[torch.nn.Module]:
        """A frozen copy of this rank's chunk at the run's starting weights (train.init_from, else
        the seed's): the DPO/GRPO reference, rebuilt the same way on resume (those run at pp=1)."""
        reference = [self._build_chunk(None, pre_process=True, post_process=True)]
        if self.cfg.train.init_from:
            initialize_chunks(reference, self.cfg.train.init_from, self.cfg.model.tie_embeddings, self.ctx.world_size)
        for p in reference[0].parameters():
            p.requires_grad_(False)
        return reference

    def anomaly_detector(self, cfg) -> SpikeDetector:
        """The step guard's rule: loss / grad-norm spikes vs a running median (others override it)."""
        return SpikeDetector(cfg.spike_window, cfg.spike_factor, cfg.grad_spike_factor, cfg.spike_sigmas)

    @property
    def model(self) -> torch.nn.Module:
        """The model chunk of a rank that holds one (every layout but interleaved pipelines)."""
        if len(self.chunks) != 1:
            raise AttributeError(f"this rank holds {len(self.chunks)} model chunks; use trainer.chunks")
        return self.chunks[0]

    def named_parameters(self):
        """(name, parameter) over every chunk; names are global, so they never collide across chunks.

        Every reader outside forward comes here (checkpoints, the guard): under
        parallel.overlap_param_gather the last step's parameter all-gathers are waited for first."""
        getattr(self.grads, "wait_params", lambda: None)()
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    @property
    def num_microbatches(self) -> int:
        """Microbatches per step on each data-parallel rank."""
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.dp.size)

    def microbatches(self, step: int) -> list[Microbatch]:
        """This rank's microbatches for `step` (tokens [mbs, seq+1] each, and a loss mask where data has one)."""
        return [self.data.microbatch(step, j, self.dp.rank, self.dp.size, self.cfg.data.skip_steps)
                for j in range(self.num_microbatches)]

    def prepare_microbatch(self, microbatch: Microbatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """A microbatch -> (inputs [mbs, s], targets [mbs, s], RoPE positions [s], loss mask [mbs, s] or None).

        Only some targets count when the microbatch has a loss mask (SFT trains on responses
        only). With context parallelism s is this CP rank's s/cp tokens (zigzag chunks r and 2cp-1-r).
        """
        loss_mask = microbatch.loss_mask
        tokens = microbatch.tokens.to(self.ctx.device, non_blocking=True)
        inputs, targets, positions = tokens[:, :-1], tokens[:, 1:], self.positions[:tokens.shape[1] - 1]
        if microbatch.positions is not None:  # per-row positions restarting per document ([mbs, s])
            positions = microbatch.positions.to(self.ctx.device, non_blocking=True)
        if loss_mask is not None:
            loss_mask = loss_mask.to(self.ctx.device, non_blocking=True)
        if self.cp.size > 1:  # this CP rank's two load-balanced chunks, with their true positions
            inputs, targets, positions = (split_for_context_parallel(t, t.dim() - 1, self.cp.rank, self.cp.size)
                                          for t in (inputs, targets, positions))
            if loss_mask is not None:
                loss_mask = split_for_context_parallel(loss_mask, 1, self.cp.rank, self.cp.size)
        return inputs, targets, positions, loss_mask

    def documents(self, microbatch: Microbatch) -> Optional[torch.Tensor]:
        """The microbatch's document ids [mbs, s] on this rank's device (the model's `documents=`), or None.

        Always the full sequence's: context parallelism with documents is refused at config time,
        and under sequence parallelism attention sees the whole sequence."""
        if microbatch.document_ids is None:
            return None
        return microbatch.document_ids.to(self.ctx.device, non_blocking=True)

    def loss_divisor(self, microbatches: list) -> int:
        """The step's global count of trained tokens: every token, or the masked-in ones summed over
        the data-parallel ranks (CP ranks of one DP rank read the same samples). Dividing each
        microbatch's loss sum by it makes the sum of gradients over ranks the global mean."""
        masks = [mb.loss_mask for mb in microbatches]
        if all(m is None for m in masks):
            return self.global_tokens
        count = torch.tensor(float(sum(int(m.sum()) for m in masks)), device=self.ctx.device)
        all_reduce(count, self.dp, purpose="metrics")
        return max(1, int(count.item()))

    def forward_backward(self, microbatches: list[Microbatch]) -> torch.Tensor:
        """Forward and backward over this rank's microbatches; returns the local loss sum (fp32)."""
        if self.pp.size > 1:
            return self.pipeline_forward_backward(microbatches)
        loss_total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for j, microbatch in enumerate(microbatches):
            inputs, targets, positions, loss_mask = self.prepare_microbatch(microbatch)
            self.grads.is_last_microbatch = j == len(microbatches) - 1
            with self.fp8_forward(j):
                logits = self.model(inputs, positions=positions, documents=self.documents(microbatch))
            loss_sum, _ = self.loss_fn(logits, targets, loss_mask)
            # Dividing by the global token count makes the DP sum of gradients the global mean.
            (loss_sum / self.step_tokens).backward()
            loss_total += loss_sum.detach()
        return loss_total

    def pipeline_forward_backward(self, microbatches: list[Microbatch]) -> torch.Tensor:
        """Run this stage's pipeline schedule (1F1B, or interleaved with virtual stages); returns the
        loss sum of this DP rank's microbatches (computed on the last stage, summed over the PP group)."""
        p, m = self.cfg.parallel, len(microbatches)
        loss_total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        # Activations between stages are [b, s, h] with s sharded over CP and, under SP, over TP.
        local_seq = self.cfg.model.seq_length // self.cp.size // (self.tp.size if p.sequence_parallel else 1)
        shape = (self.cfg.train.micro_batch_size, local_seq, self.cfg.model.hidden_size)
        self.stage_comm = StageComm(self.pp, len(self.chunks), shape, self.dtype, self.ctx.device)

        def forward_step(chunk: int, j: int, stage_input: Optional[torch.Tensor]) -> torch.Tensor:
            inputs, targets, positions, loss_mask = self.prepare_microbatch(microbatches[j])
            model = self.chunks[chunk]
            with self.fp8_forward(j):
                output = model(inputs if model.pre_process else stage_input, positions=positions,
                               documents=self.documents(microbatches[j]))
            if not model.post_process:
                return output
            loss_sum, _ = self.loss_fn(output, targets, loss_mask)
            loss_total.add_(loss_sum.detach())
            return loss_sum / self.step_tokens

        def before_backward(chunk: int, j: int) -> None:
            # Each chunk runs its microbatches in order, so its parameters' gradients are complete
            # after its backward of the last one: DP buckets may launch then, overlapping the rest.
            self.grads.is_last_microbatch = j == m - 1

        run_schedule(schedule_order(p.pp, self.ctx.pp_rank, m, p.virtual_stages), self.stage_comm,
                     forward_step, before_backward)
        all_reduce(loss_total, self.pp, purpose="metrics")
        return loss_total

    def train_step(self, step: int, microbatches: Optional[list[Microbatch]] = None) -> StepResult:
        """Run optimizer step `step` (0-based) and return its global loss, grad norm and lr."""
        start = time.perf_counter()
        self.ledger.reset()
        self.step_timer.start()
        if microbatches is None:
            microbatches = self.microbatches(step)
        if self.guard is not None:
            batch = data_batch_index(step, self.cfg.data.skip_steps)
            microbatches = self.guard.garbage_batch(step, batch, microbatches, self.cfg.model.vocab_size)
        self.step_tokens = self.loss_divisor(microbatches)
        if self.guard is not None:  # traced from here: what an audit computes again
            self.guard.begin_step(step)
        take_aux_loss(self.chunks)  # start the step's balance-loss sum from zero
        self.grads.start_step()
        loss_total = self.forward_backward(microbatches)
        if self.fault_injector is not None:  # a rehearsed straggler computes slower
            self.fault_injector.slow_down(step, time.perf_counter() - start - self.ledger.wait_s)
        self.step_timer.computed()
        self.grads.finish()
        if self.guard is not None and self.guard.audits(step):
            # A periodic audit: the same step again, from the same state, must match bit for bit.
            first = self.guard.snapshot(loss_total)
            self.guard.begin_step(step)
            take_aux_loss(self.chunks)
            self.grads.start_step()
            loss_total = self.forward_backward(microbatches)
            self.grads.finish()
            self.guard.audit(step, first, loss_total)
        self.last_local_loss = loss_total.clone()
        lr, grad_norm = self.optimizer_step(step)
        # Every TP rank computed the full loss of its tokens: the sum over DP x CP is the global sum.
        all_reduce(loss_total, self.grad_group, purpose="metrics")
        loss = loss_total.item() / self.step_tokens
        balance = self.load_balancing_loss()
        elapsed = time.perf_counter() - start
        compute = min(elapsed, self.step_timer.compute_s(elapsed - self.ledger.wait_s))
        return StepResult(step, loss, float(grad_norm), lr, elapsed, balance, compute_time=compute,
                          wait_time=elapsed - compute)

    def load_balancing_loss(self) -> Optional[float]:
        """The step's MoE balance loss per MoE layer, summed over every rank's tokens (None when dense)."""
        if not self.cfg.model.num_experts:
            return None
        total = take_aux_loss(self.chunks).to(self.ctx.device)
        # Ranks of the reduction group hold other tokens, pipeline stages other layers.
        all_reduce(total, self.grad_group, purpose="metrics")
        all_reduce(total, self.pp, purpose="metrics")
        return total.item() / self.global_tokens / self.cfg.model.num_layers

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """After the gradients are complete: finish partial (SP) grads, clip, AdamW; (lr, grad norm)."""
        for chunk in self.chunks:
            finish_sequence_parallel_grads(chunk, self.tp)
        all_reduce_tied_embedding_grads(self.chunks, self.ctx, self.ledger)
        lr = lr_at(step, self.cfg.optim, self.cfg.train.steps)
        grad_norm = self.optimizer.step(lr, self.grad_norm_sq_reduce)
        if self.fp8 is not None:
            self.fp8.step_done()  # delayed scaling: the step's amaxes set the next step's scales
        return lr, grad_norm

    def fp8_forward(self, microbatch: int):
        """The context of microbatch `microbatch`'s forward: fp8's (TE's autocast), or none."""
        return self.fp8.forward(microbatch) if self.fp8 is not None else contextlib.nullcontext()

    def record(self, result: StepResult) -> dict:
        """The metrics.jsonl record of a step."""
        tokens_per_s = self.global_tokens / result.iteration_time
        mfu = self.step_flops / result.iteration_time / self.peak.flops_per_s if self.peak else 0.0
        return {"step": result.step + 1, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "iteration_time": result.iteration_time,
                "batch_size": self.cfg.train.global_batch_size,
                **({"load_balancing_loss": result.load_balancing_loss} if result.load_balancing_loss is not None else {}),
                "throughput": self.step_flops / result.iteration_time / 1e12 / max(1, self.ctx.world_size),
                "comm_bytes": self.ledger.summary(), **self.memory_metrics(), **result.extra}

    def memory_metrics(self) -> dict:
        """This rank's persistent bytes of parameters, gradients and optimizer state (metrics keys)."""
        mem = memory_bytes(self.grads, self.optimizer)
        return {"mem_params_bytes": mem["params"], "mem_grads_bytes": mem["grads"],
                "mem_optim_bytes": mem["optimizer"]}

    def checkpoint_extra_state(self) -> dict:
        """Non-tensor state a checkpoint carries besides weights and optimizer (see engine.state.checkpoint)."""
        return {"skip_steps": list(self.cfg.data.skip_steps), "seed": self.cfg.seed,
                "resilience": self.guard.state_dict() if self.guard is not None else {}}

    def checkpoint_tensors(self) -> dict:
        """Tensors a checkpoint carries besides weights and optimizer, loaded in place: the fp8
        recipe's state (delayed scaling's amax histories and scales), by layer name."""
        return self.fp8.state_tensors() if self.fp8 is not None else {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore what `checkpoint_extra_state` saved (skip list, the guard's history)."""
        self.cfg.data.skip_steps = list(extra.get("skip_steps", []))
        if self.guard is not None:
            self.guard.load_state_dict(extra.get("resilience", {}))

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint's manifest records about the run (checked when resuming)."""
        meta = {"model": dataclasses.asdict(self.cfg.model), "seed": self.cfg.seed,
                "parallel": dataclasses.asdict(self.cfg.parallel), "precision": self.cfg.precision.dtype,
                "tokenizer": tokenizer_source(self.cfg.data.tokenizer)}  # what `apogee export` ships with the weights
        if self.fp8 is not None:
            meta["fp8"] = self.fp8.metadata()
        if self.cfg.lora.rank:  # an export folds the adapters into the weights
            meta["lora"] = {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                            "targets": list(self.cfg.lora.targets)}
        return meta

    def validation_sums(self, microbatches: list) -> torch.Tensor:
        """This rank's sums over validation microbatches, reduced over dp (x cp) and pp by the
        caller: [LM loss sum, trained tokens]; a stage with another objective overrides it."""
        from engine.eval.validation import lm_validation_sums

        return lm_validation_sums(self, microbatches)

    def validation_metrics(self, sums: torch.Tensor) -> dict:
        """metrics.jsonl keys from the reduced `validation_sums`: val_loss and val_ppl."""
        from engine.eval.validation import lm_validation_metrics

        return lm_validation_metrics(sums)

    def evaluate(self) -> dict:
        """One validation pass over `validation_data` (every rank calls it); see engine/eval/validation.py."""
        from engine.eval.validation import run_validation

        return run_validation(self, self.validation_data)

    def fit(self, start_step: int = 0, checkpointer=None,
            on_step: Optional[Callable[[StepResult], None]] = None) -> list[StepResult]:
        """Train from `start_step` to cfg.train.steps: the step loop of engine/train/loop.py (logging,
        checkpoints, the step guard's rewinds, stop-on-signal)."""
        from engine.train.loop import fit

        return fit(self, start_step, checkpointer, on_step)
