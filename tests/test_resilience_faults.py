"""Fault injection and the hang watchdog in single processes: parsing and validation of
`resilience.inject`, fire-once across restarts, a real SIGKILL, and the watchdog ending a stuck
process with status 18, its stacks and a 'hang' event. Multi-rank restarts: test_resilience_restart."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.config_validation import validate
from engine.resilience.exit_codes import HANG_DETECTED, restart_helps
from engine.resilience.faults import FaultInjector, InjectedFault, parse_faults

ROOT = Path(__file__).resolve().parent.parent
ALL_KINDS = ["kill:rank=1:step=7", "raise:rank=0:step=4", "hang:rank=0:step=5",
             "bitflip:target=grad:rank=1:step=9:bit=30", "garbage_batch:step=12"]


def test_every_documented_fault_form_parses():
    faults = parse_faults(ALL_KINDS, world_size=2)
    assert [(f.kind, f.rank, f.step) for f in faults] == [
        ("kill", 1, 7), ("raise", 0, 4), ("hang", 0, 5), ("bitflip", 1, 9), ("garbage_batch", None, 12)]
    assert (faults[3].target, faults[3].bit, faults[3].element) == ("grad", 30, 0)


def test_a_bit_beyond_a_bf16_parameter_or_activation_is_refused_at_config_time():
    cfg = load_config(None, ["precision.dtype=bf16", "resilience.inject=[bitflip:target=activation:rank=0:step=3:bit=3+20]"])
    with pytest.raises(ConfigError, match=r"resilience.inject\[0\]=.*bit 20 of a activation: with precision.dtype=bf16"):
        validate(cfg, world_size=2)
    validate(load_config(None, ["precision.dtype=bf16", "resilience.inject=[bitflip:target=grad:rank=0:step=3:bit=30]"]), 2)


def test_a_multi_bit_flip_flips_each_of_its_bits_of_one_element():
    import torch

    from engine.resilience.guard import flip_bit

    fault = parse_faults(["bitflip:target=param:rank=0:step=2:bit=0+7+22+31:element=1"])[0]
    assert (fault.bit, fault.bits, fault.element) == (0, (0, 7, 22, 31), 1)
    values = torch.tensor([1.0, 1.5, -2.0])
    before = values.view(torch.int32).clone()
    flip_bit(values, fault.element, fault.bits)
    assert (values.view(torch.int32) ^ before).tolist() == [0, (1 | 1 << 7 | 1 << 22) - (1 << 31), 0]
    assert -1.5 < values[1] < -1.0  # sign flipped, mantissa moved: a subtle change, no NaN, no spike
    mantissa = torch.tensor([1.0])
    flip_bit(mantissa, 0, 3)  # one low mantissa bit: the value moves by 2^-20
    assert mantissa.item() == 1.0 + 2.0 ** -20
    with pytest.raises(ValueError, match="bit 20 of a 16-bit"):
        flip_bit(torch.ones(2, dtype=torch.bfloat16), 0, (3, 20))


@pytest.mark.parametrize("entry, problem", [
    ("kil:rank=1:step=2", "unknown fault kind 'kil'"),
    ("kill:rank=2:step=3", "rank=2: expected 0..1 (2 ranks)"),
    ("kill:step=3", "kill needs rank"),
    ("kill:rank=0:step=0", "steps count from 1"),
    ("hang:rank=0:step=x", "step='x': expected an integer"),
    ("bitflip:target=loss:rank=0:step=1:bit=3", "target='loss': expected one of grad, param, activation"),
    ("bitflip:target=grad:rank=0:step=1:bit=40", "bit=40: expected 0..31"),
    ("raise:rank=0:step=1:bit=3", "raise takes rank, step, not 'bit'"),
    ("bitflip:target=grad:rank=0:step=1:bit=3+40", "bit=40: expected 0..31"),
    ("bitflip:target=grad:rank=0:step=1:bit=3+3", "bit='3+3': each bit once"),
    ("bitflip:target=grad:rank=0:step=1:bit=3+x", "bit='3+x': expected an integer, or integers joined by '+'"),
])
def test_a_bad_fault_is_refused_naming_the_entry_the_value_and_the_valid_forms(entry, problem):
    cfg = load_config(None, [f"resilience.inject=[kill:rank=0:step=1, {entry}]"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    message = str(err.value)
    assert message.startswith(f"resilience.inject[1]={entry!r}: ") and problem in message
    assert "valid forms: kill:rank=R:step=K" in message


def test_a_bad_fault_on_the_command_line_exits_2_before_any_rank_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli.main", "pretrain", "--nproc", "2", "--run-dir",
                             str(tmp_path / "run"), "--set", "resilience.inject=[kill:rank=5:step=3]"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "apogee: error: resilience.inject[0]='kill:rank=5:step=3': rank=5: expected 0..1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_fault_fires_once_even_when_a_restarted_run_passes_its_step_again(tmp_path):
    faults = parse_faults(["raise:rank=0:step=3", "garbage_batch:step=3", "bitflip:target=param:rank=1:step=3:bit=2"])
    first = FaultInjector(faults, rank=0, run_dir=tmp_path)
    assert [f.kind for f in first.pending("garbage_batch", 2)] == ["garbage_batch"]
    assert first.pending("bitflip", 2) == []  # rank 1's fault
    first.before_step(0)
    first.before_step(1)
    with pytest.raises(InjectedFault, match="raise:rank=0:step=3"):
        first.before_step(2)  # the 3rd step has index 2
    first.mark_fired(first.pending("garbage_batch", 2)[0])
    restarted = FaultInjector(faults, rank=0, run_dir=tmp_path)  # a new attempt reads what fired
    restarted.before_step(2)
    assert restarted.pending("garbage_batch", 2) == []
    other_rank = FaultInjector(faults, rank=1, run_dir=tmp_path)
    assert [f.kind for f in other_rank.pending("garbage_batch", 2)] == ["garbage_batch"]  # fires per rank
    fired = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["type"], e["rank"], e["fault"], e["step"]) for e in fired] == [
        ("fault_injected", 0, "raise:rank=0:step=3", 3), ("fault_injected", 0, "garbage_batch:step=3", 3)]


KILLED_PROCESS = textwrap.dedent("""
    import sys
    from engine.resilience.faults import FaultInjector, parse_faults
    injector = FaultInjector(parse_faults(["kill:rank=0:step=2"]), rank=0, run_dir=sys.argv[1])
    for step in range(3):
        injector.before_step(step)
        print("step", step + 1, "done", flush=True)
