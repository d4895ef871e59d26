"""GRPO (stages/grpo/trainer.py): rewards, advantages and the loss by hand, layout-invariant sampling, a
toy task learnt from scratch, dp2/tp2 on the single-rank run, and `apogee grpo` end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import DataError
from data_pipeline.prompts import PromptData, read_prompts
from engine.rewards import contains, exact_match
from data_pipeline.tokenizer import ByteTokenizer
from tests.noise_floor import EPS32, FACTOR, MIN_ULPS, Reordered, Tolerance, floor_scope
from tests.parity import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=128", "model.vocab_size=384", "logging.tensorboard=false"]
# optim.eps=1e-4 for the reason tests/test_dpo.py documents: Adam turns rounding noise in
# near-zero gradients into O(lr) weight noise at eps=1e-8.
PARITY = [*SMALL, "model.seq_length=16", "train.micro_batch_size=1", "train.global_batch_size=4",
          "grpo.inputs=[prompts]", "grpo.group_size=4", "grpo.max_new_tokens=6", "grpo.reward=tests.test_grpo:ascii_share",
          "optim.lr=1e-3", "optim.eps=1e-4", "optim.warmup_steps=0"]
PARITY_PROMPTS = ["2+2=", "say hi:", "abc", "France:", "x", "7*6="]
TOY_PROMPTS = ["say 7:", "7?", "seven:", "echo 7:"]


def ascii_share(completion: str, answer: str) -> float:
    """A graded test reward: the share of ASCII characters in the completion (random bytes score ~1/2)."""
    return sum(c.isascii() for c in completion) / len(completion) if completion else 1.0


def _config(overrides, world_size=1, steps=4):
    from tests.parity import stage_config

    return stage_config(TINY_CONFIG, [*overrides, f"train.steps={steps}"], world_size, "grpo")


def _trainer(overrides, world_size, steps, prompts, answer="7"):
    from stages.grpo.trainer import GRPOTrainer
    from parallel.topology import ParallelContext

    cfg = _config(overrides, world_size, steps)
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
    tokenizer = ByteTokenizer()
    data = PromptData([(tuple(tokenizer.encode(text)), answer) for text in prompts], cfg.seed,
                      cfg.train.global_batch_size, cfg.train.micro_batch_size)
    return GRPOTrainer(cfg, ctx, data)


def _train(overrides, world_size, steps, reordered=None):
    """Per step: loss, metrics and {(prompt position, completion index): tokens}; the final weights.
    reordered: the noise-floor run of that scope (one rank, tests/noise_floor.py)."""
    from engine.model.parallelize import gather_full_state_dict

    trainer = _trainer(overrides, world_size, steps, PARITY_PROMPTS)
    floor = Reordered(trainer, reordered) if reordered else None
    losses, extras, samples = [], [], []
    for step in range(steps):
        rollouts = trainer.microbatches(step)
        prompts = [p for j in range(trainer.num_microbatches)
                   for p in trainer.data.microbatch(step, j, trainer.dp.rank, trainer.dp.size)]
        rows = torch.cat([r.tokens for r in rollouts]).tolist()
        group = trainer.cfg.grpo.group_size
        samples.append({(prompt.position, c): rows[i * group + c] for i, prompt in enumerate(prompts)
                        for c in range(group)})
        result = trainer.train_step(step, floor.microbatches(step, rollouts) if floor else rollouts)
        losses.append(result.loss)
        extras.append(dict(result.extra))
    state = gather_full_state_dict(trainer.chunks, trainer.ctx)
    if floor is not None:
        state = floor.state(state)
    return losses, extras, samples, {k: v.numpy() for k, v in state.items()} if trainer.ctx.rank == 0 else None


def _layouts_worker(rank, world_size, layouts, steps):
    return [_train([*PARITY, *layout], world_size, steps) for layout in layouts]


def test_prompts_are_read_and_bad_lines_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n\n" + json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    assert read_prompts([path], ByteTokenizer(), 8) == [((50, 43, 50, 61), "4"), ((120,), "y")]
    data = PromptData(read_prompts([path], ByteTokenizer(), 8), 1234, 4, 2)
    assert {p.position for p in data.microbatch(1, 0, 1, 2)} == {6, 7}  # step 1, dp rank 1: positions 6, 7
    for line, message in [({"prompt": "a"}, r"prompts.jsonl:1: expected text fields \['prompt', 'answer'\]"),
                          ({"prompt": "too long", "answer": "1"}, "prompts.jsonl:1: the prompt is 8 tokens; 1 to 4"),
                          ({"prompt": "", "answer": "1"}, "prompts.jsonl:1: the prompt is 0 tokens")]:
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(DataError, match=message):
            read_prompts([path], ByteTokenizer(), 4)


def test_prompts_get_bos_or_the_chat_templates_generation_prompt(tmp_path):
    """As TRL's GRPO: text after the tokenizer's BOS; messages rendered with add_generation_prompt."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_fixtures import write_llama3_tokenizer
    from data_pipeline.tokenizer import get_tokenizer

    directory = write_llama3_tokenizer(tmp_path / "tokenizer")
    messages = [{"role": "system", "content": "Count."}, {"role": "user", "content": "one two"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "one two", "answer": "three"}) + "\n"
                    + json.dumps({"prompt": messages, "answer": "three"}) + "\n")
    (text, _), (chat, _) = read_prompts([path], get_tokenizer(str(directory)), 64)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert list(text) == theirs("one two")["input_ids"]
    assert list(chat) == theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert read_prompts([path], ByteTokenizer(), 64)[1][0] == tuple(b"system: Count.\nuser: one two\nassistant: ")


