"""Running a training job end to end: check the config, prepare data, start ranks, train.

`run_job` runs in the process the user started. It validates everything for the final world size
before any rank exists (so a bad layout costs nothing), preprocesses the corpus and builds the
sample indices once (so ranks do not race to build them), measures the MFU peak while the cores
are idle, then either trains in-process (one rank), starts `--nproc` local ranks under the elastic
agent, or, when torchrun/srun/mpirun started the ranks, joins them and lets rank 0 prepare the run
while the others wait. Before anything is written, the process that owns the run (this one, or
rank 0 under an outside launcher) claims the run directory (engine/job/run_dir.py: its lock,
`--overwrite`, writable paths). `worker_main` is what each rank runs.
"""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from engine.state.checkpoint import Checkpointer
from engine.state.checkpoint_store import CheckpointError
from engine.state.memory_snapshots import MemorySnapshots
from engine.job.resume_rank import resume_trainer
from engine.state.errors import StorageError
from engine.state.resume import (check_compatible, check_loadable, check_steps_beyond, checkpoint_store,
                                 choose_checkpoint, run_id)
from engine.job.keepers import KeeperPool
from engine.job.run_dir import claim_run_dir, remove_if_empty
from engine.config import ApogeeConfig, ConfigError, config_from_dict, save_config
from engine.config_validation import check_run_name, validate
from engine.state.init_from import check_init_source, initialize_from
from engine.job.launch import cpu_threads_per_rank, detect_launcher, init_distributed, launch_local
from engine.train.metrics import PeakFlops, machine_peak
from engine.resilience.exit_records import ExitRecorder
from engine.resilience.faults import early_fault_warnings
from engine.resilience.preemption import Preempted
from engine.resilience.recovery import (record_final_failure, record_restart, report_exception, report_signal,
                                        restart_resume_choice)
from engine.run_files import RunFileError, check_run_files
from engine.stage import Stage, StageRegistry
from engine.resilience import determinism
from parallel.collectives import CommLedger, broadcast_objects, world_group
from parallel.process_group import flight_recorder_environment, leave


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
        split=cfg.data.split, document_mask=cfg.data.document_mask,
        reset_position_ids=cfg.data.reset_position_ids,
    )


def prepare_data(cfg: ApogeeConfig, stage: Stage) -> list[str]:
    """Preprocess raw inputs on first use and build the sample indices; returns dataset prefixes."""
    from data_pipeline.corpus import cache_writes, ensure_corpus
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
    own = stage.build_data(cfg)  # reads every example once: a bad line fails here, before ranks start
    if own is not None:
        for note in getattr(own, "notes", ()):  # what reading dropped or found useless, said once
            print(f"apogee: note: {note}", file=sys.stderr, flush=True)
        return []
    with cache_writes(cfg.data.cache_dir):  # a read-only cache: one line naming data.cache_dir, exit 2
        prefixes = [ensure_corpus(spec, cfg.data.cache_dir, cfg.data.tokenizer) for spec in cfg.data.inputs]
        for prefix in prefixes:  # an id past the vocabulary indexes past the embedding: refused before ranks start
            check_token_ids(prefix, cfg.model.vocab_size, cfg.data.cache_dir, option="model.vocab_size")
        build_training_data(cfg, stage, prefixes)  # builds and caches the indices once, before ranks start
    return prefixes


def resolve_run_dir(cfg: ApogeeConfig, run_dir: Optional[str]) -> Path:
    """--run-dir (wherever the user puts it), or runs/<name>, which a name cannot leave (no '/', no '..')."""
    if run_dir:
        return Path(run_dir)
    check_run_name(cfg.name)
    return Path("runs") / cfg.name


