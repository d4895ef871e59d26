"""Performance model and planner: formulas by hand, physical trends, published tables, `apogee plan`.

Calibration rows come from shared/reference/perf-calibration.md (Narayanan et al. 2021 Table 1,
Llama 3 Table 4). The model is checked to within CALIBRATION_TOLERANCE of each published figure;
the table of predicted vs published values is printed in the test output.
"""
import json
import subprocess
import sys

import pytest

from cli.main import main as apogee_main
from engine.config import ModelConfig, load_config
from engine.config_validation import validate
from engine.train.metrics import flops_per_step
from engine.perf.perf_model import (Assumptions, Layout, PerfModelError, activation_bytes_per_layer, cp_ring_bytes,
                               dp_traffic_elements, ep_all_to_all_bytes, estimate_step, in_flight_microbatches,
                               make_cluster, model_state_bytes, pipeline_bubble_fraction, tp_comm_bytes)
from engine.perf.plan import PlanError, plan

CALIBRATION_TOLERANCE = 0.25
"""Largest relative error of predicted vs published MFU accepted for a calibration row."""

H100, A100 = make_cluster("H100"), make_cluster("A100")


def _llama8b():
    return load_config("configs/llama3-8b.yaml")


# ---------------------------------------------------------------------------------------------
# Formulas reproduced by hand


def test_bubble_is_p_minus_1_over_m_and_interleaving_divides_it_by_v():
    assert pipeline_bubble_fraction(pp=4, microbatches=8) == 3 / 8
    assert pipeline_bubble_fraction(pp=4, microbatches=8, virtual_stages=2) == 3 / 16
    assert pipeline_bubble_fraction(pp=1, microbatches=8) == 0.0


def test_zero_memory_reproduces_the_papers_7_5b_example():
    """Rajbhandari et al. Figure 1: Psi = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.88 GB."""
    psi, n_d = 7.5e9, 64
    totals = [sum(model_state_bytes(psi, n_d, zero, grad_bytes=2).values()) for zero in (0, 1, 2, 3)]
    assert totals == pytest.approx([16 * psi, 4 * psi + 12 * psi / n_d, 2 * psi + 14 * psi / n_d, 16 * psi / n_d])
    assert [round(t / 1e9, 2) for t in totals] == [120.0, 31.41, 16.64, 1.88]


def test_dp_traffic_is_2_psi_for_stages_0_to_2_and_3_psi_for_stage_3_at_one_microbatch():
    moved = [sum(dp_traffic_elements(100.0, zero).values()) for zero in (0, 1, 2, 3)]
    assert moved == [200.0, 200.0, 200.0, 300.0]
    # The engine's stages 2 and 3 reduce every microbatch (parallel/zero.py, zero3.py): (m+1) Psi, 3 m Psi.
    assert sum(dp_traffic_elements(100.0, 2, microbatches=4).values()) == 500.0
    assert sum(dp_traffic_elements(100.0, 3, microbatches=4).values()) == 1200.0


def test_tp_traffic_is_8bsh_times_t_minus_1_over_t_per_layer():
    assert tp_comm_bytes(b=1, s=2048, h=4096, tp=4) == 8 * 2048 * 4096 * 3 / 4 * 2  # bf16 bytes
    assert tp_comm_bytes(b=2, s=1024, h=1024, tp=2, recompute="full") == 12 * 2 * 1024 * 1024 / 2 * 2
    assert tp_comm_bytes(b=1, s=2048, h=4096, tp=1) == 0.0


def test_activation_bytes_follow_korthikanti():
    s, b, h, a = 2048, 1, 1024, 16
    sbh = s * b * h
    scores = 5 * a * s / h  # = 160
    assert activation_bytes_per_layer(s, b, h, a, 1, False, "none", flash_attention=False) == sbh * (34 + scores)
    assert activation_bytes_per_layer(s, b, h, a, 4, False, "none", flash_attention=False) == sbh * (10 + 6 + 40)
    assert activation_bytes_per_layer(s, b, h, a, 4, True, "none", flash_attention=False) == sbh / 4 * (34 + 160)
    assert activation_bytes_per_layer(s, b, h, a, 4, True, "selective", flash_attention=False) == 34 * sbh / 4
    assert activation_bytes_per_layer(s, b, h, a, 4, False, "full", flash_attention=False) == 2 * sbh
    # Flash attention never stores the a*s^2*b scores.
    assert activation_bytes_per_layer(s, b, h, a, 4, False, "none") == sbh * 16
    assert activation_bytes_per_layer(s, b, h, a, 4, True, "none") == 34 * sbh / 4


