"""The red-team suite: every bad input found by trying Apogee as a careful user and as an attacker
would (issue 14), each held to the behaviour it must keep, so that none regresses.

Sections, in the issue's order: bad configs that were already refused well (one clear line, exit
2, before any rank starts); inputs that were silently wrong and are now refused or warned; what
was unclear (a traceback, a misleading cause) and is now one line; and last, the run-directory and
checkpoint cases (engine/job/run_dir.py, engine/state/safe_load.py and resume.py).

Runs are in-process `apogee` calls (cli.main.main) on a tiny model for one or two steps; the MFU
peak is not measured (it costs a second per run and says nothing here). The few cases that need a
second rank or a real signal use subprocesses.
"""
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from data_pipeline.indexed_dataset import IndexedDatasetWriter
from data_pipeline.words_corpus import make_dataset
from engine.train.metrics import PeakFlops
from tests.test_launch import launcher_env
from tests.tmpfs import mounted_tmpfs

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
        "model.ffn_hidden_size=64", "model.vocab_size=288", "model.seq_length=16", "train.micro_batch_size=1",
        "train.global_batch_size=2", "train.steps=1", "logging.tensorboard=false", "optim.warmup_steps=0"]


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    monkeypatch.setattr("engine.job.runner.machine_peak", lambda *args: PeakFlops(1e12, "fixed for tests"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A byte-tokenised dataset prefix (ids < 258) and a cache directory shared by the module's runs."""
    folder = tmp_path_factory.mktemp("corpus")
    return make_dataset(folder), str(folder / "cache")


def apogee(capsys, *argv):
    """Run `apogee ARGV` in this process: (exit status, stdout, stderr); an exception that escapes is
    what a process would show: status 1 and its traceback on stderr."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse
        status = stop.code
    except KeyboardInterrupt:
        raise
    except BaseException:  # DCP's CheckpointException is a BaseException
        traceback.print_exc()
        status = 1
    out, err = capsys.readouterr()
    return status, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("apogee") and "error" in line]


def assert_one_clear_line(status, err, *fragments):
    """Exit 2, exactly one 'apogee...: error: ...' line holding every fragment, and no traceback."""
    assert status == 2, err
    assert len(error_lines(err)) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in error_lines(err)[0], err


def train_args(corpus, run_dir, *extra):
    prefix, cache = corpus
    return ["--run-dir", run_dir, "--set", *TINY, f"data.inputs=[{prefix}]", f"data.cache_dir={cache}", *extra]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# -- Bad configs: already refused well -----------------------------------------------------------

HANDLED_WELL = [
    (["--set", "model.hiden_size=3"], "unknown config key 'model.hiden_size'; valid keys here: hidden_size"),
    (["--set", "train.steps=abc"], "train.steps='abc': expected an integer"),
    (["--nproc", "2", "--set", "parallel.tp=3"], "parallel='tp*cp*pp=3': must divide the world size 2"),
    (["--set", "parallel.zero=7"], "parallel.zero=7: expected one of 0, 1, 2, 3"),
    (["--set", "precision.dtype=fp16"], "precision.dtype='fp16': expected one of fp32, bf16, fp8"),
    (["--config", "/nonexistent/apogee.yaml"], "--config /nonexistent/apogee.yaml: no such file"),
    (["--set", "train.steps"], "override 'train.steps': expected KEY=VALUE"),
    (["--set", "optim.lr=0"], "optim.lr=0.0: must be > 0"),
    (["--set", "optim.min_lr=1.0"], "optim.min_lr=1.0: must be in [0, optim.lr=0.003]"),
    (["--set", "model.num_heads=3"], "model.num_heads=3: must divide model.hidden_size=128"),
    (["--set", "train.global_batch_size=6"], "train.global_batch_size=6: must be a multiple of micro_batch_size*dp"),
    (["--set", "train.micro_batch_size=0"], "train.micro_batch_size=0: must be >= 1"),
    (["--set", "checkpoint.keep=0"], "checkpoint.keep=0: must be >= 1"),
    (["--nproc", "4", "--set", "parallel.pp=4"], "parallel.pp=4: pp*virtual_stages=4 model chunks need at least"),
    (["--set", "resilience.inject=[explode:rank=0]"], "resilience.inject[0]='explode:rank=0': unknown fault kind"),
    (["--set", "data.weights=[1,2]"], "data.weights=[1, 2]: needs one weight per input (1 inputs)"),
    (["--set", "model.vocab_size=100"], "model.vocab_size=100: smaller than the tokenizer's vocabulary (258 ids"),
    (["--set", "lora.rank=2", "lora.targets=[bogus]"], "lora.targets=['bogus']: a non-empty list of q_proj"),
    (["--resume", "/nonexistent/checkpoint"], "--resume='/nonexistent/checkpoint': not an intact checkpoint"),
    (["--set", "data.inputs=[/nonexistent/file]"], "data input '/nonexistent/file': neither a dataset prefix"),
    (["--set", "data.tokenizer=/nonexistent/tokenizer.json"], "tokenizer '/nonexistent/tokenizer.json': unknown"),
    (["--set", "train.init_from=/nonexistent/run"], "train.init_from='/nonexistent/run': not a Hugging Face"),
]


@pytest.mark.parametrize("args, message", HANDLED_WELL, ids=[m.split(":")[0][:40] for _, m in HANDLED_WELL])
def test_a_bad_config_is_refused_in_one_line_before_anything_runs(tmp_path, capsys, args, message):
    status, _, err = apogee(capsys, "pretrain", "--run-dir", tmp_path / "run", *args)
    assert_one_clear_line(status, err, message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["run", "nosuch"], "stage 'nosuch': expected one of pretrain, midtrain, sft, dpo, grpo"),
    (["run", "nosuch.module:Stage"], "stage 'nosuch.module:Stage': cannot import 'Stage' from 'nosuch.module'"),
    (["dpo", "--nproc", "2", "--set", "dpo.inputs=[x.jsonl]", "parallel.pp=2"], "parallel.pp=2: DPO runs with pp=1"),
    (["dpo", "--set", "dpo.inputs=[x.jsonl]", "sft.inputs=[y.jsonl]"], "only one of them (set: dpo.inputs, sft.inputs)"),
    (["sft", "--set", "sft.inputs=[/nonexistent.jsonl]"], "sft.inputs: '/nonexistent.jsonl' is not a file"),
    (["grpo", "--set", "grpo.inputs=[x.jsonl]", "grpo.group_size=1"], "grpo.group_size=1: must be >= 2"),
])
def test_a_bad_stage_run_is_refused_in_one_line(tmp_path, capsys, argv, message):
    status, _, err = apogee(capsys, *argv, "--run-dir", tmp_path / "run")
    assert_one_clear_line(status, err, message)


# -- Silently wrong, now refused or warned ---------------------------------------------------------

@pytest.fixture(scope="module")
def out_of_vocab(tmp_path_factory):
    """A dataset holding token id 300, past TINY's model.vocab_size=288."""
    prefix = str(tmp_path_factory.mktemp("vocab") / "ids")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for start in range(0, 400, 20):
            writer.add_document(np.arange(start, start + 20, dtype=np.int64) % 301)
    return prefix


@pytest.mark.parametrize("layout", [[], ["--nproc", "2", "--set", "parallel.tp=2"], ["--nproc", "2"]],
                         ids=["tp1", "tp2", "dp2"])
def test_token_ids_past_the_vocabulary_are_refused_before_ranks_start_in_every_layout(tmp_path, capsys, corpus,
                                                                                      out_of_vocab, layout):
    status, out, err = apogee(capsys, "pretrain", *train_args(corpus, tmp_path / "run"), f"data.inputs=[{out_of_vocab}]",
                              *layout)
    assert_one_clear_line(status, err, f"{out_of_vocab}.bin: token id 300 >= model.vocab_size=288")
    assert "rank(s) via" not in out and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_dataset_file_given_for_its_prefix_asks_did_you_mean(tmp_path, capsys, corpus, suffix):
    prefix, _ = corpus
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, tmp_path / "run"), f"data.inputs=[{prefix}{suffix}]")
    assert_one_clear_line(status, err, f"did you mean {prefix!r}?")


