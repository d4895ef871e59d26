"""Running a training job end to end: check the config, prepare data, start ranks, train.

`run_job` runs in the process the user started. It validates everything for the final world size
before any rank exists (so a bad layout costs nothing), preprocesses the corpus and builds the
sample indices once (so ranks do not race to build them), measures the MFU peak while the cores
are idle, then either trains in-process (one rank), starts `--nproc` local ranks under the elastic
agent, or, when torchrun/srun/mpirun started the ranks, joins them and lets rank 0 prepare the run
while the others wait. `worker_main` is what each rank runs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from engine.state.checkpoint import Checkpointer
from engine.state.checkpoint_store import CheckpointError
from engine.state.resume import check_compatible, checkpoint_store, choose_checkpoint, run_id
from engine.config import ApogeeConfig, ConfigError, config_from_dict, save_config
from engine.config_validation import validate
from engine.state.init_from import check_init_source, initialize_from
from engine.job.launch import cpu_threads_per_rank, detect_launcher, init_distributed, launch_local
from engine.train.metrics import PeakFlops, machine_peak
from engine.resilience.preemption import Preempted
from engine.resilience.recovery import (record_final_failure, record_restart, report_exception,
                                        restart_resume_choice, work_lost)
from engine.stage import Stage, StageRegistry
from parallel.collectives import CommLedger, broadcast_objects, world_group
from parallel.process_group import leave


def build_training_data(cfg: ApogeeConfig, stage: Stage, prefixes: list[str]):
    """The loader for this run: the stage's own data, else the pre-training blend over already
    preprocessed dataset prefixes."""
    from data_pipeline.loader import TrainingData

    own = stage.build_data(cfg)
    if own is not None:
        return own
    t = cfg.train
    return TrainingData(
        prefixes=prefixes, weights=cfg.data.weights, phases=cfg.data.phases,
        seq_length=cfg.model.seq_length, seed=cfg.seed, global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, steps=max(1, t.steps), cache_dir=cfg.data.cache_dir,
        reserve_steps=max(16, t.steps // 100) + len(cfg.data.skip_steps), prefetch=cfg.data.prefetch,
        split=cfg.data.split,
    )


def prepare_data(cfg: ApogeeConfig, stage: Stage) -> list[str]:
    """Preprocess raw inputs on first use and build the sample indices; returns dataset prefixes."""
    from data_pipeline.corpus import ensure_corpus
    from data_pipeline.token_range import check_token_ids
    from data_pipeline.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids from data.tokenizer={cfg.data.tokenizer!r})")
    if cfg.train.init_from:
        check_init_source(cfg)
    if cfg.train.eval_interval:  # the held-out data is read (and its vocabulary checked) before ranks start too
        from engine.eval.validation import check_validation_prefixes

        check_validation_prefixes(cfg)
        stage.build_validation_data(cfg)
    if stage.build_data(cfg) is not None:  # reads every example once: a bad line fails here, before ranks start
        return []
    prefixes = [ensure_corpus(spec, cfg.data.cache_dir, cfg.data.tokenizer) for spec in cfg.data.inputs]
    for prefix in prefixes:  # an id past the vocabulary indexes past the embedding: refused before ranks start
        check_token_ids(prefix, cfg.model.vocab_size, cfg.data.cache_dir, option="model.vocab_size")
    build_training_data(cfg, stage, prefixes)  # builds and caches the indices once, before ranks start
    return prefixes


def resolve_run_dir(cfg: ApogeeConfig, run_dir: Optional[str]) -> Path:
    """--run-dir, or runs/<name>."""
    return Path(run_dir) if run_dir else Path("runs") / cfg.name


def run_job(cfg: ApogeeConfig, stage: Stage, run_dir: Optional[str] = None, nproc: Optional[int] = None,
            resume: str = "auto") -> int:
    """Validate, prepare and run a training job of `stage`; returns the process exit status."""
    info = detect_launcher()
    if info.launcher != "none" and nproc not in (None, info.world_size):
        raise ConfigError(f"--nproc {nproc}: this process was started by {info.launcher} with "
                          f"{info.world_size} ranks; leave --nproc out or set it to {info.world_size}")
    world = info.world_size if info.launcher != "none" else (nproc or 1)
    # Every rank checks the layout on its own, before meeting the others: a bad one exits with
    # status 2 on all ranks at once instead of leaving some waiting in the rendezvous.
    validate(cfg, world)
    stage.validate(cfg, world)
    cfg.parallel.validate(world)
    out = resolve_run_dir(cfg, run_dir)
    if info.launcher != "none":
        return _join_outside_launch(cfg, stage, out, resume, info)
    prefixes = _prepare_run(cfg, stage, out, resume)
    if world == 1:
        worker_main(cfg.to_dict(), stage, str(out), prefixes, resume, None)
        return 0
    # Measured here, while the cores are idle, and handed to the ranks.
    peak = machine_peak(torch.device("cpu"), world, world) if not torch.cuda.is_available() else None
    # The agent restarts every rank after a failure; restarted ranks resume from the newest checkpoint.
    status = launch_local(world, local_rank_main, (cfg.to_dict(), stage, str(out), prefixes, resume, peak),
                          max_restarts=cfg.resilience.max_restarts)
    if status != 0:  # no restart left: no restarted rank will record this failure, so record it here
        record_final_failure(out, status)
    return status


def _prepare_run(cfg: ApogeeConfig, stage: Stage, out: Path, resume: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    # A checkpoint of another model or run is refused here, before any rank starts.
    info = choose_checkpoint(resume, checkpoint_store(cfg, out))
    if info is not None:
        check_compatible(info, cfg, run_id(out))
    save_config(cfg, out / "config.yaml")
    return prepare_data(cfg, stage)


def _join_outside_launch(cfg: ApogeeConfig, stage: Stage, out: Path, resume: str, info) -> int:
    """Ranks started by torchrun, srun or mpirun: meet first, then rank 0 prepares the run.

    Rank 0 prepares the data and measures the peak while the others wait; its outcome, an error
    included, is broadcast, so a bad input stops every rank with the same message instead of
    leaving them waiting for a rank 0 that has exited.
    """
    from data_pipeline import DataError

    device = init_distributed(info)
    try:
        shared: list = [None, None, None]  # prefixes, peak, (error class name, message)
        failure = None
        if info.rank == 0:
            try:
                shared[0] = _prepare_run(cfg, stage, out, resume)
                # The peak is the node's, measured with all its cores (torchrun sets OMP_NUM_THREADS=1).
                torch.set_num_threads(os.cpu_count() or 1)
                shared[1] = machine_peak(device, info.world_size, info.local_world_size)
            except Exception as err:  # re-raised below, after the others have heard of it
                failure, shared[2] = err, (type(err).__name__, str(err))
        broadcast_objects(shared, world_group(CommLedger()))
        prefixes, peak, error = shared
        if failure is not None:
            raise failure
        if error is not None:
            kind = {"DataError": DataError, "ConfigError": ConfigError, "LaunchError": ConfigError,
                    "CheckpointError": CheckpointError}.get(error[0])
            if kind is None:
                raise RuntimeError(f"rank 0 failed while preparing the run: {error[0]}: {error[1]}")
            raise kind(error[1])
        worker_main(cfg.to_dict(), stage, str(out), prefixes, resume, peak)
    finally:
        leave()
    return 0


def local_rank_main(cfg_dict: dict, stage: Stage, run_dir: str, prefixes: list[str], resume: str,
                    peak: Optional[PeakFlops]) -> None:
    """The elastic agent's entry point: worker_main, with a config error as exit status 2."""
    status = exit_on_config_error(worker_main, cfg_dict, stage, run_dir, prefixes, resume, peak)
    if status:  # exit 0 would skip handing the return value back to the agent
        sys.exit(status)