def run_job(cfg: ApogeeConfig, stage: Stage, run_dir: Optional[str] = None, nproc: Optional[int] = None,
            resume: str = "auto", overwrite: bool = False, prepare: bool = False) -> int:
    """Validate, prepare and run a training job of `stage`; returns the process exit status.

    The run directory is claimed first (locked; on `overwrite` an old run is moved aside); with
    `prepare`, the stage's `prepare` then sees the claimed directory and picks the `--resume` choice.
    """
    info = detect_launcher()
    if info.launcher != "none" and nproc not in (None, info.world_size):
        raise ConfigError(f"--nproc {nproc}: this process was started by {info.launcher} with "
                          f"{info.world_size} ranks; leave --nproc out or set it to {info.world_size}")
    world = info.world_size if info.launcher != "none" else (nproc or 1)
    out = resolve_run_dir(cfg, run_dir)
    # Every rank checks the config and layout on its own, before meeting the others and before the
    # run directory is touched: a bad one exits with status 2 on all ranks at once instead of
    # leaving some waiting in the rendezvous.
    validate(cfg, world)
    cfg.parallel.validate(world)
    prepare_rank_environment(cfg, out)
    lock, claim_error = None, None
    created = not out.exists()  # a run refused after the claim (e.g. by its stage) leaves no directory
    if info.rank == 0:  # the owner: the launcher itself, or rank 0 of an outside launcher
        try:
            lock = claim_run_dir(out, cfg, overwrite)
        except ConfigError as err:
            if info.launcher == "none":
                raise
            claim_error = err  # told to every rank once they have met, so none is left waiting
    try:
        if prepare:
            resume = stage.prepare(cfg, run_dir, resume)
            validate(cfg, world)  # again: what the stage's start set (a branch's schedule, say)
        stage.validate(cfg, world)
        if info.rank == 0:  # once per job, before any rank starts: a rehearsal too early to judge is not silent
            for line in early_fault_warnings(cfg):
                print(f"apogee: warning: {line}", file=sys.stderr, flush=True)
        if info.launcher != "none":
            return _join_outside_launch(cfg, stage, out, resume, info, claim_error)
        return _run_here(cfg, stage, out, resume, world)
    finally:
        if lock is not None:
            lock.release()
            if created:
                remove_if_empty(out)


def _run_here(cfg: ApogeeConfig, stage: Stage, out: Path, resume: str, world: int) -> int:
    """The launcher's part: prepare the run, then train in this process or under the elastic agent."""
    prefixes = _prepare_run(cfg, stage, out, resume)
    keepers = KeeperPool.for_run(cfg.checkpoint.memory_interval, world)  # outlive the ranks' restarts
    with keepers if keepers is not None else nullcontext():
        if world == 1:
            worker_main(cfg.to_dict(), stage, str(out), prefixes, resume, None)
            return 0
        # Measured here, while the cores are idle, and handed to the ranks.
        peak = machine_peak(torch.device("cpu"), world, world) if not torch.cuda.is_available() else None
        # The agent restarts every rank after a failure; restarted ranks resume from the newest checkpoint
        # (or the newest memory snapshots).
        status = launch_local(world, local_rank_main, (cfg.to_dict(), stage, str(out), prefixes, resume, peak),
                              max_restarts=cfg.resilience.max_restarts,
                              before_attempt=keepers.ensure_alive if keepers is not None else None)
    if status != 0:  # no restart left: no restarted rank will record this failure, so record it here
        record_final_failure(out, status)
    return status


def prepare_rank_environment(cfg: ApogeeConfig, run_dir: Path) -> None:
    """What the ranks must find in their environment before torch.distributed and CUDA start (ranks
    started here inherit it): the flight recorder's dumps go to RUN_DIR/flight-recorder-rank<r>, and
    on CUDA the deterministic-replay settings (engine/resilience/determinism.py)."""
    os.environ.update(flight_recorder_environment(Path(run_dir).resolve() / "flight-recorder-rank"))
    os.environ.update(determinism.environment(cfg.resilience, torch.cuda.is_available()))


