"""`apogee plan` and the planner: layouts ranked by the corrected model, the presets' fit on the engine's
memory as built, fixed layout fields (--layout), model and batch overrides (--set), the model's
software assumptions (--assume), the JSON document, and bad input (exit 2 naming the option)."""
import json
import subprocess
import sys

import pytest

from cli.main import main as apogee_main
from engine.config import load_config
from engine.config_validation import validate
from engine.perf.perf_model import Layout, estimate_step, make_cluster
from engine.perf.plan import PlanError, parse_layout, plan, world_of

H100 = make_cluster("H100")


@pytest.fixture(scope="module")
def llama8b_plan():
    return plan(load_config("configs/llama3-8b.yaml"), 64, H100, top=10)


def test_planner_for_llama3_8b_on_64_h100_ranks_fitting_valid_layouts_by_step_time(llama8b_plan):
    best, counts = llama8b_plan
    assert len(best) == 10 and counts["valid"] > counts["fit"] > 100
    assert all(e.fits and e.memory.total <= 80e9 and e.layout.world == 64 for e in best)
    times = [e.step_time for e in best]
    assert times == sorted(times)
    for estimate in best:  # every proposal is a layout the engine accepts
        lay = estimate.layout
        validate(load_config("configs/llama3-8b.yaml", [
            f"parallel.tp={lay.tp}", f"parallel.cp={lay.cp}", f"parallel.pp={lay.pp}", f"parallel.dp={lay.dp}",
            f"parallel.virtual_stages={lay.virtual_stages}", f"parallel.zero={lay.zero}",
            f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()}", f"model.recompute={lay.recompute}",
            f"train.micro_batch_size={lay.micro_batch_size}"]), 64)
    own = estimate_step(load_config("configs/llama3-8b.yaml").model,
                        Layout(dp=64, global_batch_size=512, zero=1, recompute="selective"), H100)
    assert best[0].step_time <= own.step_time


@pytest.mark.parametrize("config, gpus, layout", [
    ("configs/llama3-8b.yaml", 8, ""), ("configs/llama3-70b.yaml", 64, "tp=8"),
    ("configs/llama3-405b.yaml", 8192, "tp=8,pp=16,dp=64"), ("configs/llama3-405b.yaml", 16384, "tp=8,pp=16,dp=128"),
])
def test_the_presets_have_fitting_layouts_on_the_engines_memory(config, gpus, layout):
    cfg = load_config(config)
    best, counts = plan(cfg, gpus, H100, top=3, fixed=parse_layout(layout))
    assert counts["fit"] >= 1 and best[0].fits and best[0].memory.total <= 80e9
    print(f"\n{cfg.name} on {gpus} H100 ({layout or 'free'}): {counts['fit']} of {counts['valid']} fit; best "
          f"{best[0].layout.recompute} recompute, zero={best[0].layout.zero}, {best[0].memory.total / 1e9:.1f} GB, "
          f"MFU {100 * best[0].mfu:.1f}%")


def test_a_fixed_layout_keeps_its_fields_and_lists_what_does_not_fit_after_what_does():
    cfg = load_config("configs/llama3-405b.yaml")
    fixed = parse_layout("tp=8,pp=16,dp=64,vp=2")
    best, counts = plan(cfg, world_of(fixed, None), H100, top=1000, fixed=fixed)
    assert len(best) == counts["valid"] > counts["fit"] >= 1
    assert all((e.layout.tp, e.layout.pp, e.layout.dp, e.layout.virtual_stages) == (8, 16, 64, 2) for e in best)
    fits = [e.fits for e in best]
    assert fits == sorted(fits, reverse=True)  # every fitting layout first
    for group in (best[:counts["fit"]], best[counts["fit"]:]):
        assert [e.step_time for e in group] == sorted(e.step_time for e in group)


def test_layout_and_world_parsing_name_the_bad_part():
    assert parse_layout("tp=8,pp=16,recompute=full,sp=false,zero=0") == {
        "tp": 8, "pp": 16, "recompute": "full", "sequence_parallel": False, "zero": 0}
    assert world_of({"tp": 8, "pp": 16, "dp": 64}, None) == 8192
    with pytest.raises(PlanError, match=r"--layout 'tq=8': expected KEY=VALUE with KEY one of tp, pp, cp"):
        parse_layout("tq=8")
    with pytest.raises(PlanError, match=r"--layout: tp\*cp\*pp\*dp = 8192 does not equal --gpus=64"):
        world_of({"tp": 8, "cp": 1, "pp": 16, "dp": 64}, 64)