def test_rewards_by_hand():
    assert exact_match(" 7\n", "7") == 1.0 and exact_match("77", "7") == 0.0 and exact_match("", "7") == 0.0
    assert contains("the answer is 7.", "7") == 1.0 and contains("seven", "7") == 0.0


def test_group_advantages_and_loss_by_hand():
    from stages.grpo.objective import clipped_policy_loss, group_advantages, k3_kl

    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # Group 1: mean 1/4, Bessel-corrected std sqrt((3/4)^2 + 3 (1/4)^2) / 3) = 1/2; group 2: all equal.
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(rewards), expected / (0.5 + 1e-4))
    assert torch.equal(group_advantages(rewards, scale=False), expected)
    logp, old = torch.tensor([math.log(0.6), math.log(0.6)]), torch.tensor([math.log(0.4), math.log(0.4)])
    # ratio 1.5: clipped to 1.2 for a positive advantage (the smaller gain), not for a negative one.
    assert torch.allclose(clipped_policy_loss(logp, old, torch.tensor([1.0, -1.0]), 0.2), torch.tensor([-1.2, 1.5]))
    assert k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(math.log(2) - 0.5)
    assert k3_kl(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0


def test_token_logps_are_log_softmax_of_the_targets():
    trainer = _trainer([*PARITY, "grpo.reward=exact_match"], 1, 1, ["ab"])
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = trainer.model(tokens[:, :-1])
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert torch.allclose(trainer.token_logps(logits, tokens[:, 1:]), expected, atol=1e-5)


def test_rollouts_are_deterministic_and_stop_at_eod():
    trainer = _trainer(PARITY, 1, 1, PARITY_PROMPTS)
    prompts = trainer.data.microbatch(0, 0, 0, 1)
    first, again, later = trainer.rollout(0, prompts), trainer.rollout(0, prompts), trainer.rollout(1, prompts)
    assert torch.equal(first.tokens, again.tokens) and not torch.equal(first.tokens, later.tokens)
    assert len({tuple(row) for row in first.tokens.tolist()}) == 4  # the group's completions differ
    start = len(prompts[0].tokens)
    assert first.loss_mask[:, start - 1:start + 5].eq(1).all() and first.loss_mask.sum() == 4 * 6
    # A policy that always says EOD: every completion stops at once and the mask follows.
    policy = trainer.chunks[0]
    trainer.chunks[0] = lambda inputs, positions, **cache: policy(inputs, positions, **cache).index_add(
        -1, torch.tensor([256]), torch.full((*inputs.shape, 1), 1e4))
    short = trainer.rollout(0, prompts)
    trainer.chunks[0] = policy
    assert short.completion_lengths.tolist() == [1] * 4 and short.tokens[:, start].eq(256).all()
    assert short.loss_mask.sum() == 4 and short.rewards.tolist() == [1.0] * 4  # "" scores 1 in ascii_share


def test_a_positive_advantage_gains_probability():
    from stages.grpo.trainer import RolloutBatch

    trainer = _trainer([*PARITY, "grpo.kl_coeff=0"], 1, 1, ["ab"])
    tokens = torch.full((2, 17), 257)
    tokens[:, :3] = torch.tensor([[97, 98, 120], [97, 98, 121]])  # "ab" -> "x" and "ab" -> "y"
    mask = torch.zeros(2, 16)
    mask[:, 1] = 1.0
    batch = RolloutBatch(tokens, mask, torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]), torch.tensor([1, 1]))

    def logps():
        with torch.no_grad():
            return (trainer.token_logps(trainer.model(tokens[:, :-1]), tokens[:, 1:]) * mask).sum(1)

    before = logps()
    result = trainer.train_step(0, [batch])
    after = logps()
    assert after[0] > before[0] and after[1] < before[1]
    assert result.loss == pytest.approx(0.0, abs=1e-7)  # ratio 1, advantages +-1 over one token each
    assert result.extra["accuracy"] == 0.5 and result.extra["completion_length"] == 1.0


