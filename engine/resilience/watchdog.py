"""Hang watchdog: a heartbeat per rank; no progress for hang_timeout_s ends the rank with status 18.

The step loop beats after every step. A daemon thread checks the beat: after `timeout_s`
seconds without one it writes every thread's stack to RUN_DIR/hang-rank{r}.txt, records a
'hang' event, and exits the process with HANG_DETECTED (18) so that the launcher restarts the run
from its latest checkpoint. Every rank dumps its own stacks: when one rank hangs the others block
in its next collective, so all of them time out, and the dumps together show who waits for whom.

Before exiting it writes the flight recorder's record of the last collectives next to the stacks
(RUN_DIR/flight-recorder-rank{r}, as PyTorch would on a collective timeout, which comes later than
this one) and, under NCCL, aborts the communicators; both are bounded in time, so a wedged
backend cannot keep the rank from exiting.

The clock starts at the first beat (the trainer beats once when it starts stepping), so process
start, rendezvous and checkpoint loading never count against the timeout; a long operation
inside the loop (e.g. a rewind's checkpoint load) should call `beat` to say it is alive. Writing
and verifying a checkpoint is progress too: the checkpoint thread calls `alive` for every few MiB
it writes or hashes, so a rank waiting for a large checkpoint is not taken for a hung one, while a
write that stops moving still is.

Hang attribution (engine/resilience/hang_report.py): with a comm ledger attached (`watch`), a rank
silent for half the timeout writes its per-group collective counters to the run directory at every
poll; the watchdog that fires reads every rank's, names the rank(s) behind, the group, the
collective and its sequence number in the 'hang' event, and writes RUN_DIR/hang-report.txt.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from engine.train.events import EventLog
from engine.resilience.exit_codes import HANG_DETECTED
from engine.resilience.hang_report import attribute, read_progress, report_text, write_progress
from engine.resilience.recovery import record_durably
from parallel import process_group


class Watchdog:
    """Heartbeat of one rank, watched by a daemon thread (no thread when timeout_s is 0)."""

    LAST_WORDS_S = 20.0  # at most this long each for the flight-recorder dump and the NCCL abort

    def __init__(self, run_dir: Optional[str | Path], rank: int, timeout_s: float):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank, self.timeout_s = rank, float(timeout_s)
        # (steps completed, monotonic time of the beat); one tuple so the watcher reads a consistent pair
        self._beat: Optional[tuple[int, float]] = None
        self._beat_lock = threading.Lock()  # beats come from the step loop and the checkpoint thread
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ledger = None  # parallel.collectives.CommLedger whose counters attribute a hang
        self._world_size: Optional[int] = None

    def watch(self, ledger, world_size: int) -> None:
        """Attribute a hang with `ledger`'s collective counters, compared over `world_size` ranks."""
        self._ledger, self._world_size = ledger, world_size

    def start(self) -> "Watchdog":
        """Start watching (a no-op when the timeout is 0: the watchdog is off)."""
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=f"hang-watchdog-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the run finished, or is handing over to something that has its own timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def beat(self, steps_completed: int) -> None:
        """Progress: `steps_completed` optimizer steps are done (the first beat arms the timeout)."""
        with self._beat_lock:
            self._beat = (steps_completed, time.monotonic())

    def alive(self) -> None:
        """Progress that is not a step (checkpoint bytes written or hashed): resets the clock only."""
        with self._beat_lock:
            if self._beat is not None:
                self._beat = (self._beat[0], time.monotonic())

    @property
    def steps_completed(self) -> Optional[int]:
        """Steps completed at the last beat (None before the first)."""
        return self._beat[0] if self._beat is not None else None

    def _watch(self) -> None:
        # Poll often enough that a hang is caught within ~5% of the timeout.
        poll = min(1.0, max(0.05, self.timeout_s / 20))
        while not self._stop.wait(poll):
            beat = self._beat
            if beat is None:
                continue
            silent = time.monotonic() - beat[1]
            if silent > self.timeout_s:
                self._on_hang(*beat)
            elif silent > self.timeout_s / 2:  # suspected: let the peers' watchdogs see where this rank is
                self._write_progress(beat[0])

    def _write_progress(self, steps_completed: int) -> bool:
        if self._ledger is None or self.run_dir is None:
            return False
        try:
            write_progress(self.run_dir, self.rank, steps_completed, self._ledger.progress_snapshot())
            return True
        except Exception as err:  # attribution is a bonus: never let it stop the watchdog
            print(f"apogee: rank {self.rank}: could not write hang progress ({err})", file=sys.stderr, flush=True)
            return False

    def _attribute(self, steps_completed: int, silent_s: float, dump: Optional[Path]) -> dict:
        """Compare every rank's counters (waiting briefly for the peers' latest) and write the report."""
        if not self._write_progress(steps_completed):
            return {}
        since = time.time() - silent_s  # files written while this hang lasted, not a past attempt's
        deadline = time.monotonic() + min(5.0, max(1.0, self.timeout_s / 4))
        ranks = read_progress(self.run_dir, since)
        while len(ranks) < (self._world_size or 0) and time.monotonic() < deadline:
            time.sleep(0.1)
            ranks = read_progress(self.run_dir, since)
        result = attribute(ranks, self._world_size)
        report = self.run_dir / "hang-report.txt"
        tmp = report.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(report_text(result, ranks, dump))
        os.replace(tmp, report)
        print(f"apogee: rank {self.rank}: hang attribution: {result['attribution']}", file=sys.stderr, flush=True)
        return {"behind": result["behind"], "group": result["group"], "group_ranks": result["group_ranks"],
                "collective": result["collective"], "seq": result["seq"], "attribution": result["attribution"],
                "hang_report": str(report)}

    def _on_hang(self, steps_completed: int, beat_time: float) -> None:
        silent_s = time.monotonic() - beat_time
        dump = None
        try:
            if self.run_dir is not None:
                dump = self.run_dir / f"hang-rank{self.rank}.txt"
                with open(dump, "w") as f:
                    f.write(f"rank {self.rank} (pid {os.getpid()}): no progress for {silent_s:.1f} s after "
                            f"step {steps_completed}; stacks of all threads:\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
                    f.flush()
                    os.fsync(f.fileno())
                recorded = _bounded(lambda: process_group.dump_flight_recorder(self.rank), self.LAST_WORDS_S)
                blame = _bounded(lambda: self._attribute(steps_completed, silent_s, dump), self.LAST_WORDS_S) or {}
                record_durably(EventLog(self.run_dir, self.rank), "hang", step=steps_completed + 1,
                               steps_completed=steps_completed, silent_s=silent_s, timeout_s=self.timeout_s,
                               stack_dump=str(dump), exit_code=HANG_DETECTED,
                               flight_recorder=str(recorded) if recorded else None, **blame)
        except Exception as err:  # e.g. a full disk: the exit below must happen regardless
            print(f"apogee: rank {self.rank}: could not record the hang ({err})", file=sys.stderr, flush=True)
        finally:
            print(f"apogee: rank {self.rank}: no progress for {silent_s:.0f} s during step {steps_completed + 1} "
                  f"(resilience.hang_timeout_s={self.timeout_s:g}); stacks in {dump}; exiting with status "
                  f"{HANG_DETECTED}", file=sys.stderr, flush=True)
            _bounded(process_group.abort, self.LAST_WORDS_S)
            # os._exit: the main thread is stuck (in a collective, or the hang), so a normal exit would
            # wait on it forever; no cleanup is owed, the restart resumes from the last checkpoint.
            os._exit(HANG_DETECTED)


def _bounded(action, timeout_s: float):
    """action() in a daemon thread, waited on for at most timeout_s; its result, or None."""
    result: list = [None]

    def run() -> None:
        try:
            result[0] = action()
        except Exception as err:  # the exit must happen anyway; say why the extra is missing
            print(f"apogee: hang watchdog: {getattr(action, '__name__', 'action')} failed: {err}",
                  file=sys.stderr, flush=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0]
