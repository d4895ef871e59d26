"""Multi-rank launch under every launcher, for real: the elastic agent (`apogee pretrain --nproc 2`),
torchrun, srun (through slurm/apogee.sbatch in a real Slurm job) and mpirun, with and without
mpi4py. Each trains the same 3 steps at dp=2 and must log the same losses as the others.

Slurm and Open MPI come from `bash scripts/slurm-local.sh start` (apt packages and the daemons);
mpi4py from `pip install mpi4py` (the 'mpi' extra). Launchers that are missing skip with the
command that installs them. The last tests check the rank and rendezvous arithmetic as functions.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.job.launch import derived_port, detect_launcher, first_host, tasks_on_node
from data_pipeline.words_corpus import make_dataset

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120  # a hang fails the test instead of stalling the suite
TRAIN = ["train.steps=3", "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=2"]
MPIRUN = ["mpirun", "-n", "2", "--oversubscribe"]  # --oversubscribe: more ranks than cores is fine here


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def pretrain_args(dataset: str, tmp_path: Path, extra=()) -> list[str]:
    return ["pretrain", "--run-dir", str(tmp_path / "run"), "--set", *TRAIN, f"data.inputs=[{dataset}]",
            f"data.cache_dir={tmp_path / 'cache'}", *extra]


def launcher_env(**extra: str) -> dict:
    """The test's environment with this checkout importable and Open MPI allowed to run as root."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # not inherited from an outer launch
        env.pop(name, None)
    return env


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=launcher_env(**env), timeout=TIMEOUT_S)


def losses(result: subprocess.CompletedProcess, run_dir: Path) -> list[float]:
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return logged_losses(run_dir)


def logged_losses(run_dir: Path) -> list[float]:
    """The losses of metrics.jsonl, which must hold steps 1, 2 and 3."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def elastic_losses(dataset, tmp_path_factory):
    """`apogee pretrain --nproc 2`: the elastic agent's run, the reference for every other launcher."""
    tmp_path = tmp_path_factory.mktemp("elastic")
    apogee = [shutil.which("apogee")] if shutil.which("apogee") else [sys.executable, "-m", "cli.main"]
    result = run(apogee + pretrain_args(dataset, tmp_path, ["--nproc", "2"]))
    rendezvous_port(result.stdout, "elastic")
    return losses(result, tmp_path / "run")


