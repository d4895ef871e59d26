"""Performance model: formulas by hand, physical trends (scale effects included), the published
tables with their fit and held-out errors (engine/perf/calibration.py), and the engine as built.

The calibration table (predicted vs published MFU) is printed in the test output.
"""
import dataclasses
import math

import pytest

from engine.config import ModelConfig, load_config
from engine.perf.calibration import all_rows, predict, report, torchtitan_row
from engine.perf.comm import collective_seconds, place
from engine.perf.memory import held_chunk_forwards
from engine.perf.perf_model import (Assumptions, Layout, PerfModelError, activation_bytes_per_layer, cp_ring_bytes,
                                    dp_traffic_elements, ep_all_to_all_bytes, estimate_step, in_flight_microbatches,
                                    make_cluster, model_state_bytes, pipeline_bubble_fraction, tp_comm_bytes)
from engine.train.metrics import flops_per_step
from parallel.pipeline import max_in_flight, schedule_order

FIT_MAE, HOLDOUT_MAE, WORST = 2.0, 3.0, 6.0
"""MFU points: the issue's aim is a mean absolute error of at most 3 on runs the project has not seen."""

H100, A100 = make_cluster("H100"), make_cluster("A100")


def _llama8b():
    return load_config("configs/llama3-8b.yaml")


# ---------------------------------------------------------------------------------------------
# Formulas reproduced by hand


def test_bubble_is_p_minus_1_over_m_and_interleaving_divides_it_by_v():
    assert pipeline_bubble_fraction(pp=4, microbatches=8) == 3 / 8
    assert pipeline_bubble_fraction(pp=4, microbatches=8, virtual_stages=2) == 3 / 16
    assert pipeline_bubble_fraction(pp=1, microbatches=8) == 0.0


def test_zero_memory_reproduces_the_papers_7_5b_example_and_the_engine_keeps_fp32_grads():
    """Rajbhandari et al. Figure 1: Psi = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.88 GB."""
    psi, n_d = 7.5e9, 64
    totals = [sum(model_state_bytes(psi, n_d, zero, grad_bytes=2).values()) for zero in (0, 1, 2, 3)]
    assert [round(t / 1e9, 2) for t in totals] == [120.0, 31.41, 16.64, 1.88]
    engine = model_state_bytes(psi, n_d, 1)  # bf16 weights, fp32 main grads, sharded fp32 Adam
    assert engine == {"params": 2 * psi, "grads": 4 * psi, "optimizer": 12 * psi / n_d}


def test_dp_traffic_is_2_psi_for_stages_0_to_2_and_3_psi_for_stage_3_at_one_microbatch():
    moved = [sum(dp_traffic_elements(100.0, zero).values()) for zero in (0, 1, 2, 3)]
    assert moved == [200.0, 200.0, 200.0, 300.0]
    assert sum(dp_traffic_elements(100.0, 2, microbatches=4).values()) == 500.0
    assert sum(dp_traffic_elements(100.0, 3, microbatches=4).values()) == 1200.0


def test_tp_cp_and_ep_traffic_by_hand():
    assert tp_comm_bytes(b=1, s=2048, h=4096, tp=4) == 8 * 2048 * 4096 * 3 / 4 * 2
    assert tp_comm_bytes(b=2, s=1024, h=1024, tp=2, recompute="full") == 12 * 2 * 1024 * 1024 / 2 * 2
    # cp=4: K and V (B_kv each) 3 hops forward and again backward, plus the fp32 dK/dV (2 B_kv each).
    b_kv = 1024 * 128 * 2
    assert cp_ring_bytes(b=1, s_local=1024, kv_width=128, cp=4) == 3 * 2 * b_kv * (1 + 1 + 2)
    assert ep_all_to_all_bytes(tokens=1024, topk=2, h=512, ep=4) == 4 * 1024 * 2 * 512 * 3 / 4 * 2


def test_korthikanti_formulas_kept_for_comparison():
    s, b, h, a = 2048, 1, 1024, 16
    sbh = s * b * h
    assert activation_bytes_per_layer(s, b, h, a, 1, False, "none", flash_attention=False) == sbh * (34 + 160)
    assert activation_bytes_per_layer(s, b, h, a, 4, True, "selective", flash_attention=False) == 34 * sbh / 4
    assert activation_bytes_per_layer(s, b, h, a, 4, False, "full") == 2 * sbh


