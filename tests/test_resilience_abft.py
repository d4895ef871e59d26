"""ABFT checksums over the forward GEMMs: the tolerance against measured clean GEMMs (fp32 and
bf16, printed), the `gemm_error` fault's forms, and dp2 rehearsals under real gloo processes: a
one-off error of 1e-3 x the output's largest magnitude on one rank is confirmed at the step it
strikes, naming that rank and the layer, and the run rewinds and finishes; a persistent one is
named on every redo until the rewind budget stops the run (exit 17)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.words_corpus import make_dataset
from engine.config import ConfigError
from engine.resilience.abft import checksum_ratio
from engine.resilience.faults import parse_faults

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train.steps=10", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "checkpoint.interval=2", "logging.tensorboard=false",
         "resilience.max_restarts=0", "resilience.abft_interval=1", "resilience.straggler_factor=0"]


def _gemm(m, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    return x, w, torch.nn.functional.linear(x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clean_gemms_pass_and_a_1e_3_error_fails_in_fp32(dtype):
    clean, hit = [], []
    for seed, (m, k, n) in enumerate([(64, 64, 64), (256, 256, 688), (1024, 512, 512)]):
        x, w, y = _gemm(m, k, n, dtype, seed)
        clean.append(float(checksum_ratio(x, w, None, y)))
        y[3, 5] += 1e-3 * y.abs().max()
        hit.append(float(checksum_ratio(x, w, None, y)))
    print(f"{dtype}: clean GEMMs reach {max(clean):.3f} x the tolerance; a 1e-3 error {min(hit):.3f} x")
    assert max(clean) < 1.0
    if dtype == torch.float32:
        assert min(hit) > 1.0
    else:  # below bf16's own rounding: out of any checksum's reach, as the module says
        assert min(hit) < 1.0


def test_the_gemm_error_forms_parse_and_bad_values_are_refused():
    one, always = parse_faults(["gemm_error:rank=1:step=6:rel=1e-3", "gemm_error:rank=0:step=4:rel=0.01:layer=3:persistent=1"],
                               world_size=2)
    assert (one.kind, one.rank, one.step, one.rel, one.layer, one.persistent) == ("gemm_error", 1, 6, 1e-3, None, 0)
    assert (always.layer, always.persistent) == (3, 1)
    for bad, problem in [("gemm_error:rank=0:step=2:rel=0", "rel=0: expected a relative error"),
                         ("gemm_error:rank=0:step=2:rel=1e-3:persistent=2", "persistent=2: expected 0 or 1"),
                         ("gemm_error:rank=0:step=2", "gemm_error needs rel")]:
        with pytest.raises(ConfigError, match=problem):
            parse_faults([bad], world_size=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def pretrain(dataset, run_dir: Path, *settings: str, status: int = 0) -> list[dict]:
    apogee = [shutil.which("apogee")] if shutil.which("apogee") else [sys.executable, "-m", "cli.main"]
    cmd = apogee + ["pretrain", "--nproc", "2", "--run-dir", str(run_dir), "--set", *TRAIN,
                    f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}", *settings]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert result.returncode == status, f"exit status {result.returncode}\n{result.stderr[-4000:]}"
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_a_gemm_error_is_confirmed_on_its_rank_and_layer_and_a_persistent_one_stops_the_run(dataset, tmp_path):
    events = pretrain(dataset, tmp_path / "once" / "run", "resilience.inject=[gemm_error:rank=1:step=6:rel=1e-3]")
    (fired,) = [e for e in events if e["type"] == "fault_injected"]
    confirmed = [e for e in events if e["type"] == "sdc_confirmed"]
    assert [(e["faulty_rank"], e["layer"], e["step"], e["detector"]) for e in confirmed] == \
        [(1, fired["layer"], 6, "abft")]  # at the step it struck: nothing before it, nothing after the redo
    (rewind,) = [e for e in events if e["type"] == "rewind"]
    assert rewind["from_step"] == 6 and rewind["step"] <= 5

    events = pretrain(dataset, tmp_path / "always" / "run",
                      "resilience.inject=[gemm_error:rank=0:step=4:rel=1e-3:layer=5:persistent=1]", status=17)
    confirmed = [e for e in events if e["type"] == "sdc_confirmed"]
    assert len(confirmed) >= 2 and {(e["faulty_rank"], e["step"]) for e in confirmed} == {(0, 4)}
    assert len({e["layer"] for e in confirmed}) == 1
    assert "ABFT checksum failed on rank(s) [0]" in [e for e in events if e["type"] == "stopped"][0]["reason"]
    # A node confirmed faulty twice is recorded for exclusion; the one-off strike is not enough.
    from engine.resilience.faulty_nodes import confirmations, excluded_nodes, this_node

    assert confirmations(tmp_path / "once" / "run") == {this_node(): 1}
    assert excluded_nodes(tmp_path / "once" / "run") == []
    assert excluded_nodes(tmp_path / "always" / "run") == [this_node()]
    # ... and the next submission of the run excludes it (the batch job's dry run shows it).
    done = subprocess.run([sys.executable, "-m", "cli.main", "submit", "--cpu", "--ntasks-per-node", "2",
                           "--run-dir", str(tmp_path / "always" / "run"), "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"--exclude={this_node()}" in done.stdout
