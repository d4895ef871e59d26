"""`apogee eval` and `apogee generate` on a real (tiny) run: the side-by-side table and its JSON, an
Apogee checkpoint and its HF export scoring alike, loss and pass@k by hand, the plot, TP ranks,
and bad inputs exiting 2 with the file and line."""
import json
import math

import numpy as np
import pytest
import torch

from cli.main import main

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=128", "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.steps=4", "train.eval_interval=2", "train.eval_iters=1", "data.split=90,10,0",
         "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step pre-training run (validating every 2 steps), its HF export, a corpus and tasks."""
    from data_pipeline.words_corpus import make_dataset
    from engine.job.runner import run_job
    from stages.registry import builtin_stages

    root = tmp_path_factory.mktemp("evalrun")
    prefix = make_dataset(root)
    registry = builtin_stages()
    stage = registry.get("pretrain")
    cfg = registry.load_config(stage, None, [*SMALL, f"data.inputs=[{prefix}]", f"data.cache_dir={root}/cache"])
    assert run_job(cfg, stage, run_dir=str(root / "run")) == 0
    assert main(["export", "--checkpoint", str(root / "run"), "--to", "hf", "--out", str(root / "hf")]) == 0
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in
                             [("The cat", " runs"), ("A dog", " sleeps"), ("Two red", " birds")]))
    return {"root": root, "run": str(root / "run"), "hf": str(root / "hf"), "prefix": prefix, "tasks": str(tasks)}


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_compares_checkpoints_side_by_side(run, capsys):
    argv = ["eval", "--checkpoint", run["run"], run["hf"], "--data", run["prefix"], "--max-tokens", "3000",
            "--tasks", run["tasks"], "--num-samples", "3", "--temperature", "1.0", "--max-new-tokens", "6"]
    rows = _json(capsys, [*argv, "--json"])
    assert [r["checkpoint"].endswith(s) for r, s in zip(rows, ("step_00000004", "hf"))] == [True, True]
    apogee, hf = rows
    assert {"loss", "ppl", "bits_per_byte", "tokens", "accuracy", "reward_mean", "pass@1", "pass@3", "tasks"} <= set(apogee)
    assert apogee["tokens"] == 2999 and apogee["tasks"] == 3
    assert hf["loss"] == pytest.approx(apogee["loss"], rel=1e-6)  # the export is the same model
    assert apogee["ppl"] == pytest.approx(math.exp(apogee["loss"]))
    assert apogee["pass@3"] >= apogee["pass@1"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["checkpoint", "step", "loss", "ppl"] and run["hf"] in table[3]


def test_loss_bits_per_byte_and_pass_at_k_by_hand():
    from engine.eval.evaluate import pass_at_k, stream_loss
    from tests.test_generate import tiny_model

    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 258, 70)
    got = stream_loss(model, tokens, seq_length=32, batch_size=2, byte_vocab=256)
    nll, count = 0.0, 0
    for start in range(0, 69, 32):  # windows of 33 tokens overlapping by one: each target once
        window = torch.from_numpy(tokens[start:start + 33])
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None, :-1]).double(), -1)[0]
        nll -= float(logp.gather(-1, window[1:, None]).sum())
        count += len(window) - 1
    assert count == got["tokens"] == 69 and got["loss"] == pytest.approx(nll / count, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / int((tokens[1:] < 256).sum()), rel=1e-6)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(5, 0, 3) == 0.0


def test_eval_plots_the_runs_validation_curves(run, capsys):
    from engine.eval.report import validation_curve

    steps, values, what = validation_curve(run["root"] / "run")
    assert steps == [2, 4] and what == "validation loss" and len(values) == 2
    out = run["root"] / "curves.png"
    assert main(["eval", "--checkpoint", run["run"], "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_curve_counts_a_replayed_step_once_with_the_value_the_run_went_on_from(tmp_path):
    from engine.eval.report import validation_curve

    logged = [(2, 3.0), (4, 2.5), (6, 2.2), (2, 3.0), (4, 2.4), (6, 2.1), (8, 2.0)]  # rewound at 7 to step 0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0, "val_loss": v}) + "\n"
                                                    for s, v in logged))
    assert validation_curve(tmp_path) == ([2, 4, 6, 8], [3.0, 2.4, 2.1, 2.0], "validation loss")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 1, "loss": 4.5}\n')
    assert validation_curve(tmp_path) == ([1, 2], [4.5, 4.0], "training loss")


def test_bad_inputs_exit_2_naming_the_file_and_line(run, capsys, tmp_path):
    bad_tasks = tmp_path / "tasks.jsonl"
    bad_tasks.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    wide = tmp_path / "wide"
    from data_pipeline.indexed_dataset import IndexedDatasetWriter

    with IndexedDatasetWriter(str(wide), np.int32) as writer:
        writer.add_document(np.array([1, 2, 50000, 3]))
    cases = [
        (["eval", "--checkpoint", str(tmp_path / "nope"), "--data", run["prefix"]], "--checkpoint=", "no such directory"),
        (["eval", "--checkpoint", run["run"], "--tasks", str(bad_tasks)], f"{bad_tasks}:2", "'answer'"),
        (["eval", "--checkpoint", run["run"], "--data", str(wide)], f"{wide}.bin", "token id 50000 >= model.vocab_size=384"),
        (["eval", "--checkpoint", run["run"], "--tasks", run["tasks"], "--pass-k", "2"], "--pass-k 2", "--num-samples=1"),
        (["generate", "--checkpoint", run["run"], "--prompts", str(bad_tasks.with_name("p.jsonl"))], "p.jsonl", "not a file"),
        (["generate", "--checkpoint", run["run"], "--prompt", "x" * 40], "--prompt", "seq_length=32"),
        (["generate", "--checkpoint", run["run"], "--prompt", "x", "--nproc", "3"], "--nproc 3", "divisible"),
    ]
    bad_tasks.with_name("p.jsonl").write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    cases[4] = (cases[4][0], f"{bad_tasks.with_name('p.jsonl')}:2", "'prompt'")
    for argv, where, what in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert where in err and what in err, (argv, err)


def test_generate_prints_json_and_tp2_samples_the_same(run, capsys, tmp_path):
    one = _json(capsys, ["generate", "--checkpoint", run["run"], "--prompt", "The cat", "--max-new-tokens", "8", "--json"])
    assert set(one) == {"prompt", "prompt_ids", "completion_ids", "text", "finish_reason"}
    assert one["prompt_ids"] == list(b"The cat") and 1 <= len(one["completion_ids"]) <= 8
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The cat"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    argv = ["generate", "--checkpoint", run["run"], "--prompts", str(prompts), "--max-new-tokens", "6", "--json",
            "--temperature", "0.9", "--num-samples", "2"]
    many = _json(capsys, argv)
    assert len(many) == 2 and many[0]["completion_ids"] == one["completion_ids"][:0] + many[0]["samples"][0]["completion_ids"]
    assert many[1]["prompt_ids"] == list(b"user: hi\nassistant: ") and len(many[1]["samples"]) == 2
    assert _json(capsys, [*argv, "--nproc", "2"]) == many  # tensor-parallel ranks sample the same tokens