def test_a_run_name_cannot_leave_runs(tmp_path, capsys, corpus, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    prefix, cache = corpus
    status, _, err = apogee(capsys, "pretrain", "--set", *TINY, f"data.inputs=[{prefix}]", f"data.cache_dir={cache}",
                            "name=../../x")
    assert_one_clear_line(status, err, "name='../../x': a run name is one folder name under runs/")
    assert not (tmp_path / "x").exists() and not (work / "runs").exists()


def test_an_explicit_run_dir_is_the_users_choice(tmp_path, capsys, corpus):
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, tmp_path / "elsewhere" / ".." / "chosen"))
    assert status == 0, err
    assert (tmp_path / "chosen" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "events.jsonl"])
def test_a_symlink_planted_in_the_run_directory_is_refused_not_followed(tmp_path, capsys, corpus, name):
    run_dir, target = tmp_path / "run", tmp_path / "precious.txt"
    run_dir.mkdir()
    target.write_text("keep me\n")
    (run_dir / name).symlink_to(target)
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir))
    assert_one_clear_line(status, err, f"{run_dir / name}: is a symlink (to {target})")
    assert target.read_text() == "keep me\n"


def test_run_files_are_opened_without_following_a_symlink_created_mid_run(tmp_path):
    from engine.run_files import RunFileError
    from engine.train.events import EventLog

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (tmp_path / "events.jsonl").symlink_to(target)  # after the pre-start check: the open itself refuses
    with pytest.raises(RunFileError, match="events.jsonl: is a symlink"):
        EventLog(tmp_path, 0).record("start", step=0)
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("sets, message", [
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    (["model.init_std=-1"], "model.init_std=-1.0: must be > 0"),
    (["model.init_std=0"], "model.init_std=0.0: must be > 0"),
])
def test_values_that_train_nonsense_are_refused(tmp_path, capsys, corpus, sets, message):
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, tmp_path / "run", *sets))
    assert_one_clear_line(status, err, message)