def _run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "cli.main", "plan", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_apogee_plan_prints_a_table_with_margins_and_refuses_an_unknown_gpu():
    table = _run_cli("--config", "configs/llama3-8b.yaml", "--gpus", "8", "--layout", "tp=2,pp=1", "--top", "3")
    unknown = _run_cli("--config", "configs/llama3-8b.yaml", "--gpus", "64", "--gpu", "V100")
    out, err = table.communicate(timeout=300)
    assert table.returncode == 0, err
    lines = out.splitlines()
    assert "llama3-8b on 8 x H100" in lines[0] and "fit in 80 GB" in lines[0] and "fixed tp=2,pp=1" in lines[0]
    assert lines[1].split()[:4] == ["rank", "tp", "cp", "pp"] and "margin" in lines[1] and "dominant" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3"]
    out, err = unknown.communicate(timeout=120)
    assert unknown.returncode == 2 and "Traceback" not in err
    assert "apogee plan: --gpu=V100: unknown GPU type; valid: A100, H100, H200, B200" in err


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/llama3-8b.yaml", "--gpus", "12"], "--gpus=12: must be a multiple of --gpus-per-node=8"),
    (["--config", "configs/llama3-405b.yaml", "--gpus", "8"], "--gpus=8: no valid layout of llama3-405b fits in H100 memory (80 GB)"),
    (["--config", "configs/tiny.yaml", "--gpus", "3"], "--gpus=3: no valid layout of tiny on 3 GPUs; e.g. dp=3: train.global_batch_size=16"),
    (["--config", "configs/llama3-8b.yaml", "--gpus", "8", "--set", "model.hidden_sise=1"], "unknown config key 'model.hidden_sise'"),
    (["--config", "configs/llama3-8b.yaml", "--gpus", "8", "--top", "0"], "--top=0: must be >= 1"),
    (["--config", "configs/llama3-8b.yaml"], "--gpus: required unless --layout gives the layout"),
    (["--config", "configs/llama3-8b.yaml", "--layout", "zero=5"], "--layout zero='5': expected 0, 1, 2 or 3"),
    (["--config", "configs/llama3-8b.yaml", "--layout", "tp=8", "--gpus", "64", "--assume", "flash=false"],
     "--assume 'flash=false': expected KEY=VALUE with KEY one of stack, flash_attention"),
    (["--config", "configs/llama3-8b.yaml", "--layout", "tp=8", "--assume", "tp_overlap=2"],
     "--assume tp_overlap=2.0: expected a fraction in [0, 1]"),
    (["--config", "configs/llama3-8b.yaml", "--layout", "tp=8", "--assume", "fused_elementwise=maybe"],
     "--assume fused_elementwise='maybe': expected true or false"),
    (["--config", "configs/llama3-8b.yaml", "--layout", "tp=3"], "--layout: no valid layout of llama3-8b on 3 GPUs"),
    (["--config", "configs/llama3-8b.yaml", "--layout", "tp=8", "--assume", "stack=deepspeed"],
     "--assume stack='deepspeed': expected one of engine, megatron-2021, megatron, llama3, torchtitan"),
])
def test_apogee_plan_bad_input_names_the_option_and_exits_2(args, message, capsys):
    assert apogee_main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apogee plan: ") and message in err


def test_json_keeps_its_shape_adds_fits_and_takes_set_and_assume(capsys):
    base = ["plan", "--config", "configs/llama3-405b.yaml", "--layout", "tp=8,pp=8,dp=64,vp=2,zero=1",
            "--top", "50", "--json", "--set", "model.hidden_size=12288", "model.num_heads=96",
            "train.global_batch_size=1536"]
    assert apogee_main(base) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpus"] == 4096 and doc["gpu"] == "H100" and doc["layouts"]
    first = doc["layouts"][0]
    assert {"tp", "cp", "pp", "dp", "ep", "virtual_stages", "micro_batch_size", "global_batch_size", "zero",
            "recompute", "sequence_parallel", "step_time_s", "tokens_per_s", "mfu", "memory_bytes", "times_s",
            "dominant", "fits"} <= set(first)
    assert first["global_batch_size"] == 1536 and (first["tp"], first["pp"], first["dp"]) == (8, 8, 64)
    assert sum(first["times_s"].values()) == pytest.approx(first["step_time_s"])
    assert [row["fits"] for row in doc["layouts"]] == sorted((row["fits"] for row in doc["layouts"]), reverse=True)
    assert apogee_main([*base, "--assume", "flash_attention=false", "fused_elementwise=true"]) == 0
    unfused = json.loads(capsys.readouterr().out)["layouts"]
    by_key = {(r["recompute"], r["micro_batch_size"]): r["step_time_s"] for r in doc["layouts"]}
    assert any(r["step_time_s"] != by_key[(r["recompute"], r["micro_batch_size"])] for r in unfused)