def test_the_step_guard_only_flags_non_finite_steps():
    from engine.config import ResilienceConfig
    from stages.grpo.objective import PolicyGradientAnomalyDetector
    from engine.resilience.guard import StepGuard

    trainer = _trainer(PARITY, 1, 1, PARITY_PROMPTS)
    trainer.guard = StepGuard(ResilienceConfig(spike_window=3), trainer, trainer.dp)
    detector = trainer.guard.detector
    assert isinstance(detector, PolicyGradientAnomalyDetector)
    for loss, grad_norm in [(0.0, 0.0), (-0.01, 1e-6), (0.0, 0.0)]:  # tied rewards: no gradient
        detector.accept(loss, grad_norm)
    assert detector.judge(0.2, 3.0) is None  # the first rewarded batch is no spike
    assert detector.judge(float("nan"), 1.0) == "loss is nan" and detector.judge(0.0, float("inf")) == "grad norm is inf"


def test_toy_task_is_learnt_from_scratch():
    toy = [*SMALL, "model.seq_length=8", "train.micro_batch_size=4", "train.global_batch_size=4",
           "grpo.inputs=[toy]", "grpo.group_size=8", "grpo.max_new_tokens=1", "optim.lr=1e-2",
           "optim.warmup_steps=0", "optim.schedule=constant"]
    trainer = _trainer(toy, 1, 20, TOY_PROMPTS, answer="7")
    curve = [trainer.train_step(step).extra["reward_mean"] for step in range(20)]
    print("toy task reward curve:", " ".join(f"{r:.2f}" for r in curve))
    assert sum(curve[:3]) / 3 < 0.1 and sum(curve[-3:]) / 3 > 0.75


@pytest.fixture(scope="module")
def reference():
    return _train(PARITY, 1, 4)