""")


def test_a_kill_is_a_real_sigkill_recorded_before_it_fires_and_not_repeated(tmp_path):
    run = [sys.executable, "-c", KILLED_PROCESS, str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert first.returncode == -9 and first.stdout.split("\n")[:-1] == ["step 1 done"]
    again = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0 and "step 3 done" in again.stdout
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["type"], event["fault"], event["rank"], event["step"]) == ("fault_injected", "kill:rank=0:step=2", 0, 2)


STUCK_PROCESS = textwrap.dedent("""
    import sys, time
    from engine.resilience.faults import hang_forever
    from engine.resilience.watchdog import Watchdog
    watchdog = Watchdog(sys.argv[1], rank=3, timeout_s=1.0).start()
    time.sleep(1.5)  # no beat yet: start-up does not count
    for step in range(3):
        time.sleep(0.3)
        watchdog.beat(step + 1)
    hang_forever()
""")


def test_the_watchdog_ends_a_stuck_rank_with_status_18_its_stacks_and_a_hang_event(tmp_path):
    result = subprocess.run([sys.executable, "-c", STUCK_PROCESS, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == HANG_DETECTED == 18
    assert "no progress for" in result.stderr and "exiting with status 18" in result.stderr
    dump = (tmp_path / "hang-rank3.txt").read_text()
    assert "hang_forever" in dump and "after step 3" in dump
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["type"], event["rank"], event["step"], event["exit_code"]) == ("hang", 3, 4, 18)
    assert 1.0 <= event["silent_s"] < 2.0


def test_job_scripts_requeue_only_what_a_restart_can_fix():
    assert [s for s in (0, 1, 2, 16, 17, 18, 137, 143) if restart_helps(s)] == [1, 16, 18, 137, 143]


@pytest.mark.parametrize("settings, warned", [
    (["resilience.inject=[garbage_batch:step=20]"], [0]),  # the default window: 20 accepted steps first
    (["resilience.inject=[garbage_batch:step=21, bitflip:target=activation:rank=0:step=21:bit=30]"], []),
    (["resilience.spike_window=5", "resilience.inject=[bitflip:target=activation:rank=0:step=5:bit=30]"], [0]),
    # a flipped gradient with a replica to compare fingerprints with is judged where it fires...
    (["parallel.dp=2", "resilience.inject=[bitflip:target=grad:rank=1:step=3:bit=30]"], []),
    # ...but not with fingerprint checks off, nor at dp=1
    (["parallel.dp=2", "resilience.check_interval=0", "resilience.inject=[bitflip:target=grad:rank=1:step=3:bit=30]"], [0]),
    (["parallel.dp=1", "resilience.inject=[kill:rank=0:step=2, bitflip:target=param:rank=0:step=3:bit=30]"], [1]),
])
def test_a_fault_fired_before_the_detectors_are_armed_is_warned_about(settings, warned):
    from engine.resilience.faults import early_fault_warnings
    cfg = validate(load_config(None, settings), world_size=2 if "parallel.dp=2" in settings else 1)
    lines = early_fault_warnings(cfg)
    assert [int(line.split("[")[1].split("]")[0]) for line in lines] == warned
    window = cfg.resilience.spike_window
    for line in lines:
        assert f"resilience.spike_window={window}" in line and f"judged from step {window + 1}" in line


def test_the_warning_is_printed_once_before_the_run_starts(tmp_path):
    from data_pipeline.words_corpus import make_dataset
    (tmp_path / "corpus").mkdir()
    data = make_dataset(tmp_path / "corpus")
    result = subprocess.run([sys.executable, "-m", "cli.main", "pretrain", "--run-dir", str(tmp_path / "run"), "--set",
                             "train.steps=2", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=2",
                             "train.micro_batch_size=2", "logging.tensorboard=false", f"data.inputs=[{data}]",
                             f"data.cache_dir={tmp_path / 'cache'}", "resilience.inject=[garbage_batch:step=2]"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("apogee: warning: resilience.inject")]
    assert len(warnings) == 1 and "judged from step 21" in warnings[0]
    assert "step      2/2" in result.stdout  # a warning: the rehearsal still runs