def rendezvous_port(stdout: str, launcher: str) -> int:
    """The port rank 0 reported the ranks met at."""
    match = re.search(rf"2 rank\(s\) via {launcher} meeting at [\w.\-]+:(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def assert_same_losses(got: list[float], reference: list[float]) -> None:
    assert got == pytest.approx(reference, abs=1e-6, rel=0), (got, reference)


def require(program: str, hint: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} not found: {hint}")


def slurm_is_up() -> None:
    require("srun", "run scripts/slurm-local.sh start")
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if state.returncode != 0 or not any(s.startswith(("idle", "mixed")) for s in state.stdout.split()):
        pytest.skip(f"no idle Slurm node ({(state.stdout + state.stderr).strip()}): run scripts/slurm-local.sh start")


def wait_for_job(job_id: str) -> str:
    """Poll the job's state until it ends (sbatch --wait polls at up to 30 s intervals)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"Slurm job {job_id} still running after {TIMEOUT_S} s")


@pytest.mark.distributed
def test_apogee_nproc_2_trains_under_the_elastic_agent(elastic_losses):
    assert len(elastic_losses) == 3 and elastic_losses[2] < elastic_losses[0]


@pytest.mark.distributed
def test_torchrun_ranks_match_the_elastic_losses(dataset, tmp_path, elastic_losses):
    # torch.distributed.run is the module behind the `torchrun` script, run with this interpreter.
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cli.main",
                  *pretrain_args(dataset, tmp_path)])
    rendezvous_port(result.stdout, "elastic")
    assert_same_losses(losses(result, tmp_path / "run"), elastic_losses)


@pytest.mark.distributed
def test_srun_ranks_in_an_sbatch_job_match_the_elastic_losses(dataset, tmp_path, elastic_losses):
    slurm_is_up()
    log = tmp_path / "slurm.out"
    submit = run(["sbatch", "--parsable", "--overcommit", "--ntasks=2", f"--output={log}",
                  f"--export=ALL,APOGEE_PYTHON={sys.executable}", "slurm/apogee.sbatch",
                  *pretrain_args(dataset, tmp_path)[1:]])
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    state = wait_for_job(job_id)
    output = log.read_text()
    assert state == "COMPLETED", output
    assert 10000 <= rendezvous_port(output, "slurm") < 30000  # derived from the job id, not exchanged
    assert_same_losses(logged_losses(tmp_path / "run"), elastic_losses)


@pytest.mark.distributed
def test_mpirun_ranks_meet_through_mpi4py_and_match_the_elastic_losses(dataset, tmp_path, elastic_losses):
    require("mpirun", "run scripts/slurm-local.sh start (installs openmpi-bin)")
    probe = run([sys.executable, "-c", "import mpi4py.MPI"])
    if probe.returncode != 0:
        pytest.skip(f"mpi4py not importable (pip install mpi4py, the 'mpi' extra): {probe.stderr.strip()[-200:]}")
    result = run([*MPIRUN, sys.executable, "-m", "cli.main", *pretrain_args(dataset, tmp_path)])
    # A free port that rank 0 had the kernel pick and broadcast: in the ephemeral range (by
    # default 32768-60999, above the ports derived from job ids).
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert low <= rendezvous_port(result.stdout, "mpi") <= high
    assert_same_losses(losses(result, tmp_path / "run"), elastic_losses)


@pytest.mark.distributed
def test_mpirun_ranks_meet_on_one_node_without_mpi4py(dataset, tmp_path, elastic_losses):
    require("mpirun", "run scripts/slurm-local.sh start (installs openmpi-bin)")
    # A package named mpi4py that fails to import, ahead of any installed one on the path.
    shadow = tmp_path / "no_mpi4py" / "mpi4py"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mpi4py hidden by test_launch')\n")
    result = run([*MPIRUN, sys.executable, "-m", "cli.main", *pretrain_args(dataset, tmp_path)],
                 PYTHONPATH=str(shadow.parent))
    assert 10000 <= rendezvous_port(result.stdout, "mpi") < 30000  # derived from Open MPI's job id
    assert_same_losses(losses(result, tmp_path / "run"), elastic_losses)


BAD_LAYOUT = ["--set", "parallel.tp=3"]
BAD_LAYOUT_MESSAGE = "apogee: error: parallel='tp*cp*pp=3': must divide the world size 2"


@pytest.mark.distributed
def test_srun_ranks_each_refuse_a_bad_layout_with_status_2(tmp_path):
    slurm_is_up()
    result = run(["srun", "-n", "2", "--overcommit", sys.executable, "-m", "cli.main", "pretrain",
                  "--run-dir", str(tmp_path / "run"), *BAD_LAYOUT])
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(BAD_LAYOUT_MESSAGE) == 2, result.stderr  # one per rank, no hang
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_torchrun_ranks_refuse_a_bad_layout_with_status_2(tmp_path):
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cli.main",
                  "pretrain", "--run-dir", str(tmp_path / "run"), *BAD_LAYOUT])
    # torchrun itself always exits 1 when a rank fails; it reports the rank's own status, 2. The
    # agent stops the other rank as soon as one exits, so that one may not get to print.
    assert result.returncode == 1
    assert "exitcode  : 2" in result.stderr and BAD_LAYOUT_MESSAGE in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_first_host_of_a_slurm_hostlist():
    assert first_host("vm") == "vm"
    assert first_host("gpu[003-010,12],cpu1") == "gpu003"
    assert first_host("rack[2-3]-n[07,9]") == "rack2-n07"
    assert first_host("a1,b[1-2]") == "a1"


def test_tasks_on_node_expands_slurms_compressed_counts():
    assert [tasks_on_node("2(x3),1", node) for node in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8


def test_ranks_of_one_slurm_step_derive_the_same_port_and_a_new_one_per_step_or_restart():
    step = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
    info = detect_launcher(step)
    assert (info.launcher, info.rank, info.world_size, info.local_world_size) == ("slurm", 1, 4, 2)
    assert info.master_addr == "node07" and 10000 <= info.master_port < 30000
    assert detect_launcher({**step, "SLURM_PROCID": "3", "SLURM_NODEID": "1"}).master_port == info.master_port
    assert detect_launcher({**step, "SLURM_STEP_ID": "1"}).master_port != info.master_port
    assert detect_launcher({**step, "SLURM_RESTART_COUNT": "1"}).master_port != info.master_port
    assert detect_launcher({**step, "MASTER_PORT": "29999"}).master_port == 29999
    assert derived_port("slurm", "4242", "0", "0") == info.master_port


def test_an_sbatch_script_itself_is_not_a_rank_of_its_job():
    # The batch step has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step task count: running
    # `apogee pretrain --nproc 2` there must launch locally, not wait for a second rank.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_LOCALID": "0"}
    assert detect_launcher(batch).launcher == "none"


def test_mpirun_inside_an_sbatch_script_uses_the_mpi_ranks():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "OMPI_COMM_WORLD_RANK": "1",
           "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}
    info = detect_launcher(env)
    assert (info.launcher, info.rank, info.world_size, info.master_port) == ("mpi", 1, 2, 29400)


def test_a_slurm_rank_given_gpus_that_sees_none_refuses_to_train_on_cpu():
    from engine.job.launch import LaunchError, check_gpus_visible

    step = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "9", "SLURM_STEP_GPUS": "0,1",
            "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "1"}
    info = detect_launcher(step)
    with pytest.raises(LaunchError, match=r"rank 1: Slurm gave this task GPUs \(SLURM_STEP_GPUS=0,1, SLURM_GPUS_ON_NODE=2, "
                                          r"CUDA_VISIBLE_DEVICES=1\) but PyTorch sees none .* refusing to train on CPU"):
        check_gpus_visible(info, cuda_available=False, env=step)
    check_gpus_visible(info, cuda_available=True, env=step)  # it sees them: NCCL on its GPU
    cpu_job = {k: v for k, v in step.items() if "GPU" not in k and k != "CUDA_VISIBLE_DEVICES"}
    check_gpus_visible(detect_launcher(cpu_job), cuda_available=False, env={**cpu_job, "SLURM_GPUS_ON_NODE": "0"})
