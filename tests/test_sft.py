"""Supervised fine-tuning: examples -> tokens and loss masks, the masked loss in every layout,
starting from pre-trained weights, and `apogee sft` end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import DataError
from data_pipeline.sft import SFTData, encode_example, read_examples
from data_pipeline.tokenizer import ByteTokenizer
from tests.parity import FakeData, assert_matches_reference, parity_config, train_layouts

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


def test_prompt_is_context_and_response_plus_eod_is_trained():
    tokens, trained = encode_example({"prompt": "Q?", "response": "ok"}, TOK)
    assert tokens == [ord("Q"), ord("?"), ord("o"), ord("k"), TOK.eod_id]
    assert trained == [0, 0, 1, 1, 1]


def test_chat_messages_train_assistant_turns_only():
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yo"}]}
    tokens, trained = encode_example(record, TOK)
    text = bytes(t for t in tokens if t < 256).decode()
    assert text == "system: s\nuser: hi\nassistant: yo"
    assert tokens[-1] == TOK.eod_id
    trained_text = bytes(t for t, m in zip(tokens, trained) if m and t < 256).decode()
    assert trained_text == "yo" and trained[-1] == 1 and sum(trained) == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", r"data.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}', r"data.jsonl:2: expected text fields 'prompt' and 'response' \(or 'messages'\); found keys \['prompt'\]"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"data.jsonl:2: no assistant message"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"data.jsonl:2: messages\[0\] = .*expected .*one of \['system', 'user', 'assistant'\]"),
    ("[1, 2]", r"data.jsonl:2: expected a JSON object, found list"),
])
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_examples([path], TOK)


def test_samples_pad_truncate_and_reshuffle_per_epoch():
    examples = [([1, 2, 3], [0, 1, 1]), ([4] * 20, [0] * 5 + [1] * 15), ([7, 8], [0, 1])]
    data = SFTData(examples, seq_length=8, seed=3, global_batch_size=4, micro_batch_size=2, pad_id=99)
    seen = {}
    for p in range(6):
        tokens, mask = data.sample(p)
        assert tokens.shape == (9,) and mask.shape == (8,)
        seen.setdefault(p // 3, []).append(tokens[0].item())
        length = min(9, len(examples[[e[0][0] for e in examples].index(tokens[0].item())][0]))
        assert (tokens[length:] == 99).all() and (mask[length - 1:] == 0).all()  # padding never trains
    assert sorted(seen[0]) == sorted(seen[1]) == [1, 4, 7]  # every example once per epoch
    short = data.sample([p for p in range(3) if data.sample(p)[0][0] == 1][0])
    assert short[1][:2].tolist() == [1.0, 1.0]  # targets 2 and 3 are response tokens
    tokens, mask = data.microbatch(step=1, microbatch=1, dp_rank=0, dp_size=1)[:2]
    assert torch.equal(tokens[0], data.sample(1 * 4 + 2)[0])  # the pre-training loader's addressing


def test_masked_loss_is_the_mean_over_trained_tokens_only():
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config([], 1, 1)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg, masked=True))
    microbatches = trainer.microbatches(0)
    expected_sum, count = 0.0, 0
    with torch.no_grad():
        for tokens, mask, *_ in microbatches:
            logits = trainer.model(tokens[:, :-1])
            per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1),
                                                          reduction="none")
            expected_sum += (per_token * mask.reshape(-1)).sum().item()
            count += int(mask.sum())
    assert 0 < count < cfg.train.global_batch_size * cfg.model.seq_length
    result = trainer.train_step(0, microbatches)
    assert result.loss == pytest.approx(expected_sum / count, rel=1e-6)
    assert trainer.step_tokens == count


STEPS = 8
# Masked targets leave some embedding rows with gradients that are zero up to rounding; Adam's
# first steps turn such noise into updates of ~lr * noise / eps (at the parity eps of 1e-8, tp2
# weights drifted 1.3e-5 from single-rank while every loss agreed to the last bit). The measured
# floor sees the same amplification; a larger eps keeps it, and with it the tolerance, small
# without touching what is tested: the mask math.
EPS = "optim.eps=1e-6"
SPAWNS = {2: {"dp2": ["parallel.dp=2", EPS], "tp2": ["parallel.tp=2", EPS], "pp2": ["parallel.pp=2", EPS],
              "cp2": ["parallel.cp=2", EPS]}}


@pytest.mark.distributed
def test_masked_layouts_match_the_single_rank_run(single_rank):
    """Ranks hold different numbers of trained tokens; the global count divides every rank's loss."""
    reference = single_rank.reference([EPS], STEPS, masked=True)
    runs = {name: run for name, run in zip(SPAWNS[2], train_layouts(list(SPAWNS[2].values()), 2, STEPS, masked=True))}
    assert reference.losses[-1] < reference.losses[0] - 0.3
    for name, run in runs.items():
        tolerance = single_rank.tolerance([EPS], STEPS, masked=True, layout=SPAWNS[2][name])
        assert_matches_reference(f"masked {name}", run, reference, tolerance)


