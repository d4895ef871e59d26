"""The step loop of one rank: train from a start step to the end, log, checkpoint, and act on what
the resilience hooks say (a rejected step rewinds, a stop request checkpoints and stops).

`Trainer.fit` calls `fit`; a stage's trainer changes what a step is (train_step), never this loop.
"""
from __future__ import annotations

from typing import Callable, Optional

from data_pipeline.loader import data_batch_index
from engine.eval.validation import eval_due
from engine.resilience.guard import ResilienceError, Rewind
from engine.resilience.preemption import Preempted
from engine.train.metrics import MetricsWriter
from parallel.collectives import all_reduce_values
from parallel.process_group import current_backend


def fit(trainer, start_step: int = 0, checkpointer=None,
        on_step: Optional[Callable] = None) -> list:
    """Train from `start_step` to cfg.train.steps; log every accepted step on the logging rank and,
    with a checkpointer, save every checkpoint.interval steps and at the end.

    With a step guard (engine.resilience.guard), each step is judged before it is logged or
    checkpointed; a rejected step rewinds the run to the last good checkpoint (see `rewind`).
    """
    logs = trainer.ctx.rank == 0 and trainer.run_dir is not None
    attempt = next_attempt(trainer.events) if trainer.events is not None and trainer.ctx.rank == 0 else 1
    writer = MetricsWriter(trainer.run_dir, trainer.cfg.train.steps, trainer.cfg.logging.tensorboard,
                           attempt=attempt) if logs else None
    if trainer.events is not None and trainer.ctx.rank == 0:
        trainer.events.record("start", step=start_step, world_size=trainer.ctx.world_size,
                              device=str(trainer.ctx.device), backend=current_backend(),
                              attempt=attempt)
    interval, last = trainer.cfg.checkpoint.interval, trainer.cfg.train.steps
    results = []
    if trainer.heartbeat is not None:  # arms the hang timeout: start-up and resume do not count
        trainer.heartbeat.beat(start_step)
    if trainer.guard is not None and checkpointer is not None and not checkpointer.store.published():
        # A rewind needs somewhere to go back to, even before the first periodic checkpoint.
        checkpointer.save(trainer, start_step, trainer.checkpoint_metadata(), blocking=True)
    try:
        step = start_step
        while step < last:
            if trainer.fault_injector is not None:
                trainer.fault_injector.before_step(step)
            done = step + 1
            saving = checkpointer is not None and ((interval and done % interval == 0) or done == last)
            try:
                result = trainer.train_step(step)
                if trainer.guard is not None:
                    trainer.guard.after_step(step, result.loss, result.grad_norm, trainer.last_local_loss, saving)
            except Rewind as request:
                step = rewind(trainer, checkpointer, request, attempt + 1)
                attempt += 1  # the steps after the rewind are logged again, as the next attempt
                if writer is not None:
                    writer.attempt = attempt
                continue
            if trainer.stragglers is not None and result.compute_time is not None:
                result.extra.update(trainer.stragglers.after_step(step, result.compute_time, result.wait_time))
            results.append(result)
            if eval_due(trainer, done):  # a validation pass reads and changes nothing the training does
                result.extra.update(trainer.evaluate())
                if trainer.heartbeat is not None:
                    trainer.heartbeat.beat(done)
            if writer is not None:
                samples = done * trainer.cfg.train.global_batch_size
                console = done % trainer.cfg.train.log_interval == 0 or done == last
                writer.write(trainer.record(result), samples, console=console)
            if on_step is not None:
                on_step(result)
            if saving:
                checkpointer.save(trainer, done, trainer.checkpoint_metadata(),
                                  blocking=not trainer.cfg.checkpoint.async_save)
            memory = getattr(checkpointer, "memory", None)
            if memory is not None and memory.due(done) and done != last:
                memory.save(trainer, done)  # host copies now, sent to the keepers in the background
            if trainer.heartbeat is not None:
                trainer.heartbeat.beat(done)
            step = done
            if trainer.stop_request is not None and trainer.stop_request.agreed(trainer.world):
                stop_here(trainer, checkpointer, done, saved=saving)
        if checkpointer is not None:
            checkpointer.wait()
            if getattr(checkpointer, "memory", None) is not None:
                checkpointer.memory.wait()
    finally:
        if writer is not None:
            writer.close()
    return results


def next_attempt(events) -> int:
    """The number of the attempt starting now: one more than the starts and rewinds recorded."""
    return 1 + sum(1 for e in events.read() if e.get("type") in ("start", "rewind"))


def stop_here(trainer, checkpointer, step: int, saved: bool) -> None:
    """Asked to stop (engine/resilience/preemption.py): make sure a checkpoint of `step` is
    published, record the event and raise Preempted."""
    if checkpointer is not None:
        if not saved:
            checkpointer.save(trainer, step, trainer.checkpoint_metadata(), blocking=True)
        checkpointer.wait()
    if trainer.events is not None and trainer.ctx.rank == 0:
        trainer.events.record("preempted", step=step)
    # Leave together: the first rank to exit makes srun end the others (--kill-on-bad-exit).
    all_reduce_values([0], trainer.world)
    raise Preempted(f"stopped on request after step {step}, checkpoint written")


def rewind(trainer, checkpointer, request: Rewind, attempt: int = 0) -> int:
    """Go back to the newest intact checkpoint (skipping a data batch if asked); returns its step.
    `attempt`: the number the steps after it are logged with (recorded in the 'rewind' event)."""
    if checkpointer is None:
        raise ResilienceError(f"{request.reason}, but there is no checkpointer to rewind with")
    checkpointer.wait()
    info = checkpointer.latest_for_all()
    if info is None:
        raise ResilienceError(f"{request.reason}, but no intact checkpoint exists to rewind to")
    skips = set(trainer.cfg.data.skip_steps)
    skipped = None
    if request.skip_step is not None:
        skipped = data_batch_index(request.skip_step, sorted(skips))
        skips.add(skipped)
    checkpointer.load(trainer, info.path)  # restores weights, optimizer and the guard's history
    trainer.cfg.data.skip_steps = sorted(skips)  # skips decided since that checkpoint are kept
    if getattr(checkpointer, "memory", None) is not None:  # snapshots from that step on hold the abandoned run
        checkpointer.memory.discard_after(info.step - 1)
    if trainer.ctx.rank == 0 and trainer.events is not None:
        trainer.events.record("rewind", step=info.step, from_step=request.failed_step + 1, reason=request.reason,
                              skipped_batch=skipped, attempt=attempt)
        if skipped is not None:
            trainer.events.record("skip", step=request.skip_step + 1, data_batch=skipped)
        print(f"apogee: rewind to step {info.step}: {request.reason}", flush=True)
    if trainer.heartbeat is not None:
        trainer.heartbeat.beat(info.step)
    return info.step
