"""Fault injection: rehearse failures from the config (`resilience.inject`), once each.

One string per fault, fields separated by ':'; a fault's step k is the k-th optimizer step, the
one logged as `step: k` in metrics.jsonl (the trainer's 0-based index k-1):

    kill:rank=R:step=K                     rank R dies by SIGKILL when it reaches step K
    raise:rank=R:step=K                    rank R raises InjectedFault at step K
    hang:rank=R:step=K                     rank R stops making progress at step K (the watchdog ends it)
    node_loss:rank=R:step=K                rank R's node is lost at step K: its memory keeper exits
                                           with every snapshot it held, then rank R dies by SIGKILL
    bitflip:target=T:rank=R:step=K:bit=B   flip bit B of one element of T (grad|param|activation)
                                           on rank R at step K; optional element=E (flat index, default 0);
                                           bit=B1+B2+... flips several bits of that element at once (a
                                           multi-bit upset); a bit below the exponent is a mantissa flip
    garbage_batch:step=K                   replace step K's batch with garbage tokens; optional rank=R
    replay_noise:step=K                    on every replay of step K (never its first run), every
                                           rank's first local result is off by one ulp: what
                                           nondeterministic kernels do to a replay
    gemm_error:rank=R:step=K:rel=E         one element of one forward GEMM's output on rank R at step K
                                           moved by E x the output's largest magnitude; optional
                                           layer=L (index of the checked GEMMs, default 0), element=E
                                           (flat index, default the last: the last token's output),
                                           persistent=1 (every step from K): engine/resilience/abft.py
    slow:rank=R:step=K:factor=F            from step K on, rank R computes F times slower (it sleeps
                                           F-1 times its step's compute time): a straggler

kill, raise and hang fire in `FaultInjector.before_step`; bitflip and garbage_batch are fired by
the code that owns those tensors, through `pending()` and `mark_fired()`; the step guard asks
`every()` for replay_noise; the trainer calls `slow_down` after each step's forward and backward.

A fault fires once per run directory: it is recorded durably ('fault_injected' in events.jsonl,
fsynced) before it fires, and a restarted run that passes step K again skips it. replay_noise and
slow are the exceptions: they stand for the kernels and for a slow node, so they act on every
replay, on every step from K (recorded the first time).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import ConfigError
from engine.train.events import EventLog
from engine.resilience.recovery import record_durably

# kind -> (required fields, optional fields)
KINDS = {
    "kill": (("rank", "step"), ()),
    "raise": (("rank", "step"), ()),
    "hang": (("rank", "step"), ()),
    "node_loss": (("rank", "step"), ()),
    "bitflip": (("target", "rank", "step", "bit"), ("element",)),
    "garbage_batch": (("step",), ("rank",)),
    "replay_noise": (("step",), ()),
    "slow": (("rank", "step", "factor"), ()),
    "gemm_error": (("rank", "step", "rel"), ("layer", "element", "persistent")),
}
FLOATS = ("factor", "rel")  # fields that take a real number; the others are integers
TARGETS = ("grad", "param", "activation")
MAX_BIT = 31  # fp32, the widest element the engine trains with; narrower dtypes are checked where they flip
FORMS = ("kill:rank=R:step=K, raise:rank=R:step=K, hang:rank=R:step=K, node_loss:rank=R:step=K, "
         "bitflip:target=grad|param|activation:rank=R:step=K:bit=B[+B...][:element=E], garbage_batch:step=K[:rank=R], "
         "replay_noise:step=K, slow:rank=R:step=K:factor=F, "
         "gemm_error:rank=R:step=K:rel=E[:layer=L][:element=E][:persistent=1]")
STEP_FAULTS = ("kill", "raise", "hang", "node_loss")  # the kinds before_step fires


class InjectedFault(RuntimeError):
    """The exception a `raise:` fault throws (a stand-in for any bug that kills one rank)."""


@dataclass(frozen=True)
class Fault:
    """One parsed `resilience.inject` entry."""

    index: int  # position in resilience.inject: with the text, identifies the fault across restarts
    spec: str  # the entry as written
    kind: str
    step: int  # 1-based, as in metrics.jsonl
    rank: Optional[int] = None  # None: every rank (garbage_batch without rank=)
    target: Optional[str] = None
    bit: Optional[int] = None  # the first (or only) bit of `bits`
    bits: tuple = ()  # every bit a bitflip flips in its element
    element: int = 0
    factor: Optional[float] = None
    rel: Optional[float] = None
    layer: Optional[int] = None
    persistent: int = 0

    @property
    def key(self) -> tuple[int, str]:
        """Identity of the fault in the fired records."""
        return (self.index, self.spec)

    def applies_to(self, rank: int) -> bool:
        """Whether this fault fires on `rank`."""
        return self.rank is None or self.rank == rank


def parse_fault(text: str, index: int, world_size: Optional[int] = None) -> Fault:
    """Parse entry `index` of resilience.inject; ConfigError naming the entry, the value and the forms."""
    def bad(problem: str) -> ConfigError:
        return ConfigError(f"resilience.inject[{index}]={text!r}: {problem}; valid forms: {FORMS}")

    if not isinstance(text, str) or not text.strip():
        raise bad("expected a string such as 'kill:rank=1:step=7'")
    kind, *parts = text.strip().split(":")
    if kind not in KINDS:
        raise bad(f"unknown fault kind {kind!r} (kinds: {', '.join(KINDS)})")
    required, optional = KINDS[kind]
    fields: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise bad(f"{part!r} is not name=value")
        if name not in required + optional:
            raise bad(f"{kind} takes {', '.join(required + optional)}, not {name!r}")
        if name in fields:
            raise bad(f"{name} given twice")
        fields[name] = value
    missing = [name for name in required if name not in fields]
    if missing:
        raise bad(f"{kind} needs {', '.join(missing)}")
    values: dict = {}
    for name, value in fields.items():
        if name == "target":
            if value not in TARGETS:
                raise bad(f"target={value!r}: expected one of {', '.join(TARGETS)}")
            values[name] = value
            continue
        if name == "bit":
            try:
                bits = tuple(int(b) for b in value.split("+"))
            except ValueError:
                raise bad(f"bit={value!r}: expected an integer, or integers joined by '+'") from None
            if len(set(bits)) != len(bits):
                raise bad(f"bit={value!r}: each bit once")
            values["bit"], values["bits"] = bits[0], bits
            continue
        if name in FLOATS:
            try:
                values[name] = float(value)
            except ValueError:
                raise bad(f"{name}={value!r}: expected a number") from None
            continue
        try:
            values[name] = int(value)
        except ValueError:
            raise bad(f"{name}={value!r}: expected an integer") from None
    if values["step"] < 1:
        raise bad(f"step={values['step']}: steps count from 1 (as in metrics.jsonl)")
    if "rank" in values and values["rank"] < 0:
        raise bad(f"rank={values['rank']}: expected >= 0")
    if "rank" in values and world_size is not None and values["rank"] >= world_size:
        raise bad(f"rank={values['rank']}: expected 0..{world_size - 1} ({world_size} ranks)")
    for bit in values.get("bits", ()):
        if not 0 <= bit <= MAX_BIT:
            raise bad(f"bit={bit}: expected 0..{MAX_BIT}")
    if "factor" in values and not 1.0 < values["factor"] <= 100.0:
        raise bad(f"factor={values['factor']:g}: expected a slowdown above 1 and at most 100")
    if "rel" in values and not 0.0 < values["rel"] <= 1e3:
        raise bad(f"rel={values['rel']:g}: expected a relative error in (0, 1000]")
    if values.get("persistent", 0) not in (0, 1):
        raise bad(f"persistent={values['persistent']}: expected 0 or 1")
    if values.get("layer", 0) < 0:
        raise bad(f"layer={values['layer']}: expected >= 0")
    if values.get("element", 0) < 0:
        raise bad(f"element={values['element']}: expected >= 0")
    if kind == "gemm_error" and "element" not in values:
        # The output's last element: the last token's, which causal attention lets every later
        # computation read (the first token's query, element 0 of q_proj, changes nothing at all).
        values["element"] = -1
    return Fault(index=index, spec=text.strip(), kind=kind, **values)


def judged_from(fault: Fault, cfg) -> Optional[int]:
    """The first step at which a detector can see `fault`, when that is after the step it fires at
    (None: it is judged where it fires). The loss-spike rule is armed after resilience.spike_window
    accepted steps; before that only NaN/Inf is caught. A garbage batch or a flipped activation
    is seen by the loss alone, and so is a flipped gradient or parameter when no replica holds the
    same values to compare fingerprints with (dp=1, ZeRO-3, or resilience.check_interval=0)."""
    r, p = cfg.resilience, cfg.parallel
    replicas = (p.dp or 1) > 1 and p.zero < 3 and r.check_interval > 0
    loss_only = fault.kind == "garbage_batch" or (fault.kind == "bitflip" and (fault.target == "activation"
                                                                               or not replicas)) \
        or (fault.kind == "gemm_error" and r.abft_interval == 0)
    if loss_only and fault.step <= r.spike_window:
        return r.spike_window + 1
    return None


def early_fault_warnings(cfg) -> list[str]:
    """One line per rehearsed fault that fires before a detector can judge it (printed at start)."""
    lines = []
    for fault in parse_faults(cfg.resilience.inject):
        first = judged_from(fault, cfg)
        if first is not None:
            lines.append(f"resilience.inject[{fault.index}]={fault.spec!r} fires at step {fault.step}, before the "
                         f"loss-spike rule is armed: it needs resilience.spike_window={cfg.resilience.spike_window} "
                         f"accepted steps, so a spike is judged from step {first} on (before that only NaN/Inf "
                         f"is caught); inject it at step >= {first}, or lower resilience.spike_window")
    return lines


def parse_faults(entries, world_size: Optional[int] = None) -> list[Fault]:
    """Every fault of resilience.inject (a list of strings), validated for `world_size` ranks."""
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"resilience.inject={entries!r}: expected a list of strings, e.g. "
                          "['kill:rank=1:step=7']")
    return [parse_fault(text, i, world_size) for i, text in enumerate(entries)]


class FaultInjector:
    """This rank's faults and the hooks that fire them; each fault fires once per run directory.

    The trainer calls `before_step(step)` with its 0-based step index (kill, raise, hang fire
    there). Code that owns gradients, parameters, activations or batches asks
    `pending(kind, step)` for the faults due on this rank at that step and calls `mark_fired`
    on each BEFORE corrupting anything, so that a crash right after still counts it as fired.
    """

    def __init__(self, faults: list[Fault], rank: int, run_dir: Optional[str | Path]):
        self.rank = rank
        self.faults = [f for f in faults if f.applies_to(rank)]
        self.events = EventLog(run_dir, rank) if run_dir is not None else None
        self._fired: set[tuple[int, str]] = set()
        if self.events is not None:
            self._fired = {(e["index"], e["fault"]) for e in self.events.read()
                           if e.get("type") == "fault_injected" and e.get("rank") == rank}

    @classmethod
    def from_config(cls, cfg, rank: int, run_dir: Optional[str | Path]) -> "FaultInjector":
        """The injector of `rank` for cfg.resilience.inject (empty when nothing is injected)."""
        return cls(parse_faults(cfg.resilience.inject), rank, run_dir)

    def pending(self, kind: str, step: int) -> list[Fault]:
        """Faults of `kind` due on this rank at trainer step index `step` (0-based) not fired yet."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        return [f for f in self.faults if f.kind == kind and f.step == step + 1 and f.key not in self._fired]

    def every(self, kind: str, step: int) -> list[Fault]:
        """Faults of `kind` at trainer step index `step` on this rank, fired or not (replay_noise)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        return [f for f in self.faults if f.kind == kind and f.step == step + 1]

    def fired(self, fault: Fault) -> bool:
        """Whether `fault` has fired on this rank (in this attempt or an earlier one)."""
        return fault.key in self._fired

    def mark_fired(self, fault: Fault, **details) -> dict:
        """Record durably that `fault` fires now on this rank (call just before firing it)."""
        self._fired.add(fault.key)
        event = {"fault": fault.spec, "index": fault.index, "kind": fault.kind, "step": fault.step, **details}
        if self.events is None:
            return event
        # fsynced: the restarted run must see it even if the whole node goes down with this rank
        return record_durably(self.events, "fault_injected", **event)

    def slow_down(self, step: int, compute_s: float) -> None:
        """A `slow` fault active at trainer step index `step`: sleep (factor - 1) x `compute_s`, the
        step's own compute so far, so this rank computes factor times slower than it would."""
        for fault in self.faults:
            if fault.kind == "slow" and fault.step <= step + 1:
                if not self.fired(fault):
                    self.mark_fired(fault)
                    print(f"apogee: rank {self.rank}: injecting fault {fault.spec!r}", file=sys.stderr, flush=True)
                time.sleep((fault.factor - 1.0) * max(compute_s, 0.0))

    def before_step(self, step: int) -> None:
        """Fire this rank's kill/raise/hang faults due at trainer step index `step` (0-based)."""
        for fault in [f for kind in STEP_FAULTS for f in self.pending(kind, step)]:
            self.mark_fired(fault)
            print(f"apogee: rank {self.rank}: injecting fault {fault.spec!r}", file=sys.stderr, flush=True)
            if fault.kind in ("kill", "node_loss"):
                if fault.kind == "node_loss":  # the node's memory goes with it: its keeper's snapshots too
                    from engine.state.memory_snapshots import lose_home_keeper

                    lose_home_keeper(self.rank)
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # a real signal death: no cleanup, no exit handlers
            elif fault.kind == "raise":
                raise InjectedFault(f"injected fault {fault.spec!r} (resilience.inject[{fault.index}])")
            else:
                hang_forever()


def hang_forever() -> None:
    """Stop making progress, as a deadlocked rank would; the hang watchdog (or a signal) ends it."""
    while True:
        time.sleep(1.0)