def test_init_from_a_checkpoint_of_another_layout_loads_its_weights(tmp_path):
    from engine.state.checkpoint import Checkpointer
    from engine.state.init_from import initialize_from
    from engine.model.parallelize import gather_full_state_dict
    from engine.state.resume import checkpoint_store, run_id
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config(["precision.dtype=bf16"], 1, 2)
    pre = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg))
    for step in range(2):
        pre.train_step(step)
    run = tmp_path / "pre"
    Checkpointer(checkpoint_store(cfg, run), 0, 1, run_id(run)).save(pre, 2, pre.checkpoint_metadata(), blocking=True)
    fresh_cfg = parity_config(["precision.dtype=bf16", "seed=99"], 1, 2)
    fine = Trainer(fresh_cfg, ParallelContext.single(), FakeData.for_config(fresh_cfg, masked=True))
    assert initialize_from(fine, str(run / "checkpoints")) == "apogee weights"
    ctx = ParallelContext.single()
    loaded, source = gather_full_state_dict(fine.chunks, ctx), gather_full_state_dict(pre.chunks, ctx)
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    masters = fine.optimizer.master_params
    assert all(torch.equal(masters[k], source[k].float()) for k in source)  # fresh optimizer from these weights
    fine.train_step(0)  # and it trains
    # The same weights through a Hugging Face directory.
    from engine.model.hf_interop import save_hf

    save_hf(pre.model, cfg.model, tmp_path / "hf")
    from_hf = Trainer(fresh_cfg, ParallelContext.single(), FakeData.for_config(fresh_cfg, masked=True))
    assert initialize_from(from_hf, str(tmp_path / "hf")) == "hf weights"
    loaded = gather_full_state_dict(from_hf.chunks, ctx)
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def _write_examples(path: Path, n: int = 64) -> Path:
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 7, i % 5
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipeline.words_corpus import make_dataset
    return make_dataset(tmp_path_factory.mktemp("corpus"))


SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=32", "train.micro_batch_size=4",
         "train.global_batch_size=8", "logging.tensorboard=false"]


@pytest.mark.distributed
def test_apogee_sft_starts_from_a_pretrained_run_and_learns(tmp_path, dataset):
    pre = tmp_path / "pre"
    done = _cli("pretrain", "--run-dir", str(pre), "--set", *SMALL, "train.steps=3", "checkpoint.interval=3",
                f"data.inputs=[{dataset}]", f"data.cache_dir={tmp_path}/cache")
    assert done.returncode == 0, done.stderr
    examples = _write_examples(tmp_path / "sums.jsonl")
    run = tmp_path / "sft"
    done = _cli("sft", "--nproc", "2", "--run-dir", str(run), "--set", *SMALL, "train.steps=30",
                f"sft.inputs=[{examples}]", f"train.init_from={pre}/checkpoints", "optim.warmup_steps=2",
                "optim.lr=3e-3")  # a learning rate that shows learning in 30 steps (the preset's is 2e-5)
    assert done.returncode == 0, done.stderr
    assert f"weights from {pre}/checkpoints (apogee weights)" in done.stdout
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "init_from" for e in events)