def test_first_stage_holds_p_microbatches_and_korthikantis_factor_when_interleaved():
    assert in_flight_microbatches(pp=4, microbatches=8) == 4
    assert in_flight_microbatches(pp=4, microbatches=2) == 2
    assert in_flight_microbatches(pp=4, microbatches=8, virtual_stages=2) == 4 * (1 + 3 / 32)


def test_cp_ring_and_ep_all_to_all_bytes_by_hand():
    # cp=4: K and V (b*s_local*kv_width each) travel 3 hops forward, and 2x that backward, in bf16.
    assert cp_ring_bytes(b=1, s_local=1024, kv_width=128, cp=4) == 3 * 3 * 2 * 1024 * 128 * 2
    # ep=4: 4 all-to-alls of tokens*topk*h, 3/4 of it leaving the device, bf16.
    assert ep_all_to_all_bytes(tokens=1024, topk=2, h=512, ep=4) == 4 * 1024 * 2 * 512 * 3 / 4 * 2


def test_groups_inside_a_node_use_nvlink_and_larger_ones_the_network():
    assert H100.bandwidth(8) == pytest.approx(0.8 * 450e9)
    assert H100.bandwidth(16) == pytest.approx(0.8 * 50e9)


def test_unknown_gpu_is_named_with_the_valid_types():
    with pytest.raises(PerfModelError, match=r"gpu='V100': unknown GPU type; valid: A100, H100, H200, B200"):
        make_cluster("V100")


# ---------------------------------------------------------------------------------------------
# A step: costs add up, trends are physical


def _llama8b_layout(**changes) -> Layout:
    base = dict(tp=2, pp=4, dp=8, micro_batch_size=1, global_batch_size=256, zero=1, sequence_parallel=True)
    return Layout(**{**base, **changes})


def test_costs_add_up_to_the_step_and_mfu_counts_model_flops_from_metrics():
    model = _llama8b().model
    estimate = estimate_step(model, _llama8b_layout(recompute="full"), H100)
    assert sum(estimate.times.values()) == pytest.approx(estimate.step_time)
    model_flops = flops_per_step(model, 256)
    assert estimate.mfu == pytest.approx(model_flops / (estimate.step_time * 64 * 989e12))
    assert estimate.tokens_per_s == pytest.approx(256 * 8192 / estimate.step_time)
    assert estimate.times["recompute"] > 0 and estimate.times["pp_bubble"] > 0 and estimate.times["tp_comm"] > 0


def test_more_microbatches_shrink_the_bubble_share_of_the_step():
    shares = []
    for batch in (32, 64, 128, 256):
        estimate = estimate_step(_llama8b().model, _llama8b_layout(global_batch_size=batch), H100)
        shares.append(estimate.times["pp_bubble"] / estimate.step_time)
    assert shares == sorted(shares, reverse=True) and shares[-1] < shares[0] / 4


def test_zero3_holds_less_than_zero1_which_holds_less_than_plain_dp():
    memory = [estimate_step(_llama8b().model, _llama8b_layout(zero=zero), H100).memory.total for zero in (0, 1, 3)]
    assert memory[0] > memory[1] > memory[2]


def test_full_recompute_costs_time_and_saves_activation_memory():
    model = _llama8b().model
    plain, full = (estimate_step(model, _llama8b_layout(recompute=mode), H100) for mode in ("none", "full"))
    assert full.step_time > plain.step_time
    assert full.times["compute"] + full.times["recompute"] > plain.times["compute"]
    assert full.memory.activations < plain.memory.activations / 4
    assert full.mfu < plain.mfu  # recomputation is not model FLOPs