def worker_main(cfg_dict: dict, stage: Stage, run_dir: str, prefixes: list[str], resume: str,
                peak: Optional[PeakFlops]) -> None:
    """One rank: join the process group (if not yet joined), build the context and the trainer, train."""
    from engine.resilience.exit_codes import FAULT_DIAGNOSED, PREEMPTED
    from engine.resilience.guard import ResilienceError
    from engine.resilience.hooks import ResilienceHooks
    from parallel.topology import ParallelContext

    info = detect_launcher()
    torch.set_num_threads(cpu_threads_per_rank(info.local_world_size))
    device = init_distributed(info)
    cfg = config_from_dict(cfg_dict, sections=stage.sections)
    if info.world_size > 1:
        ctx = ParallelContext.create(cfg.parallel, device=device)
    else:
        ctx = ParallelContext.single(device=device)
    peak = peak or machine_peak(device, info.world_size, info.local_world_size)
    failed_at = None
    if info.restart_count > 0:  # an elastic restart or a Slurm requeue: continue this run
        resume = restart_resume_choice(resume, checkpoint_store(cfg, Path(run_dir)))
        if ctx.rank == 0:
            failed_at = record_restart(run_dir, info.restart_count, info.launcher)
    if ctx.rank == 0:
        meet = f" meeting at {info.master_addr}:{info.master_port}" if info.world_size > 1 else ""
        print(f"apogee: {ctx.world_size} rank(s) via {info.launcher}{meet}, tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
              f"cp={cfg.parallel.cp} dp={cfg.parallel.dp}{f' ep={cfg.parallel.ep}' if cfg.parallel.ep > 1 else ''}; "
              f"MFU peak: {peak.source}", flush=True)
    data = build_training_data(cfg, stage, prefixes)
    # SIGUSR1 -> checkpoint, stop, requeue; the watchdog; rehearsed faults; the step guard.
    hooks = ResilienceHooks.for_run(cfg, ctx.rank, run_dir)
    trainer = stage.trainer_class(cfg)(cfg, ctx, data, run_dir=Path(run_dir), peak=peak, resilience=hooks)
    if cfg.train.eval_interval:
        trainer.validation_data = stage.build_validation_data(cfg)
    checkpointer = Checkpointer(checkpoint_store(cfg, Path(run_dir)), ctx.rank, ctx.world_size,
                                run_id(Path(run_dir)), on_event=trainer.events.record)
    start_step = resume_trainer(trainer, checkpointer, cfg, resume, Path(run_dir), failed_at=failed_at)
    if start_step == 0 and cfg.train.init_from:  # a fresh fine-tuning run starts from other weights
        source = initialize_from(trainer, cfg.train.init_from)
        if ctx.rank == 0:
            trainer.events.record("init_from", step=0, path=cfg.train.init_from, source=source)
            print(f"apogee: weights from {cfg.train.init_from} ({source})", flush=True)
    try:
        trainer.fit(start_step, checkpointer)
    except Preempted as stop:  # asked to stop: the checkpoint is written, the job requeues
        if ctx.rank == 0:
            print(f"apogee: {stop}", file=sys.stderr, flush=True)
        leave()
        sys.exit(PREEMPTED)
    except ResilienceError as err:  # diagnosed: a restart would meet the same fault
        if ctx.rank == 0:
            trainer.events.record("stopped", step=trainer.heartbeat.steps_completed, reason=str(err))
            print(f"apogee: stopping: {err}", file=sys.stderr, flush=True)
        leave()
        sys.exit(FAULT_DIAGNOSED)
    except Exception as err:  # leave the cause for the restart to read, then die as before
        report_exception(run_dir, ctx.rank, (trainer.heartbeat.steps_completed or start_step) + 1, err)
        leave()  # now: at interpreter exit, gloo's threads abort the process (SIGABRT)
        raise
    finally:
        trainer.heartbeat.stop()
    leave()