@pytest.mark.parametrize("sets, message", [
    ([], "sft.inputs=[]: `apogee sft` needs JSONL files of examples"),
    (["sft.inputs=[nowhere.jsonl]"], "sft.inputs: 'nowhere.jsonl' is not a file"),
    (["sft.inputs=[README.md]", "train.init_from=nowhere"], "train.init_from='nowhere': not a Hugging Face directory"),
])
def test_bad_sft_input_is_refused_before_any_rank_starts(tmp_path, sets, message):
    done = _cli("sft", "--run-dir", str(tmp_path / "run"), "--set", *SMALL, *sets)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_pretrain_refuses_sft_inputs(tmp_path):
    done = _cli("pretrain", "--run-dir", str(tmp_path / "run"), "--set", "sft.inputs=[x.jsonl]")
    assert done.returncode == 2 and "fine-tuning examples are trained by `apogee sft`" in done.stderr


# ---------------------------------------------------------------------------------------------
# Tokenizer conventions and chat templates, against transformers (a Llama-3-like tokenizer built
# locally: tests/hf_fixtures.py)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(tokenizer directory with Llama 3's template, one with generation blocks, transformers)."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_fixtures import LLAMA3_GENERATION_TEMPLATE, write_llama3_tokenizer

    root = tmp_path_factory.mktemp("llama3")
    return (write_llama3_tokenizer(root / "plain"), write_llama3_tokenizer(root / "generation", LLAMA3_GENERATION_TEMPLATE),
            transformers)


def test_chat_ids_equal_apply_chat_template_and_turns_are_found_as_transformers_finds_them(llama3):
    """Ids are apply_chat_template's; with {% generation %} blocks the trained tokens are transformers'
    assistant mask, and Llama 3's own template (no blocks) finds the same tokens prefix by prefix."""
    from data_pipeline.sft import encode_chat
    from data_pipeline.tokenizer import get_tokenizer
    from tests.hf_fixtures import CONVERSATIONS

    plain_dir, generation_dir, transformers = llama3
    plain, generation = get_tokenizer(str(plain_dir)), get_tokenizer(str(generation_dir))
    theirs = transformers.AutoTokenizer.from_pretrained(str(generation_dir))
    eot = theirs.convert_tokens_to_ids("<|eot_id|>")
    for conversation in CONVERSATIONS:
        reference = theirs.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        ids, trained = encode_chat(conversation, generation)
        assert (ids, trained) == (reference["input_ids"], reference["assistant_masks"])
        assert encode_chat(conversation, plain) == (ids, trained)
        assert ids[0] == theirs.bos_token_id and sum(trained) > 0
        # Each trained span is an assistant's content and the <|eot_id|> that ends its turn.
        ends = [t for t, (m, n) in enumerate(zip(trained, trained[1:] + [0])) if m and not n]
        assert [ids[t] for t in ends] == [eot] * sum(m["role"] == "assistant" for m in conversation)
        assert theirs.decode([t for t, m in zip(ids, trained) if m]) == "".join(
            m["content"].strip() + "<|eot_id|>" for m in conversation if m["role"] == "assistant")