def test_held_microbatches_are_the_engine_schedules_in_flight_count():
    for pp, v, m in [(4, 1, 8), (4, 1, 2), (4, 2, 8), (8, 3, 16), (2, 4, 2)]:
        for stage in range(pp):
            assert held_chunk_forwards(pp, stage, m, v) == max_in_flight(schedule_order(pp, stage, m, v))
    assert in_flight_microbatches(pp=4, microbatches=8) == 4
    assert in_flight_microbatches(pp=4, microbatches=8, virtual_stages=2) == (2 * 3 + 4 + 1) / 2


def test_a_ring_collective_is_alpha_beta_with_ncclS_step_latencies():
    c = H100
    inside = place(8, 1, 8)
    size = 1e9
    assert collective_seconds("reduce_scatter", size, inside, c) == pytest.approx(
        c.collective_launch_s + 7 * c.nvlink_latency_s + 7 / 8 * size / (0.8 * 450e9))
    across = place(64, 8, 8)  # tp=8: one member of each DP group per node, 64 nodes
    assert (across.per_node, across.nodes) == (1, 64)
    latency = c.collective_launch_s + 63 * c.network_latency_s
    bandwidth = 0.8 * 50e9 * c.tier(64)
    assert collective_seconds("reduce_scatter", size, across, c) == pytest.approx(latency + 63 / 64 * size / bandwidth)
    # A group with 8 members per node uses 8 NICs at once: min(NVLink, 8 x NIC).
    assert collective_seconds("all_gather", size, place(64, 1, 8), c) < collective_seconds("all_gather", size, across, c)


def test_fabric_tiers_and_latency_make_the_same_collective_slower_over_more_nodes():
    times = [collective_seconds("reduce_scatter", 25 * 2**20, place(n, 8, 8), H100) for n in (8, 32, 128, 1024)]
    assert times == sorted(times) and times[-1] > 5 * times[0]
    assert H100.tier(16) == 1.0 > H100.tier(64) > H100.tier(8192)


def test_unknown_gpu_is_named_with_the_valid_types():
    with pytest.raises(PerfModelError, match=r"gpu='V100': unknown GPU type; valid: A100, H100, H200, B200"):
        make_cluster("V100")


# ---------------------------------------------------------------------------------------------
# A step: costs add up, trends are physical, overlap only where the engine overlaps


def _llama8b_layout(**changes) -> Layout:
    base = dict(tp=2, pp=4, dp=8, micro_batch_size=1, global_batch_size=256, zero=1, sequence_parallel=True)
    return Layout(**{**base, **changes})


def test_costs_add_up_to_the_step_and_mfu_counts_model_flops_from_metrics():
    model = _llama8b().model
    estimate = estimate_step(model, _llama8b_layout(recompute="full"), H100)
    assert sum(estimate.times.values()) == pytest.approx(estimate.step_time)
    assert estimate.mfu == pytest.approx(flops_per_step(model, 256) / (estimate.step_time * 64 * 989e12))
    assert estimate.tokens_per_s == pytest.approx(256 * 8192 / estimate.step_time)
    assert all(estimate.times[k] > 0 for k in ("recompute", "pp_bubble", "tp_comm", "dp_comm", "stragglers"))


def test_more_microbatches_shrink_the_bubble_share_of_the_step():
    shares = []
    for batch in (32, 64, 128, 256):
        estimate = estimate_step(_llama8b().model, _llama8b_layout(global_batch_size=batch), H100)
        shares.append(estimate.times["pp_bubble"] / estimate.step_time)
    assert shares == sorted(shares, reverse=True) and shares[-1] < shares[0] / 4


def test_zero_shards_memory_and_full_recompute_trades_time_for_it():
    model = _llama8b().model
    memory = [estimate_step(model, _llama8b_layout(zero=zero), H100).memory.total for zero in (0, 1, 3)]
    assert memory[0] > memory[1] > memory[2]
    plain, full = (estimate_step(model, _llama8b_layout(recompute=mode), H100) for mode in ("none", "full"))
    assert full.step_time > plain.step_time and full.mfu < plain.mfu
    assert full.memory.activations < plain.memory.activations / 3  # the loss's fp32 logits work stays


def test_a_batch_that_does_not_split_into_microbatches_is_refused_by_name():
    with pytest.raises(PerfModelError, match=r"global_batch_size=100: must be a multiple of micro_batch_size\*dp = 1\*8"):
        estimate_step(_llama8b().model, _llama8b_layout(global_batch_size=100), H100)