def resume_trainer(trainer, checkpointer: Checkpointer, cfg: ApogeeConfig, resume: str, run_dir: Path,
                   failed_at: Optional[float] = None) -> int:
    """Load the checkpoint `--resume` selects into `trainer`; returns the step to start from.

    Rank 0 picks (and verifies) the checkpoint and tells the others, so every rank loads the same one.
    After a failure (`failed_at`, its time), the 'resume' event also records the work lost.
    """
    choice = [None]
    if trainer.ctx.rank == 0:
        info = choose_checkpoint(resume, checkpointer.store)
        if info is not None:
            check_compatible(info, cfg, run_id(run_dir))
            choice[0] = (str(info.path), info.step)
    broadcast_objects(choice, trainer.world)
    lost = work_lost(run_dir, choice[0][1] if choice[0] else 0, failed_at) if failed_at is not None else {}
    if choice[0] is None:
        if lost and trainer.ctx.rank == 0:  # a restart with no checkpoint yet: from scratch
            trainer.events.record("resume", step=0, path=None, **lost)
        return 0
    path, step = choice[0]
    checkpointer.load(trainer, Path(path))  # also restores the skip list and the guard's history
    if trainer.ctx.rank == 0:
        trainer.events.record("resume", step=step, path=path, **lost)
        print(f"apogee: resumed from {path} (step {step})", flush=True)
    return step


def run_stage(stage: Stage, registry: StageRegistry, config: Optional[str], overrides: list[str],
              run_dir: Optional[str] = None, nproc: Optional[int] = None, resume: str = "auto") -> int:
    """`apogee <stage>`: load the config with the stage's sections, refuse other stages' settings, let
    the stage prepare its start, run the job. Exit status 2 with the key and what is valid otherwise."""
    def run() -> int:
        cfg = registry.load_config(stage, config, overrides)
        registry.check_foreign(stage, cfg)
        return run_job(cfg, stage, run_dir=run_dir, nproc=nproc, resume=stage.prepare(cfg, run_dir, resume))

    return exit_on_config_error(run)


def exit_on_config_error(fn, *args, **kwargs) -> int:
    """Call fn; a ConfigError becomes a one-line message on stderr and exit status 2."""
    from data_pipeline import DataError
    from parallel.layout import TopologyError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, TopologyError, DataError, CheckpointError) as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
