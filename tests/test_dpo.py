"""DPO (stages/dpo.py): the pair loss against the reference model, every layout on the
single-rank run, and `apogee dpo` end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import DataError
from data_pipeline.microbatch import Microbatch
from data_pipeline.preference import read_pairs
from data_pipeline.tokenizer import ByteTokenizer
from tests.noise_floor import Reordered, Tolerance, floor_scope
from tests.parity import FakeData, parity_config

ROOT = Path(__file__).resolve().parents[1]
DPO = ["dpo.inputs=[pairs]", "dpo.beta=0.5", "optim.lr=1e-3", "optim.eps=1e-4"]


class PairedFakeData:
    """Preference microbatches from the parity data: the chosen response continues the sample's
    pattern, the rejected one is the same prompt followed by uniform noise (a preference to learn)."""

    def __init__(self, cfg):
        self.data = FakeData.for_config(cfg, masked=True)

    def microbatch(self, step, microbatch, dp_rank, dp_size, skip_steps=()):
        tokens, mask = self.data.microbatch(step, microbatch, dp_rank, dp_size, skip_steps)[:2]
        mbs = tokens.shape[0]
        first = step * self.data.global_batch_size + microbatch * mbs * dp_size + dp_rank * mbs
        # Noise per global sample position, so every layout rejects the same sequences.
        noise = torch.stack([torch.randint(0, self.data.vocab_size, tokens.shape[1:],
                                           generator=torch.Generator().manual_seed(first + i)) for i in range(mbs)])
        # Response positions (mask on target t covers token t + 1) take the noise.
        response = torch.cat([torch.zeros(mask.shape[0], 1), mask], dim=1).bool()
        rejected = tokens.where(~response, noise)
        return Microbatch(torch.cat([tokens, rejected]), torch.cat([mask, mask]))


def _train(overrides, world_size, steps, reordered=None):
    """(losses, reward accuracies, state dict as numpy); reordered: the noise-floor run of that scope (one rank)."""
    from stages.dpo import DPOTrainer
    from engine.model.parallelize import gather_full_state_dict
    from parallel.topology import ParallelContext

    cfg = parity_config(overrides, world_size, steps, stage="dpo")
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
    trainer = DPOTrainer(cfg, ctx, PairedFakeData(cfg))
    floor = Reordered(trainer, reordered, blocks=2) if reordered else None  # blocks=2: chosen and rejected stay paired
    results = [trainer.train_step(step, floor.microbatches(step, trainer.microbatches(step)) if floor else None)
               for step in range(steps)]
    state = gather_full_state_dict(trainer.chunks, ctx)
    if floor is not None:
        state = floor.state(state)
    return ([r.loss for r in results], [trainer.record(r)["reward_accuracy"] for r in results],
            {k: v.numpy() for k, v in state.items()} if ctx.rank == 0 else None)


def _worker(rank, world_size, overrides, steps):
    return _train(overrides, world_size, steps)


def test_pairs_are_read_and_bad_lines_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "chosen": "4", "rejected": "5"}) + "\n")
    chosen, rejected = read_pairs([path], ByteTokenizer())
    assert chosen[0][0][:4] == rejected[0][0][:4] and chosen[0][1] == [0, 0, 0, 0, 1, 1]
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: expected text fields \['prompt', 'chosen', 'rejected'\]"):
        read_pairs([path], ByteTokenizer())


def test_conversational_pairs_train_the_chosen_and_rejected_turns_only(tmp_path):
    """TRL's conversational form: the prompt (an earlier assistant turn included) is context."""
    tokenizer = ByteTokenizer()
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2="}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                                "rejected": [{"role": "assistant", "content": "five"}]}) + "\n")
    (chosen,), (rejected,) = read_pairs([path], tokenizer)
    for (tokens, trained), answer in ((chosen, "4"), (rejected, "five")):
        assert bytes(t for t in tokens if t < 256).decode() == "user: hi\nassistant: youser: 2+2=\nassistant: " + answer
        assert [t for t, m in zip(tokens, trained) if m] == list(answer.encode()) + [tokenizer.eos_id]


@pytest.fixture(scope="module")
def reference():
    return _train(DPO, 1, 8)


def _losses_and_state(run):
    losses, _, state = run
    return losses, {k: torch.from_numpy(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def tolerances(reference):
    """{floor scope: Tolerance} (tests/noise_floor.py)."""
    return {scope: Tolerance.measured(_losses_and_state(reference), _losses_and_state(_train(DPO, 1, 8, reordered=scope)))
            for scope in ("microbatches", "all")}


def test_first_step_loss_is_log_2_and_training_prefers_chosen(reference):
    losses, accuracy, _ = reference
    # The policy starts equal to the reference: every margin is 0 and -log sigmoid(0) = log 2.
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)
    assert accuracy[0] == 0.0  # a zero margin prefers nothing
    assert losses[-1] < 0.5 * losses[0] and accuracy[-1] == 1.0  # the pattern beats the noise


LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "cp2": ["parallel.cp=2"]}


def _layouts_worker(rank, world_size, layouts, steps):
    return [_train(overrides, world_size, steps) for overrides in layouts]