@pytest.mark.parametrize("records", [
    [{"prompt": "2+2=", "response": ""}, {"prompt": "3+3=", "response": ""}],
    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
], ids=["prompt-response", "messages"])
def test_an_sft_file_whose_every_response_is_empty_is_refused_naming_it(tmp_path, capsys, corpus, records):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "1+1=", "response": "2"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", records)
    status, _, err = apogee(capsys, "sft", "--run-dir", tmp_path / "run", "--set", *TINY,
                            f"sft.inputs=[{good},{empty}]")
    assert_one_clear_line(status, err, f"sft.inputs: {empty}: every response is empty")


def test_dpo_pairs_all_identical_are_refused_naming_their_lines(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}+1=", "chosen": "x", "rejected": "x"} for i in range(3)])
    status, _, err = apogee(capsys, "dpo", "--run-dir", tmp_path / "run", "--set", *TINY, f"dpo.inputs=[{pairs}]")
    assert_one_clear_line(status, err, "every pair has chosen == rejected", f"{pairs}:1, {pairs}:2, {pairs}:3")


def test_dpo_warns_of_identical_pairs_and_drops_pairs_left_without_a_trained_token(tmp_path, capsys):
    records = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(4)]
    records.insert(1, {"prompt": "same=", "chosen": "y", "rejected": "y"})                # line 2
    records.insert(3, {"prompt": "p" * 40, "chosen": "long", "rejected": "prompt"})       # line 4: cut off
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    status, _, err = apogee(capsys, "dpo", "--run-dir", tmp_path / "run", "--set", *TINY, f"dpo.inputs=[{pairs}]")
    assert status == 0, err
    assert f"dpo.inputs: 1 of 5 pairs have chosen == rejected within model.seq_length + 1 = 17 tokens ({pairs}:2)" in err
    assert f"dpo.inputs: dropped 1 of 6 pairs whose chosen or rejected response has no token left" in err
    assert f"({pairs}:4)" in err and err.count("dropped 1 of 6") == 1  # said once, not once per rank