def test_prompt_response_text_gets_bos_and_the_declared_eos(llama3):
    from data_pipeline.sft import encode_example
    from data_pipeline.tokenizer import get_tokenizer

    plain_dir, _, transformers = llama3
    theirs = transformers.AutoTokenizer.from_pretrained(str(plain_dir))
    tokens, trained = encode_example({"prompt": "two plus two is", "response": " four."}, get_tokenizer(str(plain_dir)))
    prompt = theirs("two plus two is")["input_ids"]  # BOS + prompt, as TRL tokenises it
    answer = theirs(" four.", add_special_tokens=False)["input_ids"] + [theirs.eos_token_id]
    assert tokens == prompt + answer and trained == [0] * len(prompt) + [1] * len(answer)
    assert theirs.convert_ids_to_tokens(tokens[-1]) == "<|eot_id|>"


def test_a_conversation_and_its_continuation_trains_the_continuation_only(llama3):
    from data_pipeline.sft import encode_chat, encode_example
    from data_pipeline.tokenizer import get_tokenizer
    from tests.hf_fixtures import CONVERSATIONS

    tokenizer = get_tokenizer(str(llama3[0]))
    conversation = CONVERSATIONS[1]  # two assistant turns
    whole_ids, whole_trained = encode_chat(conversation, tokenizer)
    ids, trained = encode_example({"prompt": conversation[:3], "response": conversation[3:]}, tokenizer)
    second = len(tokenizer.encode(tokenizer.chat_template.render(conversation[:3], add_generation_prompt=True)))
    assert ids == whole_ids and not any(trained[:second]) and trained[second:] == whole_trained[second:]
    assert 0 < sum(trained) < sum(whole_trained)


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__ }}", "the chat template fails"),  # the sandbox refuses Python internals
    ("{% set ns = namespace(_x=1) %}{{ ns }}", "underscore"),
    ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}{% endfor %}",
     r"messages\[1\]: the chat template .* does not render the conversation up to this assistant turn"),
    ("{% for m in messages %}", "does not compile"),
])
def test_unsafe_or_unusable_templates_are_refused(tmp_path, template, message):
    from data_pipeline.sft import encode_chat
    from data_pipeline.tokenizer import get_tokenizer
    from tests.hf_fixtures import write_llama3_tokenizer

    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match=message):
        encode_chat(conversation, get_tokenizer(str(write_llama3_tokenizer(tmp_path, template))))


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_sft_loss_equals_transformers_on_llama3_chat_in_fp32(tmp_path, llama3):
    """TRL's definition, computed by transformers: labels are the assistant mask of
    apply_chat_template on the same conversations, the loss LlamaForCausalLM's mean over them."""
    from engine.model.hf_interop import save_hf
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext
    from stages.sft import SFTStage
    from tests.hf_fixtures import CONVERSATIONS
    from tests.parity import stage_config

    _, directory, transformers = llama3
    examples = tmp_path / "chat.jsonl"
    examples.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    n = len(CONVERSATIONS)
    cfg = stage_config(None, ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.seq_length=80",
                              "model.vocab_size=320", "model.norm_eps=1e-6", "model.rope_base=500000.0",
                              f"data.tokenizer={directory}", f"sft.inputs=[{examples}]", "optim.lr=1e-3",
                              f"train.micro_batch_size={n}", f"train.global_batch_size={n}"], 1, "sft")
    trainer = Trainer(cfg, ParallelContext.single(), SFTStage().build_data(cfg))
    save_hf(trainer.model, cfg.model, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    rows, labels = [], []
    for conversation in CONVERSATIONS:
        chat = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        pad = cfg.model.seq_length + 1 - len(chat["input_ids"])
        rows.append(chat["input_ids"] + [tokenizer.eos_token_id] * pad)
        labels.append([t if m else -100 for t, m in zip(chat["input_ids"], chat["assistant_masks"])] + [-100] * pad)
    with torch.no_grad():
        reference = theirs(torch.tensor(rows), labels=torch.tensor(labels)).loss.item()
    ours = trainer.train_step(0).loss
    print(f"SFT loss: ours {ours:.8f}, transformers {reference:.8f}, relative diff {_relative(ours, reference):.2e}")
    assert _relative(ours, reference) <= 1e-5