@pytest.fixture(scope="module")
def layout_runs():
    """Every layout's run, in one 2-rank spawn."""
    from tests.distributed import run_distributed

    runs = run_distributed(_layouts_worker, 2, [[*DPO, *layout] for layout in LAYOUTS.values()], 8, timeout=400)[0]
    return dict(zip(LAYOUTS, runs))


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_layouts_match_the_single_rank_run(layout, layout_runs, reference, tolerances):
    run = layout_runs[layout]
    tolerances[floor_scope([*DPO, *LAYOUTS[layout]])].check(f"dpo {layout}", *_losses_and_state(run),
                                                            *_losses_and_state(reference))
    assert run[1] == reference[1]  # the same reward accuracy at every step


@pytest.mark.parametrize("sets, message", [
    (["dpo.inputs=[x.jsonl]", "parallel.pp=2"], "parallel.pp=2: DPO runs with pp=1"),
    (["dpo.inputs=[x.jsonl]", "sft.inputs=[y.jsonl]"], "only one of them"),
    ([], "dpo.inputs=[]: `apogee dpo` needs JSONL files of preference pairs"),
])
def test_bad_dpo_runs_are_refused(tmp_path, sets, message):
    done = subprocess.run([sys.executable, "-m", "cli.main", "dpo", "--nproc", "2", "--run-dir", str(tmp_path / "r"),
                           *(["--set", *sets] if sets else [])], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.distributed
def test_apogee_dpo_runs_from_a_checkpoint(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(32):
            a, b = i % 7, i % 5
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    small = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=16", "train.micro_batch_size=2",
             "train.global_batch_size=8", "logging.tensorboard=false", "optim.warmup_steps=1"]
    sft = tmp_path / "sft"
    examples = tmp_path / "sft.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"{i % 7}+{i % 5}=", "response": str(i % 7 + i % 5)}) + "\n"
                                for i in range(32)))
    done = subprocess.run([sys.executable, "-m", "cli.main", "sft", "--run-dir", str(sft), "--set", *small,
                           "train.steps=4", "checkpoint.interval=4", f"sft.inputs=[{examples}]"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "dpo"
    done = subprocess.run([sys.executable, "-m", "cli.main", "dpo", "--nproc", "2", "--run-dir", str(run),
                           "--set", *small, "train.steps=6", f"dpo.inputs=[{pairs}]", f"train.init_from={sft}",
                           "optim.lr=1e-3"],  # the preset's 1e-6 would barely move in 6 steps
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the start
    assert records[-1]["loss"] < records[0]["loss"] and "reward_accuracy" in records[-1]


def test_dpo_loss_equals_transformers_on_llama3_chat_pairs_in_fp32(tmp_path):
    """TRL's definition, computed by transformers on the same weights: conversational pairs rendered
    with Llama 3's chat template, the prompt with its generation prompt, each response's log-prob
    the sum over the tokens after it; the policy one DPO step away from the reference."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from engine.model.hf_interop import save_hf
    from parallel.topology import ParallelContext
    from stages.dpo import DPOStage, DPOTrainer
    from tests.hf_fixtures import CONVERSATIONS, write_llama3_tokenizer
    from tests.parity import stage_config

    directory = write_llama3_tokenizer(tmp_path / "tokenizer")
    pairs = [(c[:-1], [c[-1]], [{"role": "assistant", "content": "the cat sat on the mat."}]) for c in CONVERSATIONS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    beta, n = 0.5, len(pairs)
    cfg = stage_config(None, ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.seq_length=96",
                              "model.vocab_size=320", f"data.tokenizer={directory}", f"dpo.inputs=[{path}]",
                              f"dpo.beta={beta}", "optim.lr=1e-3", f"train.micro_batch_size={n}",
                              f"train.global_batch_size={n}"], 1, "dpo")
    trainer = DPOTrainer(cfg, ParallelContext.single(), DPOStage().build_data(cfg))
    save_hf(trainer.model, cfg.model, tmp_path / "reference")
    assert trainer.train_step(0).loss == pytest.approx(math.log(2), rel=1e-6)
    save_hf(trainer.model, cfg.model, tmp_path / "policy")
    ours = trainer.train_step(1).loss

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    models = {name: transformers.LlamaForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
              for name in ("policy", "reference")}

    def logp(model, ids, start):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return F.log_softmax(logits[start - 1:-1], dim=-1).gather(-1, torch.tensor(ids[start:])[:, None]).sum()

    losses = []
    for prompt, chosen, rejected in pairs:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        ratios = []
        for response in (chosen, rejected):
            ids = tokenizer.apply_chat_template(prompt + response, return_dict=False)
            assert ids[:len(prompt_ids)] == prompt_ids and len(ids) <= cfg.model.seq_length + 1  # nothing truncated
            ratios.append(logp(models["policy"], ids, len(prompt_ids)) - logp(models["reference"], ids, len(prompt_ids)))
        losses.append(-F.logsigmoid(beta * (ratios[0] - ratios[1])))
    reference = torch.stack(losses).mean().item()
    relative = abs(ours - reference) / reference
    print(f"DPO loss at step 1: ours {ours:.8f}, transformers {reference:.8f}, relative diff {relative:.2e}")
    assert abs(reference - math.log(2)) > 1e-3 and relative <= 1e-5
