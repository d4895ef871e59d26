"""The step guard: judges every step, and turns anomalies into rewinds, skips and named faulty ranks.

After each step the guard decides, identically on every rank (one tiny all-reduce over the world):

    NaN/Inf or spike in loss/grad norm        -> suspect: rewind to the last checkpoint, replay
    replicas' parameter fingerprints differ   -> the odd rank is confirmed (majority); with no
                                                 majority (dp=2), suspect both and replay
    replaying a suspect step                  -> ranks whose local loss / gradient fingerprints
                                                 (or parameters) changed had a transient fault:
                                                 sdc_confirmed, their work is gone with the rewind;
                                                 if every rank reproduced it, the arithmetic is
                                                 real: rewind again and skip that data batch

Checkpoints are only taken at steps whose replicas were just compared, so a rewind never lands on
a checkpoint that already holds a corrupted replica. Too many rewinds within a window stop the run
(`ResilienceError`). Faults rehearsed through `resilience.inject` (bit flips, garbage batches)
enter here, at the points where real corruption would.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from data_pipeline.microbatch import Microbatch
from engine.config import ResilienceConfig
from engine.resilience.sdc import (StepFingerprints, fingerprint, loss_bits, odd_ones_out,
                                   parameter_fingerprint)
from parallel.collectives import Group, all_gather_values, all_reduce
from parallel.sharding import is_expert_shard


class ResilienceError(RuntimeError):
    """The run cannot recover on its own (too many rewinds, nothing to rewind to)."""


@dataclass
class Rewind(Exception):
    """Raised after a step: go back to the last good checkpoint (and maybe skip a data batch)."""

    reason: str
    failed_step: int = 0  # the 0-based step that was rejected
    skip_step: Optional[int] = None  # optimizer step whose data batch is never trained on again


@dataclass
class _Suspect:
    step: int
    kind: str  # 'anomaly' (a loss/grad-norm anomaly) or 'replicas' (replicas' parameters differ)
    reason: str


def flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip bit `bit` of element `index` (flat) of a float tensor, in place: a rehearsed SDC."""
    flat = tensor.detach().view(-1)
    ints = flat.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[flat.dtype])
    ints[index % flat.numel()] ^= (1 << bit) if bit < ints.element_size() * 8 - 1 else -(1 << bit)


