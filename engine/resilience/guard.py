"""The step guard: judges every step, and turns anomalies into rewinds, skips and named faulty ranks.

After each step the guard decides, identically on every rank (one tiny all-reduce over the world):

    NaN/Inf or spike in loss/grad norm        -> suspect: rewind to the last checkpoint, replay
    replicas' parameter fingerprints differ   -> the odd rank is confirmed (majority); with no
                                                 majority (dp=2), suspect both and replay
    replaying a suspect step                  -> the rank whose replay first diverges in its own
                                                 local result (engine/resilience/divergence.py) had
                                                 a transient fault: sdc_confirmed, its work is gone
                                                 with the rewind; if every rank reproduced it, the
                                                 arithmetic is real: rewind again, skip the batch
    ranks diverging independently on replay   -> the kernels are not deterministic:
                                                 replay_nondeterministic, nobody is accused, and
                                                 the batch is handled as a spike (the replay goes
                                                 on to the suspect step, then its batch is skipped)

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
from engine.resilience.abft import GemmChecker
from engine.resilience.divergence import SAME, FrozenTrace, StepTrace, first_divergence, judge, read_pending
from engine.resilience.faulty_nodes import FILE as FAULTY_NODES, PERSISTENT, record_faulty, this_node
from engine.resilience.sdc import fingerprint_all_tensor, odd_ones_out
from parallel.collectives import Group, all_gather_values, all_reduce_values
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
    nondeterministic: bool = False  # its replay diverged on several ranks at once: it cannot judge


def flip_bit(tensor: torch.Tensor, index: int, bit: int | tuple) -> None:
    """Flip bit `bit` (or each of several distinct bits) of element `index` (flat) of a float tensor,
    in place: a rehearsed SDC."""
    flat = tensor.detach().view(-1)
    ints = flat.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[flat.dtype])
    width = ints.element_size() * 8
    bits = (bit,) if isinstance(bit, int) else tuple(bit)
    if any(b >= width for b in bits):
        raise ValueError(f"bit {max(bits)} of a {width}-bit {flat.dtype} element")
    # The sign bit is negative in two's complement; distinct bits add up to their OR.
    ints[index % flat.numel()] ^= sum((1 << b) if b < width - 1 else -(1 << b) for b in bits)


class StepGuard:
    """Per-rank resilience logic around the trainer's steps (see the module docstring)."""

    # Steps of traces kept (8 bytes per collective input and output of the step; labels shared
    # between steps): more than any rewind reaches back.
    HISTORY = 4096
    # Steps whose traces may wait on the device for a check step (without checks, e.g. ZeRO-3,
    # they are read this often): a few hundred small int64 tensors.
    READ_EVERY = 256

    def __init__(self, cfg: ResilienceConfig, trainer, world: Group, injector=None, events=None):
        self.cfg, self.trainer, self.world, self.injector, self.events = cfg, trainer, world, injector, events
        # The trainer picks the rule: a policy-gradient loss changes sign, an LM loss does not.
        self.detector = trainer.anomaly_detector(cfg)
        # Every collective of the trainer's groups shows this rank's trace what it takes and gives.
        self.trace = StepTrace()
        self.params: tuple = ()  # parameter fingerprints (dense, expert) of the last compared step
        self.suspect: Optional[_Suspect] = None
        self.rewind_steps: deque = deque()
        # This rank's trace of each recent step: PendingTraces (on the device) until the next check
        # step reads them all in one host sync, FrozenTraces after.
        self.history: dict = {}
        self._in_step: Optional[int] = None  # the step computing now (a second begin_step: an audit)
        self.garbage_batches: set[int] = set()
        if hasattr(trainer.grads, "before_reduce"):
            trainer.grads.before_reduce = self._before_reduce
        first = trainer.chunks[0]
        if first.layers:  # activations are corrupted at the output of this rank's first layer
            next(iter(first.layers.values())).register_forward_hook(self._corrupt_activation)
        self.step = -1
        # ZeRO-3 shards the parameters: the ranks of the reduction group then hold different pieces.
        # Under expert parallelism the dense weights are replicated over the reduction group and the
        # experts over expert-dp: each kind is compared among its own replicas.
        self.replicas_comparable = trainer.cfg.parallel.zero < 3
        # ABFT checksums over the forward GEMMs (and the gemm_error faults they catch); fp8 GEMMs quantize.
        gemm_faults = injector is not None and any(f.kind == "gemm_error" for f in injector.faults)
        self.gemms = (GemmChecker(trainer.chunks, cfg.abft_interval, injector)
                      if (cfg.abft_interval or gemm_faults) and getattr(trainer, "fp8", None) is None and not trainer.cfg.lora.rank else None)

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
            if type == "sdc_confirmed":  # this rank named itself: its node goes on the run's record
                self._note_faulty_node(fields["step"], fields.get("detector", "replay"))

    def _note_faulty_node(self, step: int, detector: str) -> None:
        node, rank = this_node(), self.trainer.ctx.rank
        count = record_faulty(self.events.path.parent, rank, step, detector, node)
        if count == PERSISTENT:
            print(f"apogee: rank {rank}'s node {node} confirmed faulty {count} times: recorded in "
                  f"{self.events.path.parent / FAULTY_NODES}; a requeued or resubmitted job excludes it "
                  f"(sbatch --exclude={node})", flush=True)

    def _record_once(self, type: str, **fields) -> None:
        """An event every rank knows of, written once (by rank 0)."""
        if self.trainer.ctx.rank == 0:
            self._record(type, **fields)

    def _before_reduce(self, index: int, local_grad: torch.Tensor) -> None:
        fault = self._take("bitflip", self.step, "grad", bucket=index)
        if fault is not None:
            flip_bit(local_grad, fault.element, fault.bits or fault.bit)
        self.trace.name(local_grad, f"local gradient (bucket {index})")  # the reduction records it

    def _corrupt_activation(self, module, inputs, output):
        fault = self._take("bitflip", self.step, "activation")
        if fault is not None:
            flip_bit(output, fault.element, fault.bits or fault.bit)
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
        """Start the trace of a computation of step `step` (called before its forward/backward)."""
        replay = (self.suspect is not None and step <= self.suspect.step) or self._in_step == step
        self.step, self._in_step = step, step
        self.trace = StepTrace(active=True, noise=replay and self._replay_noise(step))
        self.trainer.ledger.observer = self.trace
        if self.gemms is not None:
            self.gemms.begin_step(step)

    def _replay_noise(self, step: int) -> bool:
        """Whether `replay_noise` is rehearsed at `step`: on every replay, recorded the first time."""
        if self.injector is None:
            return False
        faults = self.injector.every("replay_noise", step)
        for fault in faults:
            if not self.injector.fired(fault):
                self.injector.mark_fired(fault)
        return bool(faults)

    def snapshot(self, local_loss: torch.Tensor) -> FrozenTrace:
        """The current computation's trace with its local loss, read now (an audit's first run)."""
        self.trace.add_local("local loss", local_loss)
        return self.trace.freeze()

    def checks_replicas(self, step: int, saving: bool) -> bool:
        """Whether step `step` compares replicas: every check_interval steps and before every save."""
        interval = self.cfg.check_interval
        return self.replicas_comparable and (saving or bool(interval and (step + 1) % interval == 0))

    def after_step(self, step: int, loss: float, grad_norm: float, local_loss: torch.Tensor,
                   saving: bool = False) -> None:
        """Judge step `step`; raise Rewind when the run must go back. Call on every rank."""
        fault = self._take("bitflip", step, "param")
        if fault is not None:  # memory corruption of this rank's copy, after the update
            flip_bit(next(p for _, p in self.trainer.named_parameters()).data, fault.element, fault.bits or fault.bit)
        self.trace.active, self._in_step = False, None  # the guard's own collectives are not the step's
        replaying = self.suspect is not None and step <= self.suspect.step
        compare = self.checks_replicas(step, saving)
        self.trace.add_local("local loss", local_loss)
        fingerprints = compare or (replaying and self.suspect.kind == "replicas")
        if fingerprints:  # on the device, read below with the rest of the pending traces
            named = list(self.trainer.named_parameters())
            device = self.trainer.ctx.device
            self.trace.add_local_value("parameters", fingerprint_all_tensor(
                (p for n, p in named if not is_expert_shard(p)), device))
            self.trace.add_local_value("expert parameters", fingerprint_all_tensor(
                (p for n, p in named if is_expert_shard(p)), device))
        if replaying or fingerprints or saving or (step + 1) % self.READ_EVERY == 0:
            record = self._keep(self.trace.freeze(), self.history.get(step - 1))
            self._read_history()
        else:
            record = self.trace.stash()  # no host sync at a step that checks nothing
        if fingerprints:
            self.params = (record.values[-2], record.values[-1])
        if replaying:
            self._diagnose(step, record)
        self.history[step] = record
        self.history.pop(step - self.HISTORY, None)
        anomaly = self.detector.judge(loss, grad_norm)
        gemm = self.gemms.report() if self.gemms is not None else None
        flags = all_gather_values([1 if anomaly else 0, 1 if gemm else 0], self.world)
        if any(f[1] for f in flags):
            self._gemm_fault(step, gemm, [r for r, f in enumerate(flags) if f[1]])
        if any(f[0] for f in flags) and anomaly is None:
            anomaly = "an anomaly on another rank"
        if self.suspect is not None and self.suspect.step == step and self.suspect.nondeterministic:
            self._rewind(step, f"step {step + 1}: its replay was not deterministic, so it cannot tell a fault from "
                               f"the data; handled as a loss spike: its batch is skipped", skip=True)
        if anomaly is not None:
            if self.suspect is not None and self.suspect.step == step:  # reproduced by every rank
                self._rewind(step, f"step {step + 1} reproduced on replay ({anomaly}); skipping its batch",
                             skip=True)
            self._suspect(step, "anomaly", anomaly)
        if compare:
            self._compare_replicas(step)
        self.detector.accept(loss, grad_norm)

    def _gemm_fault(self, step: int, gemm, ranks: list[int]) -> None:
        """A GEMM broke its checksum on `ranks`: each names itself and its layer; everyone rewinds."""
        if gemm is not None:
            layer, ratio = gemm
            self._record("sdc_confirmed", step=step + 1, faulty_rank=self.trainer.ctx.rank, layer=layer,
                         detector="abft", ratio=round(ratio, 2),
                         evidence=f"column sums of {layer}'s forward GEMM differ from (1^T X) W^T by {ratio:.3g} x "
                                  f"the tolerance")
            print(f"apogee: rank {self.trainer.ctx.rank}: ABFT checksum of {layer} failed at step {step + 1} "
                  f"({ratio:.3g} x the tolerance)", flush=True)
        self._rewind(step, f"step {step + 1}: ABFT checksum failed on rank(s) {ranks}; rewinding to redo it")

    def _suspect(self, step: int, kind: str, reason: str) -> None:
        """Record a suspicion, then rewind: the replay of the steps up to `step` will settle it."""
        self.suspect = _Suspect(step, kind, reason)
        self._record_once("sdc_suspect", step=step + 1, reason=reason)
        self._rewind(step, f"step {step + 1}: {reason}; rewinding to replay it")

    @staticmethod
    def _keep(record: FrozenTrace, last) -> FrozenTrace:
        """`record`, sharing the previous step's kinds and labels when equal (a step repeats them)."""
        if last is not None and last.kinds == record.kinds and last.labels == record.labels:
            return FrozenTrace(record.values, last.kinds, last.labels)
        return record

    def _read_history(self) -> None:
        """Read every pending step trace to the host in one sync (a check step, a replay, a save)."""
        steps = sorted(self.history)
        if not any(not isinstance(self.history[s], FrozenTrace) for s in steps):
            return
        for step, record in zip(steps, read_pending([self.history[s] for s in steps])):
            self.history[step] = self._keep(record, self.history.get(step - 1))  # step - 1 is read by now

    def _compare_replicas(self, step: int) -> None:
        # (fingerprint, the group holding its replicas): dense weights, then expert weights (if any).
        kinds = [(self.params[0], self.trainer.grad_group)]
        if self.trainer.expert_group is not None:
            kinds.append((self.params[1], self.trainer.expert_group))
        named, odd_kinds = [], []
        for value, group in kinds:
            values = [v[0] for v in all_gather_values([value], group)]
            odd = odd_ones_out(values)
            ranks = dist.get_process_group_ranks(group.process_group) if group.size > 1 else [self.trainer.ctx.rank]
            named += [ranks[i] for i in odd]
            odd_kinds.append((odd, values))
        if not all_reduce_values([1 if named else 0], self.world)[0]:
            return
        odd, values = next(((o, v) for o, v in odd_kinds if o), ([], [0]))
        # Settled by replay even when a majority exists: every rank takes the same path (the same
        # collectives), and the verdict rests on evidence rather than on a vote.
        likely = " (the majority points at them)" if odd and len(odd) < len(values) else ""
        if self.suspect is not None and self.suspect.step == step:
            raise ResilienceError(f"step {step + 1}: data-parallel replicas {named} disagree again on replay"
                                  f"{likely}: a persistent fault or a nondeterministic kernel; not continuing")
        self._suspect(step, "replicas", f"data-parallel replicas {named} disagree{likely}")

    def _diagnose(self, step: int, replay: FrozenTrace) -> None:
        """During a replay: did any rank compute step `step` differently from the first time?

        Each rank finds where its trace first diverges from its record; the ranks judge the
        gathered reports alike (`divergence.judge`): one rank whose own local result changed is
        the faulty one (a fault that struck once and reached the others only through collectives);
        several such ranks mean the kernels are not deterministic.
        """
        self._read_history()
        record = self.history.get(step)
        if record is None or self.suspect.nondeterministic:
            return
        verdict, divergence = self._judge(replay, record)
        if not verdict:
            return
        if verdict.nondeterministic:
            self._nondeterministic(step, verdict, "on replay")
            return
        suspect, self.suspect = self.suspect, None
        if self.trainer.ctx.rank in verdict.faulty:
            self._record("sdc_confirmed", step=step + 1, faulty_rank=self.trainer.ctx.rank,
                         evidence=f"{self._evidence(divergence, verdict)} at step {step + 1} not reproducible on "
                                  f"replay (suspected at step {suspect.step + 1}: {suspect.reason})")
        if self.trainer.ctx.rank == 0:
            print(f"apogee: silent data corruption on rank(s) {verdict.faulty} at step {step + 1}: not reproducible "
                  f"on replay; the rewind discarded their work", flush=True)

    def _judge(self, replay: FrozenTrace, original: FrozenTrace):
        """(the world's verdict, this rank's first divergence or None); every rank calls it (it gathers)."""
        divergence = first_divergence(replay, original)
        report = [SAME, -1] if divergence is None else [divergence.code, divergence.index]
        return judge(all_gather_values(report, self.world)), divergence

    @staticmethod
    def _evidence(divergence, verdict) -> str:
        if divergence is not None and divergence.code != SAME and verdict.origins:
            others = [r for r in verdict.diverged if r not in verdict.origins]
            return (f"{divergence.label} (entry {divergence.index} of the step's trace), before any collective "
                    f"brought in another rank's change" + (f"; ranks {others} diverged only after it" if others else ""))
        return f"{divergence.label} (entry {divergence.index}), changed between ranks; no rank's own result did"

    def _nondeterministic(self, step: int, verdict, where: str) -> None:
        """Several ranks diverged on their own: record it, accuse nobody, and let the suspect step's
        batch be handled as a loss spike (after_step skips it when the replay gets there)."""
        self.suspect.nondeterministic = True
        self._record_once("replay_nondeterministic", step=step + 1, suspect_step=self.suspect.step + 1,
                          ranks=verdict.origins, reason=self.suspect.reason)
        if self.trainer.ctx.rank == 0:
            print(f"apogee: ranks {verdict.origins} each computed step {step + 1} differently {where}: the kernels "
                  f"are not deterministic; no rank is accused, step {self.suspect.step + 1}'s batch will be "
                  f"skipped", flush=True)

    def audits(self, step: int) -> bool:
        """Whether step `step` is a periodic audit (computed twice and compared bitwise)."""
        return bool(self.cfg.audit_interval) and (step + 1) % self.cfg.audit_interval == 0

    def audit(self, step: int, first: FrozenTrace, local_loss: torch.Tensor) -> None:
        """Compare a step's second computation (the current trace) with its first, on every rank.

        The rank whose second computation first diverges in its own local result is faulty,
        whichever result was the wrong one; its work is discarded by a rewind. Several such ranks:
        the kernels are not deterministic, and the step is replayed and its batch skipped.
        """
        if self.suspect is not None and self.suspect.step == step and self.suspect.nondeterministic:
            return  # this replay only goes on to skip the batch
        verdict, divergence = self._judge(self.snapshot(local_loss), first)
        if not verdict:
            return
        if verdict.nondeterministic:
            self.suspect = _Suspect(step, "anomaly", f"the audit of step {step + 1} diverged on ranks {verdict.origins}")
            self._nondeterministic(step, verdict, "in its audit")
            self._rewind(step, f"step {step + 1}: audit not reproducible on several ranks; replaying it")
        if self.trainer.ctx.rank in verdict.faulty:
            self._record("sdc_confirmed", step=step + 1, faulty_rank=self.trainer.ctx.rank,
                         evidence=f"{self._evidence(divergence, verdict)} differs between two computations of "
                                  f"step {step + 1} (audit)")
        self._rewind(step, f"step {step + 1}: audit found rank(s) {verdict.faulty} not reproducible")

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
