"""RUN_DIR/run.lock: a run directory belongs to one run at a time.

The process that owns a run (Apogee's launcher, or rank 0 under torchrun, srun or mpirun) takes
the lock before it writes anything there and releases it on exit. The lock is a file created
with O_EXCL holding its holder (host, pid, the process's start time, the Slurm job, the command);
the holder touches it every HEARTBEAT_S seconds. A second run on the same directory exits with
status 2 naming the holder, unless the holder is gone:

- on the same host, its process no longer exists (or is another process with the same pid);
- on another host, its heartbeat is older than STALE_AFTER_S seconds (clocks agree to well within
  that under NTP), or it was an earlier run of the same Slurm job (a requeue runs after it ended).

A stale lock is taken over, with a line naming the old holder. Takeovers are serialised by a
second O_EXCL file, so two runs that find the same stale lock do not both take it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from engine.config import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
"""A lock held from another host whose heartbeat is older than this is taken over (seconds)."""


class RunDirLocked(ConfigError):
    """Another live run holds the run directory (exit status 2, the holder named)."""


def _process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name in parentheses may hold spaces


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def describe_holder(holder: dict) -> str:
    """'pid 123 on host gpu01 (Slurm job 77), since 2025-01-01 10:00:00: apogee pretrain ...'."""
    job = f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {since}: {holder.get('command', '?')}"


class RunLock:
    """The exclusive lock of one run directory, held by this process while it runs."""

    def __init__(self, run_dir: str | Path, report: Callable[[str], None] = print,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.report, self.heartbeat_s, self.stale_after_s = report, heartbeat_s, stale_after_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": time.time(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                       "command": " ".join(sys.argv)[:300], "token": uuid.uuid4().hex}
        self._fd: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- taking and giving back -------------------------------------------------------------------

    def acquire(self) -> "RunLock":
        """Take the lock (RunDirLocked if a live run holds it); starts the heartbeat."""
        for _ in range(50):  # a race with another taker resolves within a few rounds
            if self._create():
                break
            holder, age = self._read()
            if holder is None and age is None:
                continue  # released between our attempt and the read: try again
            problem = self._stale_reason(holder, age)
            if problem is None:
                who = describe_holder(holder) if holder else "a run that is writing its lock now"
                raise RunDirLocked(f"run directory {self.path.parent} is in use by {who}; wait for it to finish, "
                                   f"stop it, or give another --run-dir")
            if self._take_over(holder, problem):
                break
            time.sleep(0.05)
        else:
            raise RunDirLocked(f"run directory {self.path.parent}: could not take {self.path} (other runs keep "
                               f"racing for it); try again")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give the lock back (only if it is still this run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is None:
            return
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def moved_to(self, run_dir: Path) -> None:
        """The directory holding the lock was renamed to `run_dir` (the lock goes with it)."""
        self.path = Path(run_dir) / LOCK_FILE

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the protocol -----------------------------------------------------------------------------

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        self._hold(fd)
        return True

    def _hold(self, fd: int) -> None:
        try:
            os.write(fd, (json.dumps(self.record) + "\n").encode())
            os.fsync(fd)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd = fd

    def _read(self) -> tuple[Optional[dict], Optional[float]]:
        """(holder record or None if unreadable, seconds since its last heartbeat or None if gone)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return None, age  # being written right now, or its writer died mid-write
        return (holder if isinstance(holder, dict) else None), age

    def _stale_reason(self, holder: Optional[dict], age: float) -> Optional[str]:
        """Why the lock's holder is gone, or None if it may be alive."""
        if holder is None:  # no readable record: stale once it is as old as a missed heartbeat
            return f"an unreadable lock, untouched for {age:.0f} s" if age > self.stale_after_s else None
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job and holder.get("pid") != os.getpid():
            return f"an earlier run of this Slurm job ({job}), which has ended"
        if holder.get("host") == self.record["host"]:
            if not _pid_alive(int(holder.get("pid", -1)), holder.get("pid_start")):
                return f"its process {holder.get('pid')} no longer exists"
            return None
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (more than {self.stale_after_s:g} s)"
        return None

    def _take_over(self, holder: Optional[dict], reason: str) -> bool:
        """Replace the stale lock with ours, under the takeover lock; False if someone else did."""
        mutex = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:  # a taker that died holding it: its file is old
                if time.time() - mutex.stat().st_mtime > 30:
                    mutex.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            again, age = self._read()
            if again != holder or age is None:  # changed meanwhile: judge afresh
                return False
            temp = self.path.with_name(f"{LOCK_FILE}.{self.record['token'][:8]}")
            self._hold(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.replace(temp, self.path)
        finally:
            os.close(fd)
            mutex.unlink(missing_ok=True)
        old = describe_holder(holder) if holder else "an unknown holder"
        self.report(f"apogee: took over the lock of run directory {self.path.parent} from {old}: {reason}")
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self._fd)  # the open descriptor: a lock taken over from us is not touched
            except (OSError, TypeError):
                pass