class StepGuard:
    """Per-rank resilience logic around the trainer's steps (see the module docstring)."""

    HISTORY = 4096  # steps of fingerprints kept (a few ints each): more than any rewind reaches back

    def __init__(self, cfg: ResilienceConfig, trainer, world: Group, injector=None, events=None):
        self.cfg, self.trainer, self.world, self.injector, self.events = cfg, trainer, world, injector, events
        # The trainer picks the rule: a policy-gradient loss changes sign, an LM loss does not.
        self.detector = trainer.anomaly_detector(cfg)
        self.fingerprints = StepFingerprints()
        self.suspect: Optional[_Suspect] = None
        self.rewind_steps: deque = deque()
        self.history: dict[int, StepFingerprints] = {}  # this rank's own results of recent steps
        self.garbage_batches: set[int] = set()
        if hasattr(trainer.grads, "before_reduce"):
            trainer.grads.before_reduce = self._before_reduce
        first = trainer.chunks[0]
        if first.layers:  # activations are corrupted at the output of this rank's first layer
            next(iter(first.layers.values())).register_forward_hook(self._corrupt_activation)
        self.step = -1
        # ZeRO-3 shards the parameters: the ranks of the reduction group then hold different pieces.
        # Under expert parallelism the dense weights are replicated over the reduction group and the
        # experts over expert-dp: each kind is compared among its own replicas. (The replay's
        # attribution is then over-inclusive: a rank whose experts computed a faulty rank's tokens
        # sees its own local expert gradients change too, and is named with it.)
        self.replicas_comparable = trainer.cfg.parallel.zero < 3

    # -- rehearsed faults ------------------------------------------------------------------------

    def _take(self, kind: str, step: int, target: Optional[str] = None, **details):
        """The rehearsed fault of `kind` (and `target`) due now on this rank, marked fired; or None."""
        if self.injector is None:
            return None
        for fault in self.injector.pending(kind, step):
            if target is None or fault.target == target:
                self.injector.mark_fired(fault, **details)
                return fault
        return None

    def _record(self, type: str, **fields) -> None:
        if self.events is not None:
            self.events.record(type, **fields)

    def _record_once(self, type: str, **fields) -> None:
        """An event every rank knows of, written once (by rank 0)."""
        if self.trainer.ctx.rank == 0:
            self._record(type, **fields)

    def _before_reduce(self, index: int, local_grad: torch.Tensor) -> None:
        fault = self._take("bitflip", self.step, "grad", bucket=index)
        if fault is not None:
            flip_bit(local_grad, fault.element, fault.bit)
        self.fingerprints.grad_buckets[index] = fingerprint(local_grad)

    def _corrupt_activation(self, module, inputs, output):
        fault = self._take("bitflip", self.step, "activation")
        if fault is not None:
            flip_bit(output, fault.element, fault.bit)
        return output

    def garbage_batch(self, step: int, data_batch: int, microbatches: list[Microbatch],
                      vocab_size: int) -> list[Microbatch]:
        """The step's microbatches, replaced by uniform random tokens if a garbage batch is rehearsed.

        A bad batch is data: once injected, data batch `data_batch` stays bad every time it is
        read (a replay sees it again), until a rewind skips it.
        """
        if self._take("garbage_batch", step, data_batch=data_batch) is not None:
            self.garbage_batches.add(data_batch)
        if data_batch not in self.garbage_batches:
            return microbatches
        gen = torch.Generator().manual_seed(1000003 * (data_batch + 1))

        # The tokens go bad; a loss mask stays as it was.
        return [mb._replace(tokens=torch.randint(0, vocab_size, mb.tokens.shape, generator=gen)) for mb in microbatches]

    # -- the decision after each step --------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Reset the step's fingerprints (called before its forward/backward)."""
        self.step = step
        self.fingerprints = StepFingerprints()

    def checks_replicas(self, step: int, saving: bool) -> bool:
        """Whether step `step` compares replicas: every check_interval steps and before every save."""
        interval = self.cfg.check_interval
        return self.replicas_comparable and (saving or bool(interval and (step + 1) % interval == 0))

    def after_step(self, step: int, loss: float, grad_norm: float, local_loss: torch.Tensor,
                   saving: bool = False) -> None:
        """Judge step `step`; raise Rewind when the run must go back. Call on every rank."""
        fault = self._take("bitflip", step, "param")
        if fault is not None:  # memory corruption of this rank's copy, after the update
            flip_bit(next(p for _, p in self.trainer.named_parameters()).data, fault.element, fault.bit)
        replaying = self.suspect is not None and step <= self.suspect.step
        compare = self.checks_replicas(step, saving)
        self.fingerprints.loss_bits = loss_bits(local_loss)
        if compare or (replaying and self.suspect.kind == "replicas"):
            named = list(self.trainer.named_parameters())
            self.fingerprints.params = (parameter_fingerprint((n, p) for n, p in named if not is_expert_shard(p)),
                                        parameter_fingerprint((n, p) for n, p in named if is_expert_shard(p)))
        if replaying:
            self._diagnose(step)
        self.history[step] = self.fingerprints
        self.history.pop(step - self.HISTORY, None)
        anomaly = self.detector.judge(loss, grad_norm)
        flags = torch.tensor([1 if anomaly else 0], dtype=torch.int64)
        all_reduce(flags, self.world, op=dist.ReduceOp.MAX, purpose="resilience")
        if flags.item() and anomaly is None:
            anomaly = "an anomaly on another rank"
        if anomaly is not None:
            if self.suspect is not None and self.suspect.step == step:  # reproduced by every rank
                self._rewind(step, f"step {step + 1} reproduced on replay ({anomaly}); skipping its batch",
                             skip=True)
            self._suspect(step, "anomaly", anomaly)
        if compare:
            self._compare_replicas(step)
        self.detector.accept(loss, grad_norm)

    def _suspect(self, step: int, kind: str, reason: str) -> None:
        """Record a suspicion, then rewind: the replay of the steps up to `step` will settle it."""
        self.suspect = _Suspect(step, kind, reason)
        self._record_once("sdc_suspect", step=step + 1, reason=reason)
        self._rewind(step, f"step {step + 1}: {reason}; rewinding to replay it")

    def _compare_replicas(self, step: int) -> None:
        # (fingerprint, the group holding its replicas): dense weights, then expert weights (if any).
        kinds = [(self.fingerprints.params[0], self.trainer.grad_group)]
        if self.trainer.expert_group is not None:
            kinds.append((self.fingerprints.params[1], self.trainer.expert_group))
        named, odd_kinds = [], []
        for value, group in kinds:
            values = [v[0] for v in all_gather_values([value], group)]
            odd = odd_ones_out(values)
            ranks = dist.get_process_group_ranks(group.process_group) if group.size > 1 else [self.trainer.ctx.rank]
            named += [ranks[i] for i in odd]
            odd_kinds.append((odd, values))
        odd_flag = torch.tensor([1 if named else 0], dtype=torch.int64)
        all_reduce(odd_flag, self.world, op=dist.ReduceOp.MAX, purpose="resilience")
        if not odd_flag.item():
            return
        odd, values = next(((o, v) for o, v in odd_kinds if o), ([], [0]))
        # Settled by replay even when a majority exists: every rank takes the same path (the same
        # collectives), and the verdict rests on evidence rather than on a vote.
        likely = " (the majority points at them)" if odd and len(odd) < len(values) else ""
        if self.suspect is not None and self.suspect.step == step:
            raise ResilienceError(f"step {step + 1}: data-parallel replicas {named} disagree again on replay"
                                  f"{likely}: a persistent fault or a nondeterministic kernel; not continuing")
        self._suspect(step, "replicas", f"data-parallel replicas {named} disagree{likely}")

    def _diagnose(self, step: int) -> None:
        """During a replay: did any rank compute step `step` differently from the first time?

        The first step at which some rank's own results (local loss, local gradients, parameters
        at check steps) differ from its record names the faulty rank(s): a fault that struck
        once, spreading to the other replicas only through later reductions.
        """
        record = self.history.get(step)
        changed = self.fingerprints.differs_from(record, params=False) if record is not None else None
        faulty = self._ranks_with(changed)
        if not faulty and record is not None:
            # Parameters are evidence only when every rank computed the same local results this
            # step: otherwise the update itself changed through the reduction, on every replica.
            changed = self.fingerprints.differs_from(record, params=True)
            faulty = self._ranks_with(changed)
        if not faulty:
            return
        suspect, self.suspect = self.suspect, None
        if changed:
            self._record("sdc_confirmed", step=step + 1, faulty_rank=self.trainer.ctx.rank,
                         evidence=f"{changed} at step {step + 1} not reproducible on replay "
                                  f"(suspected at step {suspect.step + 1}: {suspect.reason})")
        if self.trainer.ctx.rank == 0:
            print(f"apogee: silent data corruption on rank(s) {faulty} at step {step + 1}: not reproducible "
                  f"on replay; the rewind discarded their work", flush=True)

    def _ranks_with(self, changed: Optional[str]) -> list[int]:
        """World ranks whose `changed` is set (every rank calls this: it gathers)."""
        flags = all_gather_values([1 if changed else 0], self.world)
        return [rank for rank, (flag,) in enumerate(flags) if flag]

    def audits(self, step: int) -> bool:
        """Whether step `step` is a periodic audit (computed twice and compared bitwise)."""
        return bool(self.cfg.audit_interval) and (step + 1) % self.cfg.audit_interval == 0

    def audit(self, step: int, first: StepFingerprints, local_loss: torch.Tensor) -> None:
        """Compare a step's second computation (now in self.fingerprints) with its first, on every rank.

        A rank that computed the same step twice differently is faulty, whichever result was
        the wrong one; its work is discarded by a rewind.
        """
        self.fingerprints.loss_bits = loss_bits(local_loss)
        changed = self.fingerprints.differs_from(first, params=False)
        faulty = self._ranks_with(changed)
        if not faulty:
            return
        if changed:
            self._record("sdc_confirmed", step=step + 1, faulty_rank=self.trainer.ctx.rank,
                         evidence=f"{changed} differs between two computations of step {step + 1} (audit)")
        self._rewind(step, f"step {step + 1}: audit found rank(s) {faulty} not reproducible")

    def _rewind(self, step: int, reason: str, skip: bool = False) -> None:
        self.rewind_steps.append(step)
        while self.rewind_steps and self.rewind_steps[0] <= step - self.cfg.rewind_window:
            self.rewind_steps.popleft()
        if len(self.rewind_steps) > self.cfg.max_rewinds:
            raise ResilienceError(f"{len(self.rewind_steps)} rewinds within {self.cfg.rewind_window} steps "
                                  f"(resilience.max_rewinds={self.cfg.max_rewinds}); last: {reason}. Stopping: "
                                  f"inspect events.jsonl, then resume with --resume auto")
        if skip:
            self.suspect = None
        raise Rewind(reason, failed_step=step, skip_step=step if skip else None)

    def state_dict(self) -> dict:
        """Spike history, saved in checkpoints so a resumed run judges as the uninterrupted one."""
        return {"detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (after a resume or a rewind)."""
        self.detector.load_state_dict(state.get("detector", {}))