BAD_REWARDS = '''
def returns_text(completion, answer):
    return "1.0"


def fails(completion, answer):
    raise KeyError(answer)
'''


@pytest.mark.parametrize("reward, message", [
    ("os:system", "grpo.reward='os:system': os:system('', '2') failed: TypeError"),
    ("bad_rewards:returns_text", "returned '1.0': a reward must return a finite number"),
    ("bad_rewards:fails", "bad_rewards:fails('', '2') failed: KeyError"),
])
def test_a_reward_of_the_wrong_signature_is_refused_before_training(tmp_path, capsys, monkeypatch, reward, message):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    status, out, err = apogee(capsys, "grpo", "--run-dir", tmp_path / "run", "--set", *TINY, f"grpo.inputs=[{prompts}]",
                              "grpo.group_size=2", "grpo.max_new_tokens=4", f"grpo.reward={reward}")
    assert_one_clear_line(status, err, message)
    assert "rank(s) via" not in out


def _rank_pid(parent: int, rank: int, deadline: float):
    """The pid of the torchrun worker with RANK=rank under `parent` (torchrun's workers carry their env)."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env and \
                    f"APOGEE_TEST_PARENT={parent}".encode() in env:
                return int(entry.name)
        time.sleep(0.2)
    return None


@pytest.mark.distributed
def test_sigterm_to_rank_1_is_named_in_the_failure_event(tmp_path, corpus):
    run_dir = tmp_path / "run"
    env = launcher_env(APOGEE_TEST_PARENT=str(os.getpid()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
               "-m", "cli.main", "pretrain", *map(str, train_args(corpus, run_dir, "train.steps=10",
                                                                   "checkpoint.interval=4"))]
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.1)
        rank1 = _rank_pid(os.getpid(), 1, deadline)
        assert rank1 is not None, "rank 1 not found"
        os.kill(rank1, signal.SIGTERM)
        output, _ = run.communicate(timeout=240)
    finally:
        run.kill()
    assert run.returncode == 0, output
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (failure,) = [e for e in events if e["type"] == "failure"]
    assert (failure["rank"], failure["cause"], failure["signal"], failure["exit_code"]) == (1, "signal", "SIGTERM", 143)
    assert "after SIGTERM of rank 1" in output


# -- Unclear, now one line -------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """An empty read-only file system (tests run as root, where permission bits do not stop writes)."""
    with mounted_tmpfs(tmp_path / "read-only", "ro,size=1m") as folder:
        yield folder


@pytest.mark.parametrize("inputs", ["dataset", "text"])
def test_a_read_only_cache_directory_is_one_line(tmp_path, capsys, corpus, read_only_dir, inputs):
    prefix, _ = corpus
    source = prefix if inputs == "dataset" else str(write_jsonl(tmp_path / "raw.jsonl", [{"text": "hello world"}]))
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, tmp_path / "run", f"data.inputs=[{source}]",
                                                            f"data.cache_dir={read_only_dir}"))
    # Refused by the writability probe before any data is read (engine/state/storage.py).
    assert_one_clear_line(status, err, f"data.cache_dir={str(read_only_dir)!r}: not writable", "read-only file system")


def test_a_read_only_preprocess_output_is_one_line(tmp_path, capsys, read_only_dir):
    text = tmp_path / "doc.txt"
    text.write_text("some words\n")
    status, _, err = apogee(capsys, "preprocess", "--input", text, "--output-prefix", read_only_dir / "out" / "corpus")
    assert_one_clear_line(status, err, f"--output-prefix {read_only_dir / 'out' / 'corpus'}: cannot write",
                          "Read-only file system")