def test_tensor_parallelism_across_nodes_is_slower_than_inside_one():
    inside = estimate_step(_llama8b().model, _llama8b_layout(), make_cluster("H100", gpus_per_node=8))
    across = estimate_step(_llama8b().model, _llama8b_layout(), make_cluster("H100", gpus_per_node=1))
    assert across.times["tp_comm"] > 5 * inside.times["tp_comm"]


def test_zero1_parameter_gather_is_exposed_as_the_engine_runs_it_and_hidden_when_overlapped():
    model = _llama8b().model
    lay = Layout(dp=64, global_batch_size=512, zero=1, recompute="selective")
    engine = estimate_step(model, lay, H100)
    overlapped = estimate_step(model, lay, H100, Assumptions(param_gather_overlap=True))
    after_backward = estimate_step(model, lay, H100, Assumptions(grad_reduce_overlap=False))
    assert overlapped.times["dp_comm"] < engine.times["dp_comm"] < after_backward.times["dp_comm"]


def test_ring_attention_as_implemented_costs_more_than_a_fused_kernel_per_block():
    model = load_config("configs/llama3-8b.yaml", ["model.seq_length=65536"]).model
    lay = Layout(tp=8, cp=8, dp=1, global_batch_size=8, sequence_parallel=True, recompute="full")
    matmul = estimate_step(model, lay, H100)
    flash = estimate_step(model, lay, H100, Assumptions(cp_attention="flash"))
    assert matmul.step_time > 3 * flash.step_time
    assert matmul.times["compute"] > flash.times["compute"]


def test_mfu_falls_with_data_parallel_size_at_fixed_work_per_gpu_and_at_fixed_global_batch():
    model = load_config("configs/llama3-70b.yaml").model
    layout = dict(tp=8, pp=4, virtual_stages=5, zero=1, sequence_parallel=True, recompute="full")
    sizes = (1, 8, 64, 256)
    weak = [estimate_step(model, Layout(dp=dp, global_batch_size=16 * dp, **layout), H100).mfu for dp in sizes]
    strong = [estimate_step(model, Layout(dp=dp, global_batch_size=1024, **layout), H100).mfu for dp in sizes]
    print(f"\n70B tp8 pp4 v5, MFU at dp {sizes}: fixed work per GPU {[round(100 * m, 1) for m in weak]}, "
          f"fixed global batch {[round(100 * m, 1) for m in strong]}")
    assert weak == sorted(weak, reverse=True) and weak[-1] < 0.9 * weak[0]
    assert strong == sorted(strong, reverse=True) and strong[-1] < weak[-1]


# ---------------------------------------------------------------------------------------------
# Published tables (engine/perf/calibration.py)


def test_calibration_against_published_tables_fit_and_held_out(capsys):
    table, summary = report()
    with capsys.disabled():
        print("\nMFU, predicted vs published (model FLOPs, no recomputation):\n" + table)
    assert summary["fit"] <= FIT_MAE and summary["holdout"] <= HOLDOUT_MAE and summary["worst"] <= WORST
    assert {row.split for row in all_rows()} == {"fit", "holdout"}


def test_the_engine_on_8_h100_is_no_faster_than_torchtitan_on_the_same_work_would_be():
    """torchtitan (a sanity point): the engine runs the same cuBLAS/SDPA kernels, eagerly, with more
    waste (fp32 norm copies, blockwise loss, unoverlapped ZeRO gather); on torchtitan's 500 W
    platform the model puts it within a few points of torchtitan's published MFU."""
    row = torchtitan_row()
    engine = dataclasses.replace(row, assume=Assumptions(), layouts=[dataclasses.replace(row.layouts[0], zero=1)])
    published, predicted_torchtitan, predicted_engine = row.published_mfu, predict(row).mfu, predict(engine).mfu
    assert predicted_engine <= predicted_torchtitan
    assert abs(predicted_torchtitan - published) <= WORST / 100


# ---------------------------------------------------------------------------------------------
# Flash attention off prices the score matrix (2021-era runs)


def test_without_flash_attention_the_score_traffic_and_full_matrix_gemms_cost_time():
    model = ModelConfig(hidden_size=2304, num_layers=24, num_heads=24, num_kv_heads=24, ffn_hidden_size=6144,
                        vocab_size=51200, seq_length=2048)
    lay = Layout(dp=32, micro_batch_size=4, global_batch_size=512, recompute="full")
    flash = estimate_step(model, lay, A100)
    unfused = estimate_step(model, lay, A100, Assumptions(flash_attention=False))
    assert unfused.step_time > flash.step_time
    assert math.isclose(unfused.mfu * unfused.step_time, flash.mfu * flash.step_time)  # same model FLOPs