def _prepare_run(cfg: ApogeeConfig, stage: Stage, out: Path, resume: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    check_run_files(out)  # a symlink planted as config.yaml & co. is refused, never written through
    this_run = run_id(out)  # created here, before any rank reads it (every rank names its checkpoint files by it)
    # A checkpoint of another model or run, one that would run code, or one the run is already
    # past is refused here, before any rank starts. Its checksums are verified by the ranks,
    # each its share (hashes=False here: manifests and sizes only).
    info = choose_checkpoint(resume, checkpoint_store(cfg, out), report=lambda _: None, hashes=False)
    if info is not None:
        check_loadable(info.path)
        check_compatible(info, cfg, this_run)
        check_steps_beyond(info.step, cfg, info.path)
    save_config(cfg, out / "config.yaml")
    return prepare_data(cfg, stage)


def _join_outside_launch(cfg: ApogeeConfig, stage: Stage, out: Path, resume: str, info,
                         claim_error: Optional[Exception] = None) -> int:
    """Ranks started by torchrun, srun or mpirun: meet first, then rank 0 prepares the run.

    Rank 0 prepares the data and measures the peak while the others wait; its outcome, an error
    included (e.g. a run directory another run holds), is broadcast, so a bad input stops every
    rank with the same message instead of leaving them waiting for a rank 0 that has exited. Rank
    0's `--resume` choice is the one every rank runs with (it was made on the claimed directory).
    """
    from data_pipeline import DataError

    device = init_distributed(info, timeout_s=cfg.resilience.collective_timeout_s)
    failed = True
    try:
        shared: list = [None, None, None, resume]  # prefixes, peak, (error class name, message), resume
        failure = None
        if info.rank == 0:
            try:
                if claim_error is not None:
                    raise claim_error
                shared[0] = _prepare_run(cfg, stage, out, resume)
                # The peak is the node's, measured with all its cores (torchrun sets OMP_NUM_THREADS=1).
                torch.set_num_threads(os.cpu_count() or 1)
                shared[1] = machine_peak(device, info.world_size, info.local_world_size)
            except Exception as err:  # re-raised below, after the others have heard of it
                failure, shared[2] = err, (type(err).__name__, str(err))
        broadcast_objects(shared, world_group(CommLedger()))
        prefixes, peak, error, resume = shared
        if failure is not None:
            raise failure
        if error is not None:
            kind = {"DataError": DataError, "ConfigError": ConfigError, "LaunchError": ConfigError,
                    "RunDirLocked": ConfigError, "CheckpointError": CheckpointError,
                    "UnsafeCheckpointError": CheckpointError, "StorageError": StorageError,
                    "RunFileError": RunFileError}.get(error[0])
            if kind is None:
                raise RuntimeError(f"rank 0 failed while preparing the run: {error[0]}: {error[1]}")
            raise kind(error[1])
        worker_main(cfg.to_dict(), stage, str(out), prefixes, resume, peak)
        failed = False
    finally:
        leave(failed=failed)  # after worker_main left, a no-op; else an abort under NCCL
    return 0


def local_rank_main(cfg_dict: dict, stage: Stage, run_dir: str, prefixes: list[str], resume: str,
                    peak: Optional[PeakFlops]) -> None:
    """The elastic agent's entry point: worker_main, with a config error as exit status 2 (and every
    way out recorded in RUN_DIR/exit/, engine/resilience/exit_records.py)."""
    recorder = ExitRecorder(detect_launcher().rank, run_dir, on_signal=report_signal)
    status = recorder.run(exit_on_config_error, worker_main, cfg_dict, stage, run_dir, prefixes, resume, peak)
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
    cfg = config_from_dict(cfg_dict, sections=stage.sections)
    prepare_rank_environment(cfg, Path(run_dir))  # before CUDA and NCCL start (a no-op if inherited)
    device = init_distributed(info, timeout_s=cfg.resilience.collective_timeout_s)
    deterministic = determinism.configure(cfg.resilience, device)
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
        if deterministic:
            print(f"apogee: deterministic kernels for replays (resilience.deterministic="
                  f"{cfg.resilience.deterministic}): {determinism.describe(deterministic)}", flush=True)
    data = build_training_data(cfg, stage, prefixes)
    # SIGUSR1 -> checkpoint, stop, requeue; the watchdog; rehearsed faults; the step guard.
    hooks = ResilienceHooks.for_run(cfg, ctx.rank, run_dir)
    trainer = stage.trainer_class(cfg)(cfg, ctx, data, run_dir=Path(run_dir), peak=peak, resilience=hooks)
    if cfg.train.eval_interval:
        trainer.validation_data = stage.build_validation_data(cfg)
    # Checkpoint writes and verifications are progress for the hang watchdog.
    checkpointer = Checkpointer(checkpoint_store(cfg, Path(run_dir)), ctx.rank, ctx.world_size,
                                run_id(Path(run_dir)), on_event=trainer.events.record,
                                progress=hooks.heartbeat.alive, timeout_s=cfg.resilience.collective_timeout_s)
    checkpointer.memory = MemorySnapshots.from_environment(cfg, ctx.rank, ctx.world_size, run_id(Path(run_dir)))
    start_step = resume_trainer(trainer, checkpointer, cfg, resume, Path(run_dir), failed_at=failed_at,
                                restarted=info.restart_count > 0)
    if start_step and start_step >= cfg.train.steps:
        if info.restart_count > 0:  # the last attempt ended after its final checkpoint: nothing is left
            if ctx.rank == 0:
                print(f"apogee: the run is complete (step {start_step} of train.steps={cfg.train.steps})", flush=True)
            trainer.heartbeat.stop()
            leave()
            return
        check_steps_beyond(start_step, cfg, None)  # the same ConfigError on every rank
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
    except StorageError:  # disk full or read-only: reported in one line by exit_on_config_error (exit 20)
        leave()
        raise
    except ResilienceError as err:  # diagnosed: a restart would meet the same fault
        if ctx.rank == 0:
            trainer.events.record("stopped", step=trainer.heartbeat.steps_completed, reason=str(err))
            print(f"apogee: stopping: {err}", file=sys.stderr, flush=True)
        leave()
        sys.exit(FAULT_DIAGNOSED)
    except Exception as err:  # leave the cause for the restart to read, then die as before
        report_exception(run_dir, ctx.rank, (trainer.heartbeat.steps_completed or start_step) + 1, err)
        # now: at interpreter exit, gloo's threads abort the process (SIGABRT); under NCCL, abort the
        # communicators, which a peer may have left mid-collective (destroying them would wait on it)
        leave(failed=True)
        raise
    finally:
        trainer.heartbeat.stop()
    leave()


def run_stage(stage: Stage, registry: StageRegistry, config: Optional[str], overrides: list[str],
              run_dir: Optional[str] = None, nproc: Optional[int] = None, resume: str = "auto",
              overwrite: bool = False) -> int:
    """`apogee <stage>`: load the config with the stage's sections, refuse other stages' settings,
    claim the run directory, let the stage prepare its start, run the job. Exit status 2 with the
    key and what is valid otherwise; STORAGE_FAILED (20) when the storage refuses a write.

    A process that is a rank (started by srun, torchrun or mpirun, or the only rank) records how it
    left in the run directory, once that is known (engine/resilience/exit_records.py); the process
    that only starts `--nproc` local ranks is none (its ranks record their own).
    """
    info = detect_launcher()
    recorder = ExitRecorder(info.rank, on_signal=report_signal) if info.launcher != "none" or (nproc or 1) == 1 else None

    def run() -> int:
        cfg = registry.load_config(stage, config, overrides)
        registry.check_foreign(stage, cfg)
        if recorder is not None:
            recorder.bind(resolve_run_dir(cfg, run_dir))
        return run_job(cfg, stage, run_dir=run_dir, nproc=nproc, resume=resume, overwrite=overwrite, prepare=True)

    if recorder is None:
        return exit_on_config_error(run)
    return recorder.run(exit_on_config_error, run)


def exit_on_config_error(fn, *args, **kwargs) -> int:
    """Call fn; a ConfigError becomes a one-line message on stderr and exit status 2, a StorageError
    one line (from rank 0) and STORAGE_FAILED, which no launcher restarts."""
    from data_pipeline import DataError
    from engine.resilience.exit_codes import STORAGE_FAILED
    from parallel.layout import TopologyError

    try:
        return fn(*args, **kwargs)
    except StorageError as err:
        if detect_launcher().rank == 0:
            print(f"apogee: error: {err}", file=sys.stderr, flush=True)
        return STORAGE_FAILED
    except (ConfigError, TopologyError, DataError, CheckpointError, RunFileError) as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
