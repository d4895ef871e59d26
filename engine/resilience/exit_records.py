"""How a rank leaves: its exit status, recorded in the run directory for the launchers to decide on.

srun reports the highest status of its tasks, a signal counting as 128 + n: when one rank exits 2
(bad input) or 17 (fault diagnosed) and srun then stops the others (--kill-on-bad-exit), the job
sees 143 and would requeue a run that must not restart. So each rank writes
RUN_DIR/exit/rank-N.json on its way out, {rank, status, reason, attempt, time, host, pid}, and the
Slurm script's requeue decision (slurm/requeue.py) reads every rank's record of the attempt.

A record is written to a temporary file and renamed: a reader never sees half of one, and a symlink
planted at its name is replaced, not followed. `attempt` names the launch the rank belongs to
(a Slurm job and its restart count, an elastic agent's run and restart), so records left by an
earlier attempt are told apart. A rank killed by SIGKILL (or a lost node) writes nothing; SIGTERM
and SIGHUP are caught: the rank records them, with a `signal` event naming itself and the signal
for the restart's failure report (engine/resilience/recovery.py), and exits at once with 128 + n,
the status the signal would have given. Python runs a signal handler only when the main thread
is back in Python, which a rank waiting in a collective or a rendezvous may not be for minutes: so
the signal is taken by a watcher thread, woken through `signal.set_wakeup_fd` by the interpreter's
own C-level handler the moment the signal arrives, and the main thread is never waited for.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from engine.resilience.exit_codes import EXCEPTION, SIGNAL_BASE, describe

EXIT_DIR = "exit"
"""Folder of the run directory holding one record per rank."""
CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals a rank records before dying of them (SIGKILL cannot be caught; SIGUSR1 is the stop request)."""


def attempt_of(env: Optional[Mapping[str, str]] = None) -> str:
    """The launch this process belongs to: 'slurm:JOB:RESTART', 'elastic:RUN:RESTART', or 'local:PID'."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return f"slurm:{env['SLURM_JOB_ID']}:{env.get('SLURM_RESTART_COUNT', '0')}"
    if "TORCHELASTIC_RUN_ID" in env:
        return f"elastic:{env['TORCHELASTIC_RUN_ID']}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return f"local:{os.getpid()}"


def record_path(run_dir: str | Path, rank: int) -> Path:
    """RUN_DIR/exit/rank-N.json."""
    return Path(run_dir) / EXIT_DIR / f"rank-{rank}.json"


def record_exit(run_dir: str | Path, rank: int, status: int, reason: str,
                env: Optional[Mapping[str, str]] = None) -> dict:
    """Write this rank's exit record atomically (temporary file, fsync, rename); returns it."""
    record = {"rank": rank, "status": status, "reason": reason, "attempt": attempt_of(env), "time": time.time(),
              "host": socket.gethostname(), "pid": os.getpid()}
    path = record_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return record


def read_exits(run_dir: str | Path, attempt: Optional[str] = None) -> list[dict]:
    """The ranks' exit records (of `attempt` only, when given), by rank; unreadable files are skipped."""
    folder = Path(run_dir) / EXIT_DIR
    records = []
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # a foreign or damaged file says nothing about this attempt
            continue
        if isinstance(record, dict) and isinstance(record.get("status"), int) and \
                (attempt is None or record.get("attempt") == attempt):
            records.append(record)
    return sorted(records, key=lambda r: r.get("rank", 0))


def status_of_exit(code) -> int:
    """The process status of SystemExit(code): None is 0, an int is itself, anything else (a message) 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else EXCEPTION


class ExitRecorder:
    """Records this rank's way out of `run` (a status, SystemExit, an exception, SIGTERM) in its run directory.

    `run_dir` may be set while `run` is under way (it is known once the config has loaded); until it
    is, and while the directory does not exist, nothing is recorded. `on_signal(run_dir, rank, name)` is called before a caught signal's
    record is written (the runner records a `signal` event there).
    """

    def __init__(self, rank: int, run_dir: Optional[str | Path] = None,
                 on_signal: Optional[Callable[[Path, int, str], None]] = None):
        self.rank, self.on_signal, self.run_dir = rank, on_signal, None
        self._previous: dict = {}
        self._wakeup: tuple = ()
        if run_dir is not None:
            self.bind(run_dir)

    def bind(self, run_dir: str | Path) -> None:
        """Record into `run_dir` from now on; catch SIGTERM/SIGHUP (set up from the main thread only)."""
        self.run_dir = Path(run_dir)
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # set_wakeup_fd's requirement: the C handler never blocks
        # A Python-level handler must be installed for the C handler to write the signal's number.
        self._previous = {signum: signal.signal(signum, lambda signum, frame: None) for signum in CAUGHT_SIGNALS}
        self._wakeup = (signal.set_wakeup_fd(write_end, warn_on_full_buffer=False), read_end, write_end)
        threading.Thread(target=self._watch, args=(read_end,), name="apogee-exit-signals", daemon=True).start()

    def record(self, status: int, reason: str) -> None:
        """Write the record into the run directory if it is known and exists (a run that could not start
        creates no directory just to say so); a failure to write is reported, never raised."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return
        try:
            record_exit(self.run_dir, self.rank, status, reason)
        except OSError as error:  # the way out goes on: the launcher falls back to the process status
            print(f"apogee: rank {self.rank}: could not record its exit status in {self.run_dir / EXIT_DIR} "
                  f"({error.strerror or error})", file=sys.stderr, flush=True)

    def run(self, fn: Callable[..., Optional[int]], *args, **kwargs) -> int:
        """fn(*args, **kwargs), recording how it ended; returns its status (SystemExit and exceptions propagate)."""
        try:
            status = fn(*args, **kwargs) or 0
        except SystemExit as stop:
            status = status_of_exit(stop.code)
            self.record(status, describe(status))
            raise
        except KeyboardInterrupt:
            self.record(SIGNAL_BASE + signal.SIGINT, "interrupted (SIGINT)")
            raise
        except BaseException as error:
            self.record(EXCEPTION, f"{type(error).__name__}: {error}"[:500])
            raise
        finally:
            self._restore()
        self.record(status, describe(status))
        return status

    def _restore(self) -> None:
        if not self._previous:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        previous_fd, read_end, write_end = self._wakeup
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)  # the watcher reads end-of-file and returns
        self._previous = {}

    def _watch(self, read_end: int) -> None:
        try:
            while True:
                taken = os.read(read_end, 64)
                if not taken:
                    return
                for signum in taken:  # one byte per signal; SIGUSR1, SIGINT... are handled elsewhere
                    if signum in CAUGHT_SIGNALS:
                        self._die_of(signum)
        finally:
            os.close(read_end)

    def _die_of(self, signum: int) -> None:
        name = signal.Signals(signum).name
        try:
            if self.on_signal is not None and self.run_dir is not None:
                self.on_signal(self.run_dir, self.rank, name)
            self.record(SIGNAL_BASE + signum, f"killed by {name}")
            print(f"apogee: rank {self.rank}: {name}: exiting with status {SIGNAL_BASE + signum}", file=sys.stderr,
                  flush=True)
        finally:  # at once, with the status the signal gives: the main thread may be stuck in C++
            os._exit(SIGNAL_BASE + signum)
