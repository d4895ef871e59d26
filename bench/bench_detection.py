"""Silent data corruption: which rehearsed faults the engine catches, how fast, whom it names.

    python bench/bench_detection.py            # every fault model, fp32 and bf16, defaults and ABFT
    python bench/bench_detection.py --quick    # two faults, fp32 only, short clean runs (smoke run)

Each fault model of `resilience.inject` strikes rank 1 of a dp2 run (real `apogee pretrain
--nproc 2` processes, the tiny words corpus) at step STRIKE, after the spike rule is armed
(resilience.spike_window accepted steps). A fault counts as detected when the guard reacts to it:
`sdc_suspect`, `sdc_confirmed` or a rewind after the fault fired (persistent faults end the run
with exit 17 after the rewind budget: detected). Columns: steps to detect (the step of the first
reaction minus STRIKE), the rank named in `sdc_confirmed` (the truth is
1), the layer named (ABFT only), and where the run ended: its final loss against the clean run's
(a detected fault's step is redone, so the run ends on the clean curve: 0 in fp32 when every step
is bitwise replayable; a missed one may leave it off, though one element moved by 1e-3 of the
output's largest magnitude changes the mean loss by less than fp32 resolves: 0 there says the loss
did not show it, not that the weights are clean). False positives: clean runs of
--clean-steps steps, every detection event counted. Step-time overhead is bench/bench_resilience.py's.

STRIKE falls on a checkpoint step (checkpoint.interval=5), and the guard compares the replicas'
parameters before every save: a parameter fault is seen there at once; struck between checks it
waits for the next one, at most min(resilience.check_interval, checkpoint.interval) steps.

Settings: "defaults" is the engine's defaults (resilience.abft_interval=0: no checksums);
"abft" adds resilience.abft_interval=1 (every step's forward GEMMs checked).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRIKE = 25
STEPS = 40
TRAIN = ["model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2",
         "checkpoint.interval=5", "logging.tensorboard=false", "resilience.max_restarts=0",
         "resilience.straggler_factor=0", "optim.warmup_steps=2"]
def fault_models(dtype: str) -> dict:
    """{name: resilience.inject entry} of every fault model; parameters and activations are 16-bit
    in bf16 (exponent 14-7, mantissa 6-0), the gradients flipped are fp32 main gradients."""
    wide = dtype == "fp32"
    top, mantissa, low, multi = (30, 20, 10, "3+9+22") if wide else (14, 5, 2, "1+3+6")
    return {
        "exponent flip, gradient (bit 30)": f"bitflip:target=grad:rank=1:step={STRIKE}:bit=30",
        "mantissa flip, gradient (bit 20)": f"bitflip:target=grad:rank=1:step={STRIKE}:bit=20",
        f"mantissa flip, parameter (bit {low})": f"bitflip:target=param:rank=1:step={STRIKE}:bit={low}",
        f"multi-bit flip, parameter ({multi})": f"bitflip:target=param:rank=1:step={STRIKE}:bit={multi}",
        f"exponent flip, activation (bit {top})": f"bitflip:target=activation:rank=1:step={STRIKE}:bit={top}",
        f"mantissa flip, activation (bit {mantissa})": f"bitflip:target=activation:rank=1:step={STRIKE}:bit={mantissa}",
        "gemm_error rel=1e-3": f"gemm_error:rank=1:step={STRIKE}:rel=1e-3",
        "gemm_error rel=1e-2": f"gemm_error:rank=1:step={STRIKE}:rel=1e-2",
        "persistent gemm_error rel=1e-3": f"gemm_error:rank=1:step={STRIKE}:rel=1e-3:persistent=1",
    }


QUICK = ("mantissa flip, parameter (bit 10)", "gemm_error rel=1e-3")  # fp32 names
SETTINGS = {"defaults": [], "abft": ["resilience.abft_interval=1"]}
DETECTIONS = ("sdc_suspect", "sdc_confirmed")


def pretrain(run_dir: Path, dataset: str, settings: list[str]) -> tuple[int, list[dict], list[float]]:
    """(exit status, events, losses by step) of one 2-rank run."""
    cmd = [sys.executable, "-m", "cli.main", "pretrain", "--nproc", "2", "--run-dir", str(run_dir), "--set",
           *TRAIN, f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}", *settings]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    losses: dict[int, float] = {}
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        record = json.loads(line)
        if "loss" in record and "step" in record:
            losses[record["step"]] = record["loss"]  # a redone step keeps its last value
    return done.returncode, events, [losses[s] for s in sorted(losses)]


def judge(status: int, events: list[dict]) -> dict:
    """What the guard did about a fault struck at STRIKE."""
    # The first reaction after the fault fired, in the order written: a suspicion or a rewind names
    # the step it was seen at; an ABFT confirmation the step it struck (seen there, at once). A
    # confirmation after a replay names the struck step too, but comes after the suspicion.
    fired = next((i for i, e in enumerate(events) if e["type"] == "fault_injected"), len(events))
    reacted = [e.get("from_step", e.get("step")) for e in events[fired:]
               if e["type"] in DETECTIONS or e["type"] == "rewind"]
    confirmed = [e for e in events if e["type"] == "sdc_confirmed"]
    return {"detected": bool(reacted) or status == 17, "steps": reacted[0] - STRIKE if reacted else None,
            "ranks": sorted({e["faulty_rank"] for e in confirmed}), "layer": next((e["layer"] for e in confirmed
                                                                                    if "layer" in e), None),
            "status": status}


def false_positives(events: list[dict]) -> int:
    """Detection events and rewinds of a clean run."""
    return sum(1 for e in events if e["type"] in (*DETECTIONS, "rewind"))


def main() -> None:
    from data_pipeline.words_corpus import make_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clean-steps", type=int, default=1000)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    dtypes = ["fp32"] if args.quick else args.dtypes
    clean_steps = 60 if args.quick else args.clean_steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        dataset = make_dataset(tmp / "corpus")
        for dtype in dtypes:
            faults = fault_models(dtype)
            faults = {k: faults[k] for k in QUICK} if args.quick else faults
            for setting, extra in SETTINGS.items():
                base = [f"precision.dtype={dtype}", *extra]
                _, events, clean = pretrain(tmp / f"clean-{dtype}-{setting}" / "run", dataset,
                                            [*base, f"train.steps={STEPS}"])
                assert not false_positives(events), "the short clean run itself reacted"
                print(f"\n{dtype}, {setting} ({' '.join(extra) or 'engine defaults'}): fault on rank 1 at step {STRIKE}"
                      f" of {STEPS}")
                print(f"  {'fault':<38}{'detected':>9}{'steps':>7}{'rank named':>12}{'layer':>24}"
                      f"{'final loss vs clean':>21}")
                for i, (name, spec) in enumerate(faults.items()):
                    run = tmp / f"{dtype}-{setting}-{i}" / "run"
                    status, events, losses = pretrain(run, dataset, [*base, f"train.steps={STEPS}",
                                                                     f"resilience.inject=[{spec}]"])
                    j = judge(status, events)
                    ended = (f"{losses[-1] / clean[-1] - 1:+.2e}" if status == 0 and len(losses) == len(clean)
                             else f"stopped (exit {status})")
                    print(f"  {name:<38}{'yes' if j['detected'] else 'NO':>9}"
                          f"{'' if j['steps'] is None else j['steps']:>7}{str(j['ranks'] or '-'):>12}"
                          f"{str(j['layer'] or '-'):>24}{ended:>21}", flush=True)
                _, events, _ = pretrain(tmp / f"long-{dtype}-{setting}" / "run", dataset,
                                        [*base, f"train.steps={clean_steps}", "checkpoint.interval=100"])
                print(f"  false positives over {clean_steps} clean steps: {false_positives(events)}", flush=True)


if __name__ == "__main__":
    main()