def test_a_batch_that_does_not_split_into_microbatches_is_refused_by_name():
    with pytest.raises(PerfModelError, match=r"global_batch_size=100: must be a multiple of micro_batch_size\*dp = 1\*8"):
        estimate_step(_llama8b().model, _llama8b_layout(global_batch_size=100), H100)


def test_tensor_parallelism_across_nodes_is_slower_than_inside_one():
    inside = estimate_step(_llama8b().model, _llama8b_layout(), make_cluster("H100", gpus_per_node=8))
    across = estimate_step(_llama8b().model, _llama8b_layout(), make_cluster("H100", gpus_per_node=1))
    assert across.times["tp_comm"] == pytest.approx(inside.times["tp_comm"] * 450 / 50)


# ---------------------------------------------------------------------------------------------
# Calibration against published tables

NARAYANAN_TABLE_1 = [  # params (B), heads, hidden, layers, tp, pp, GPUs, batch, TFLOP/s per GPU
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
LLAMA3_TABLE_4 = [  # GPUs, tp, cp, pp, dp, seq, batch per DP rank, MFU %
    (8192, 8, 1, 16, 64, 8192, 32, 43), (16384, 8, 1, 16, 128, 8192, 16, 41),
    (16384, 8, 16, 16, 8, 131072, 16, 38),
]


def _fastest(cfg: ModelConfig, layouts, cluster, assume=Assumptions(), need_fit=True):
    """The paper leaves micro-batch size and virtual stages out; take the fastest the model predicts."""
    estimates = [estimate_step(cfg, lay, cluster, assume) for lay in layouts]
    return min((e for e in estimates if e.fits or not need_fit), key=lambda e: e.step_time)


def _narayanan_row(heads, h, layers, tp, pp, gpus, batch):
    """GPT (2021 Megatron: no flash attention, full recompute, fp16 params): MHA, a 4h GeLU MLP
    (the FLOPs and weights of a SwiGLU MLP of width 8h/3), V = 51200, s = 2048, A100 80 GB."""
    cfg = ModelConfig(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads, ffn_hidden_size=8 * h / 3,
                      vocab_size=51200, seq_length=2048)
    dp = gpus // (tp * pp)
    layouts = [Layout(tp=tp, pp=pp, dp=dp, virtual_stages=v, micro_batch_size=b, global_batch_size=batch,
                      recompute="full")
               for b in (1, 2, 4, 8, 16) if batch % (b * dp) == 0
               for v in range(1, 9) if (v == 1 or (pp > 1 and (batch // (b * dp)) % pp == 0)) and layers >= pp * v]
    return _fastest(cfg, layouts, A100, Assumptions(flash_attention=False))


def _paper_flops(batch, s, layers, h, vocab, recompute):
    """Narayanan et al.'s FLOPs per iteration: 72 (96 with recompute) * B*s*l*h^2 * (1 + s/6h + V/(12|16)lh)."""
    lead, div = (96, 16) if recompute else (72, 12)
    return lead * batch * s * layers * h**2 * (1 + s / (6 * h) + vocab / (div * layers * h))


def test_calibration_against_narayanan_table_1_and_llama3_table_4(capsys):
    lines = [f"{'row':<38} {'published':>9} {'predicted':>9} {'ratio':>6}  layout chosen / memory / dominant"]
    ratios = []
    for params, heads, h, layers, tp, pp, gpus, batch, tflops in NARAYANAN_TABLE_1:
        estimate = _narayanan_row(heads, h, layers, tp, pp, gpus, batch)
        # Same FLOP accounting on both sides: the paper's formula without recompute over the step time.
        model_flops = _paper_flops(batch, 2048, layers, h, 51200, recompute=False)
        published = tflops * 1e12 * model_flops / _paper_flops(batch, 2048, layers, h, 51200, recompute=True) / 312e12
        predicted = model_flops / estimate.step_time / gpus / 312e12
        ratios.append(predicted / published)
        lay = estimate.layout
        lines.append(f"{f'Narayanan {params:.1f}B tp{tp} pp{pp} {gpus} A100':<38} {100 * published:>8.1f}% "
                     f"{100 * predicted:>8.1f}% {predicted / published:>6.2f}  mbs={lay.micro_batch_size} "
                     f"v={lay.virtual_stages} {estimate.memory.total / 1e9:.0f} GB {estimate.dominant}")
    llama = load_config("configs/llama3-405b.yaml")
    for gpus, tp, cp, pp, dp, seq, per_dp, mfu in LLAMA3_TABLE_4:
        cfg = load_config("configs/llama3-405b.yaml", [f"model.seq_length={seq}"]).model
        # Llama 3's FSDP without resharding after forward gathers parameters and reduce-scatters
        # gradients once per step: ZeRO-1's 2 Psi traffic. Interleaving with uneven chunks (126 layers).
        layouts = [Layout(tp=tp, cp=cp, pp=pp, dp=dp, virtual_stages=v, global_batch_size=per_dp * dp, zero=1,
                          sequence_parallel=True) for v in range(1, 8)]
        estimate = _fastest(cfg, layouts, H100, need_fit=False)
        assert estimate.layout.world == gpus and llama.model.num_layers == 126
        ratios.append(estimate.mfu / (mfu / 100))
        lines.append(f"{f'Llama 3 405B tp{tp} cp{cp} pp{pp} dp{dp} s={seq}':<38} {mfu:>8.1f}% {100 * estimate.mfu:>8.1f}% "
                     f"{ratios[-1]:>6.2f}  v={estimate.layout.virtual_stages} {estimate.memory.total / 1e9:.0f} GB "
                     f"(fits: {estimate.fits}) {estimate.dominant}")
    with capsys.disabled():
        print("\nMFU, predicted vs published (model FLOPs, no recomputation):\n" + "\n".join(lines))
    assert all(abs(r - 1) <= CALIBRATION_TOLERANCE for r in ratios), ratios


# ---------------------------------------------------------------------------------------------
# Planner and CLI


@pytest.fixture(scope="module")
def llama8b_plan():
    return plan(_llama8b(), 64, H100, top=10)


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
    # The config's own layout (tp=1, dp=64, ZeRO-1, selective) is no faster than the planner's pick.
    own = estimate_step(_llama8b().model, Layout(dp=64, global_batch_size=512, zero=1, recompute="selective"), H100)
    assert best[0].step_time <= own.step_time


def test_planner_refuses_a_world_that_is_not_whole_nodes():
    with pytest.raises(PlanError, match=r"--gpus=12: must be a multiple of --gpus-per-node=8"):
        plan(_llama8b(), 12, H100)


def _run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "cli.main", "plan", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_apogee_plan_prints_a_table_and_refuses_an_unknown_gpu():
    table = _run_cli("--config", "configs/llama3-8b.yaml", "--gpus", "64", "--gpu", "H100", "--top", "3")
    unknown = _run_cli("--config", "configs/llama3-8b.yaml", "--gpus", "64", "--gpu", "V100")
    out, err = table.communicate(timeout=120)
    assert table.returncode == 0, err
    lines = out.splitlines()
    assert "llama3-8b on 64 x H100" in lines[0] and "fit in 80 GB" in lines[0]
    assert lines[1].split()[:4] == ["rank", "tp", "cp", "pp"] and "dominant" in lines[1]
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
])
def test_apogee_plan_bad_input_names_the_option_and_exits_2(args, message, capsys):
    assert apogee_main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apogee plan: ") and message in err


def test_apogee_plan_json_lists_layouts_with_mfu_memory_and_dominant_cost(capsys):
    assert apogee_main(["plan", "--config", "configs/llama3-8b.yaml", "--gpus", "16", "--top", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpus"] == 16 and doc["gpu"] == "H100" and len(doc["layouts"]) == 2
    first = doc["layouts"][0]
    assert first["tp"] * first["cp"] * first["pp"] * first["dp"] == 16
    assert 0 < first["mfu"] < 1 and first["memory_bytes"]["total"] <= 80e9 and first["dominant"] in first["times_s"]
    assert sum(first["times_s"].values()) == pytest.approx(first["step_time_s"])