def _losses_and_state(run):
    losses, _, _, state = run
    return losses, {k: torch.from_numpy(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def floors(reference):
    """{floor scope: the reordered run} (tests/noise_floor.py)."""
    runs = {scope: _train(PARITY, 1, 4, reordered=scope) for scope in ("microbatches", "all")}
    for scope, run in runs.items():
        assert run[2] == reference[2], f"the {scope} floor run sampled other completions: its math differs"
    return runs


def _metric_tolerance(key, reference, reordered) -> tuple[float, float]:
    """(floor, tolerance) of a per-step metric, absolute, as tests/noise_floor.py derives them."""
    ref, other = [e[key] for e in reference[1]], [e[key] for e in reordered[1]]
    floor = max(abs(a - b) for a, b in zip(other, ref))
    return floor, max(FACTOR * floor, MIN_ULPS * EPS32 * max(abs(x) for x in ref))


@pytest.mark.distributed
def test_dp2_and_tp2_sample_and_train_like_the_single_rank_run(reference, floors):
    from tests.distributed import run_distributed

    layouts = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"]}
    per_rank = run_distributed(_layouts_worker, 2, list(layouts.values()), 4, timeout=300)
    _, ref_extras, ref_samples, _ = reference
    assert len({len(s) for step in ref_samples for s in step.values()}) == 1  # all rows [seq + 1]
    lengths = {e["completion_length"] for e in ref_extras}
    assert len(lengths) > 1, f"completion lengths {lengths}: the parity run should see EOD end some completions"
    for index, name in enumerate(layouts):
        losses, extras, _, _ = per_rank[0][index]
        for step, ref_step in enumerate(ref_samples):  # every rank's rollouts, merged by prompt position
            merged = {key: row for rank in per_rank for key, row in rank[index][2][step].items()}
            assert merged == ref_step, f"{name}: step {step} sampled other completions"
        print(f"grpo {name}: losses {['%.6f' % x for x in losses]}")
        floor = floors[floor_scope([*PARITY, *layouts[name]])]
        # GRPO's loss crosses zero (advantages have mean 0): compared absolutely.
        tolerance = Tolerance.measured(_losses_and_state(reference), _losses_and_state(floor), relative_loss=False)
        metrics = {key: _metric_tolerance(key, reference, floor) for key in ("reward_mean", "kl")}
        tolerance.check(f"grpo {name}", *_losses_and_state(per_rank[0][index]), *_losses_and_state(reference))
        for key, (metric_floor, limit) in metrics.items():
            diff = max(abs(extra[key] - ref_extra[key]) for extra, ref_extra in zip(extras, ref_extras))
            print(f"grpo {name}: max {key} diff {diff:.2e} (tolerance {limit:.2e}, floor {metric_floor:.2e})")
            assert diff <= limit, (name, key)
    assert ref_extras[0]["kl"] == 0.0 and ref_extras[-1]["kl"] > 0.0  # the policy leaves the reference


@pytest.mark.parametrize("command, sets, message", [
    ("grpo", ["parallel.pp=2"], "parallel.pp=2: GRPO runs with pp=1 and cp=1"),
    ("grpo", ["parallel.cp=2"], "parallel.cp=2: GRPO runs with pp=1 and cp=1"),
    ("grpo", ["precision.dtype=fp8"], "precision.dtype='fp8': GRPO runs in bf16 or fp32"),
    ("grpo", ["grpo.max_new_tokens=128"], "grpo.max_new_tokens=128: must be in 1..model.seq_length-1 = 127"),
    ("grpo", ["grpo.reward=nowhere:reward"], "grpo.reward='nowhere:reward': cannot import 'reward' from 'nowhere'"),
    ("grpo", ["sft.inputs=[y.jsonl]"], "a run trains fine-tuning examples, preference pairs or prompts with answers, only one of them"),
    ("grpo", None, "grpo.inputs=[]: `apogee grpo` needs JSONL files of prompts"),
    ("pretrain", [], "grpo.inputs=['x.jsonl']: prompts with answers are trained by `apogee grpo`"),
    ("sft", [], "grpo.inputs=['x.jsonl']: prompts with answers are trained by `apogee grpo`"),
    ("dpo", [], "grpo.inputs=['x.jsonl']: prompts with answers are trained by `apogee grpo`"),
])
def test_bad_grpo_runs_are_refused(tmp_path, capsys, command, sets, message):
    from cli.main import main

    sets = [] if sets is None else ["grpo.inputs=[x.jsonl]", *sets]
    status = main([command, "--nproc", "2", "--run-dir", str(tmp_path / "r"), *(["--set", *sets] if sets else [])])
    stderr = capsys.readouterr().err
    assert status == 2 and message in stderr, stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.distributed
def test_apogee_grpo_runs_from_a_checkpoint_on_two_ranks(tmp_path):
    small = [*SMALL, "model.seq_length=16", "train.micro_batch_size=1", "optim.warmup_steps=1"]
    examples = tmp_path / "sft.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"say {i % 10}:", "response": str(i % 10)}) + "\n"
                                for i in range(16)))
    sft = tmp_path / "sft"
    done = subprocess.run([sys.executable, "-m", "cli.main", "sft", "--run-dir", str(sft), "--set", *small,
                           "train.global_batch_size=4", "train.steps=2", f"sft.inputs=[{examples}]"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}:", "answer": str(i)}) + "\n" for i in range(10)))
    run = tmp_path / "grpo"
    done = subprocess.run([sys.executable, "-m", "cli.main", "grpo", "--nproc", "2", "--run-dir", str(run),
                           "--set", *small, "train.global_batch_size=2", "train.steps=3", "grpo.group_size=4",
                           "grpo.max_new_tokens=3", f"grpo.inputs=[{prompts}]", f"train.init_from={sft}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["kl"] == 0.0  # the policy starts as the reference (both from the SFT checkpoint)
    for record in records:
        assert {"reward_mean", "accuracy", "completion_length", "kl"} <= set(record)
        assert 1.0 <= record["completion_length"] <= 3.0 and 0.0 <= record["accuracy"] <= 1.0
    assert (run / "checkpoints" / "latest").exists()
