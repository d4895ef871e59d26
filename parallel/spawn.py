"""Run a function on N real gloo ranks (separate processes on this machine) with a timeout and clear
failure output: the multi-rank tests and the benchmarks start their ranks with it.

    def body(rank, world_size, x):          # module-level, so spawn can pickle it
        ...                                 # torch.distributed is initialised (gloo)
        return something_picklable

    results = run_distributed(body, 4, 3.0, timeout=120)   # list of each rank's return value

Failures are raised in the parent as DistributedError with every failing rank's traceback; a
rank that does not finish within the timeout is killed and named, together with the ranks that
were still running, so a hang in a collective reads as a hang, not as a silent CI timeout.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any, Callable


class DistributedError(RuntimeError):
    """One or more ranks raised or timed out; the message holds each rank's report."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, queue, threads):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch

    from parallel import process_group
    from parallel.collectives import CommLedger, barrier, world_group

    torch.set_num_threads(threads)
    try:
        process_group.join(torch.device("cpu"), rank, world_size, "127.0.0.1", port, timeout_s=300.0)
        result = fn(rank, world_size, *args)
        barrier(world_group(CommLedger()))
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including SystemExit from code under test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        process_group.leave()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0,
                    threads: int = 1) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return the results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue, threads), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, payload = queue.get(timeout=min(remaining, 1.0))
        except Exception:  # queue.Empty: check for ranks that died without reporting
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in errors]
            for r in dead:
                time.sleep(0.5)  # its report may still be in the pipe
                if r not in results and r not in errors and queue.empty():
                    errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
            continue
        (results if status == "ok" else errors)[rank] = payload
        if errors:  # one failure usually leaves the others blocked in a collective
            deadline = min(deadline, time.monotonic() + 10)
    missing = [r for r in range(world_size) if r not in results and r not in errors]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    if errors or missing:
        report = [f"{len(errors)} rank(s) failed, {len(missing)} did not finish (timeout {timeout:.0f}s) "
                  f"of world size {world_size}"]
        for r in sorted(errors):
            report.append(f"--- rank {r} ---\n{errors[r]}")
        if missing:
            report.append(f"--- still running when stopped: ranks {missing} ---")
        raise DistributedError("\n".join(report))
    return [results[r] for r in range(world_size)]
