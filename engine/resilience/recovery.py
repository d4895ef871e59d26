"""After a failure: what failed, what the restart resumes from, and how much work was lost.

A rank that dies by a signal cannot write anything, so a failure is reconstructed afterwards by
whoever sees it: rank 0 of the restarted attempt (elastic restart or Slurm requeue), or the
launching process when no restart is left. The evidence is in the run directory: events the
failing attempt left (fault_injected, hang, exception) after its 'start' or 'restart', the last
step in metrics.jsonl, and the files' modification times (when the run last made progress).

Events (each with `rank`, `step` and `time`, see DESIGN.md):
- failure: rank (the failed rank, None if unknown), cause (kill, raise, hang, exception, signal,
  unknown), exit_code, step (the step in progress), steps_completed, failed_at; `signal` (its
  name) when a rank recorded that a signal ended it (engine/resilience/exit_records.py). Recorded by the launcher (observed_by: launcher) when it stops restarting,
  with restarts_exhausted false when the status is one no restart fixes (a config error, a
  diagnosed fault, refused storage).
- restart: restart_count, launcher.
- resume (engine.job.resume_rank.resume_trainer): step resumed from, and on a restart work_lost_steps
  (steps completed after that checkpoint, to be re-run), work_lost_s (seconds from that
  checkpoint's snapshot to the failure) and downtime_s (failure to resume).

events.jsonl is read line by line: a line torn by a process that died mid-write is skipped with
a note (engine/train/events.py), so it never stops a restart.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from engine.state.errors import CheckpointError
from engine.train.events import EventLog
from engine.resilience.exit_codes import EXCEPTION, HANG_DETECTED, SIGNAL_BASE, describe

ATTEMPT_MARKERS = ("start", "restart")  # events that open an attempt


def last_logged_step(run_dir: str | Path) -> int:
    """The step of the last metrics.jsonl record (0 when nothing was logged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    for line in reversed(path.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line torn by the crash
            continue
    return 0


def last_attempt_events(events: list[dict]) -> list[dict]:
    """The events of the latest attempt: everything after the last 'start' or 'restart'."""
    opened = max((i for i, e in enumerate(events) if e.get("type") in ATTEMPT_MARKERS), default=-1)
    return events[opened + 1:]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def describe_failure(run_dir: str | Path, exit_code: Optional[int] = None) -> dict:
    """The 'failure' event fields of the latest attempt, from what it left in the run directory."""
    run_dir = Path(run_dir)
    attempt = last_attempt_events(EventLog(run_dir, 0).read())
    completed = last_logged_step(run_dir)
    failed_at = max([_mtime(run_dir / "metrics.jsonl")] + [e.get("time", 0.0) for e in attempt])
    report = {"rank": None, "cause": "unknown", "exit_code": exit_code, "step": completed + 1,
              "steps_completed": completed, "failed_at": failed_at}
    injected = [e for e in attempt if e.get("type") == "fault_injected" and e.get("kind") in ("kill", "raise", "hang")]
    hangs = [e for e in attempt if e.get("type") == "hang"]
    # A rank that dies (by a signal or an exception) makes its peers fail in their next collective:
    # the first to record is the cause, the rest are consequences. A signal after a hang is the
    # launcher stopping the ranks that the hang's exit left behind.
    errors = sorted((e for e in attempt if e.get("type") == "exception" or
                     (e.get("type") == "signal" and not (hangs and e.get("time", 0.0) >= hangs[0].get("time", 0.0)))),
                    key=lambda e: e.get("time", 0.0))
    if injected:
        fault = injected[0]
        codes = {"kill": SIGNAL_BASE + 9, "raise": EXCEPTION, "hang": HANG_DETECTED}
        report.update(rank=fault["rank"], cause=fault["kind"], step=fault["step"], fault=fault["fault"],
                      exit_code=exit_code if exit_code is not None else codes[fault["kind"]])
    elif errors and errors[0]["type"] == "signal":
        first = errors[0]
        report.update(rank=first["rank"], cause="signal", signal=first["signal"], step=completed + 1,
                      exit_code=exit_code if exit_code is not None else first["exit_code"])
    elif errors:
        report.update(rank=errors[0]["rank"], cause="exception", step=errors[0].get("step", completed + 1),
                      error=errors[0].get("error"), exit_code=exit_code if exit_code is not None else EXCEPTION)
    elif hangs:
        # Every rank times out (the others wait in a collective): which one stopped first is in the dumps.
        report.update(cause="hang", step=hangs[0]["step"], hung_ranks=sorted({e["rank"] for e in hangs}),
                      exit_code=HANG_DETECTED)
    else:
        report["detail"] = ("no rank reported the failure: a signal from outside (e.g. the OOM killer), "
                            "or the node failed")
    if hangs:
        report["stack_dumps"] = sorted({e["stack_dump"] for e in hangs if e.get("stack_dump")})
    if report["exit_code"] is not None:
        report["how"] = describe(report["exit_code"])
    return report


def record_restart(run_dir: str | Path, restart_count: int, launcher: str) -> float:
    """Rank 0 of a restarted attempt: record the previous attempt's 'failure', then 'restart'.

    Call before this attempt records anything. Returns the failure's time (for the work lost).
    """
    events = EventLog(run_dir, 0)
    last = events.read()[-1:] or [{}]
    if last[0].get("type") == "preempted":  # a planned stop: nothing failed, nothing was lost
        events.record("restart", step=last[0]["step"], restart_count=restart_count, launcher=launcher,
                      failed_rank=None, cause="preempted")
        print(f"apogee: restart {restart_count} after a stop on request at step {last[0]['step']}; "
              f"resuming from its checkpoint", flush=True)
        return last[0]["time"]
    report = describe_failure(run_dir)
    events.record("failure", observed_by="restart", **report)
    events.record("restart", step=report["steps_completed"], restart_count=restart_count, launcher=launcher,
                  failed_rank=report["rank"], cause=report["cause"])
    print(f"apogee: restart {restart_count} after {report.get('signal', report['cause'])} of rank {report['rank']} at step "
          f"{report['step']}; resuming from the latest checkpoint", flush=True)
    return report["failed_at"]


def record_final_failure(run_dir: str | Path, exit_code: int) -> dict:
    """The launching process, when the ranks failed and no restart is left: record the 'failure'."""
    from engine.resilience.exit_codes import restart_helps

    report = describe_failure(run_dir, exit_code)
    try:
        EventLog(run_dir, 0).record("failure", observed_by="launcher", restarts_exhausted=restart_helps(exit_code),
                                    **report)
    except (OSError, CheckpointError) as err:  # e.g. the disk that is full: the exit status says it all
        print(f"apogee: could not record the failure in events.jsonl ({err})", file=sys.stderr, flush=True)
    return report


def snapshot_time(events: list[dict], step: int) -> Optional[float]:
    """When the state of the checkpoint of `step` was captured (from its checkpoint_saved event)."""
    saved = [e for e in events if e.get("type") == "checkpoint_saved" and e.get("step") == step]
    if not saved:
        return None
    return saved[-1]["time"] - saved[-1].get("write_s", 0.0)


def work_lost(run_dir: str | Path, resumed_step: int, failed_at: float, snapshot_at: Optional[float] = None) -> dict:
    """Steps and seconds of training lost to a failure, resuming from the checkpoint of `resumed_step`.

    Steps: those completed after the checkpoint (they will be re-run). Seconds: from the
    checkpoint's snapshot (`snapshot_at`, else its checkpoint_saved event), or from the failed
    attempt's start if that is later (time spent down before it was counted at the previous
    failure), to the failure.
    """
    events = EventLog(run_dir, 0).read()
    starts = [e["time"] for e in events if e.get("type") == "start" and e.get("time", failed_at + 1) <= failed_at]
    snapshot = snapshot_at if snapshot_at is not None else (
        snapshot_time(events, resumed_step) if resumed_step > 0 else None)
    since = max(t for t in (snapshot, starts[-1] if starts else None, -1.0) if t is not None)
    if since < 0:
        since = failed_at
    return {"work_lost_steps": max(0, last_logged_step(run_dir) - resumed_step),
            "work_lost_s": max(0.0, failed_at - since), "downtime_s": max(0.0, time.time() - failed_at)}


def restart_resume_choice(resume: str, store) -> str:
    """What `--resume` means on a restart: the run's newest checkpoint if it has any ('auto').

    A restart continues this run whatever the first start loaded: with `--resume PATH` it must
    not go back to PATH once the run has checkpoints of its own; before it has any, the first
    start's choice is repeated (PATH again, or `never`: from scratch).
    """
    return "auto" if store.published() else resume


def record_durably(events: EventLog, type: str, **fields) -> dict:
    """Record an event and fsync events.jsonl: for events written just before a process dies."""
    event = events.record(type, **fields)
    fd = os.open(events.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return event


def report_signal(run_dir: str | Path, rank: int, name: str) -> None:
    """A rank a signal is about to end leaves a `signal` event naming itself and the signal, for the restart."""
    import signal

    record_durably(EventLog(run_dir, rank), "signal", signal=name,
                   exit_code=SIGNAL_BASE + int(signal.Signals[name]))


def report_exception(run_dir: Optional[str | Path], rank: int, step: Optional[int], error: BaseException) -> None:
    """A rank about to die of an exception prints it and leaves an 'exception' event for the restart.

    Printed here because the elastic agent shows a rank's traceback only when no restart is left.
    """
    import traceback

    print(f"apogee: rank {rank} failed during step {step}:", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()
    if run_dir is not None:
        try:
            record_durably(EventLog(run_dir, rank), "exception", step=step,
                           error=f"{type(error).__name__}: {error}", exit_code=EXCEPTION)
        except (OSError, CheckpointError) as err:  # the run directory refuses writes: the traceback is above
            print(f"apogee: could not record the exception in events.jsonl ({err})", file=sys.stderr, flush=True)
