"""engine/eval/generate.py: greedy output token-for-token transformers' `generate` on the same
weights exported to HF, the KV cache against re-running the sequence, top-p and stop strings by
hand, and tensor-parallel generation equal to the single-rank one."""
import pytest
import torch

from engine.config import ModelConfig
from engine.eval.generate import Completion, Generator, completion_text, sample_tokens, top_p_filter
from engine.model.decoder import LlamaModel, init_parameters
from parallel.random import generator

EOD = 256
# init_std 0.3: peaked logits, so the greedy paths compared here are far from argmax ties.
SHAPES = {"gqa": dict(num_heads=4, num_kv_heads=2), "mha_tied": dict(num_heads=4, num_kv_heads=4, tie_embeddings=True)}


def tiny_model(seed=7, **shape) -> LlamaModel:
    cfg = ModelConfig(hidden_size=64, num_layers=2, ffn_hidden_size=128, vocab_size=384, seq_length=64,
                      init_std=0.3, **{**SHAPES["gqa"], **shape})
    model = LlamaModel(cfg)
    init_parameters(model, seed)
    return model.eval()


def _rows(seed, n, key="test"):
    return [generator(seed, key, c) for c in range(n)]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_output_is_token_for_token_transformers_generate(tmp_path, shape):
    transformers = pytest.importorskip("transformers")
    from engine.model.hf_interop import save_hf

    model = tiny_model(**SHAPES[shape])
    save_hf(model, model.cfg, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ours = Generator(model, vocab_size=384, eod_id=EOD)
    for prompt in ([72, 105, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        completion = ours.generate(prompt, _rows(0, 1), max_new_tokens=24)[0]
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=EOD,
                             pad_token_id=EOD, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert completion.ids == theirs[0, len(prompt):].tolist(), (shape, prompt)
        assert completion.finish == ("eod" if completion.ids[-1] == EOD else "length")


def test_the_kv_cache_gives_the_tokens_and_logits_of_rerunning_the_sequence():
    model = tiny_model()
    cached, rerun = Generator(model, 384, EOD), Generator(model, 384, EOD, use_cache=False, pad_multiple=4)
    prompt = [5, 9, 200, 17, 3]
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.8, 0.9)):
        a = cached.generate(prompt, _rows(1, 4), 20, temperature, top_p)
        b = rerun.generate(prompt, _rows(1, 4), 20, temperature, top_p)
        assert [c.ids for c in a] == [c.ids for c in b], (temperature, top_p)
    # The logits themselves: each cached decoding step against the full forward of the prefix.
    from engine.model.kv_cache import ModelCache

    tokens = torch.tensor([prompt + a[0].ids])
    with torch.no_grad():
        full = model(tokens)
        cache = ModelCache(tokens.shape[1])
        steps = [model(tokens[:, :5], positions=torch.arange(5), cache=cache)]
        steps += [model(tokens[:, p:p + 1], positions=torch.tensor([p]), cache=cache) for p in range(5, tokens.shape[1])]
        # Two new tokens at once exercise the causal mask over the cache.
        two = ModelCache(8)
        model(tokens[:, :5], positions=torch.arange(5), cache=two)
        pair = model(tokens[:, 5:7], positions=torch.arange(5, 7), cache=two)
    error = (torch.cat(steps, dim=1) - full).abs().max().item()
    scale = full.abs().max().item()
    print(f"KV cache vs full forward: max |logit diff| {error:.2e} of max |logit| {scale:.2f}")
    assert error <= 1e-5 * scale
    assert (pair - full[:, 5:7]).abs().max().item() <= 1e-5 * scale


def test_rows_are_reproducible_and_seeded_per_row():
    model = tiny_model()
    sampler = Generator(model, 384, EOD)
    first = sampler.generate([1, 2, 3], _rows(3, 3), 12, temperature=1.0)
    again = sampler.generate([1, 2, 3], _rows(3, 3), 12, temperature=1.0)
    alone = sampler.generate([1, 2, 3], _rows(3, 3)[1:2], 12, temperature=1.0)
    assert first == again and len({tuple(c.ids) for c in first}) == 3
    assert alone[0] == first[1]  # a row's tokens do not depend on the other rows of its batch


def test_top_p_keeps_the_smallest_nucleus_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.85)).tolist() == [[False, False, False, True]]  # 0.5 + 0.3 < 0.85
    assert torch.isinf(top_p_filter(logits, 0.01)).tolist() == [[False, True, True, True]]
    draws = sample_tokens(logits.repeat(200, 1), 1.0, _rows(0, 200), top_p=0.7)
    assert set(draws.tolist()) == {0, 1}
    assert sample_tokens(logits, 0.0, []).tolist() == [0]


def test_stop_strings_end_a_row_and_cut_its_text():
    model = tiny_model()
    decode = lambda ids: bytes(i for i in ids if i < 256).decode("latin-1")  # noqa: E731
    free = Generator(model, 256, EOD).generate([65, 66], _rows(0, 1), 16)[0]
    stop = decode(free.ids[3:5])
    stopped = Generator(model, 256, EOD).generate([65, 66], _rows(0, 1), 16, stop=[stop], decode=decode)[0]
    assert stopped.finish == "stop" and stopped.ids == free.ids[:len(stopped.ids)]
    assert stop in decode(stopped.ids) and stop not in decode(stopped.ids[:-1])
    text = completion_text(stopped, decode, EOD, [stop])
    assert text == decode(stopped.ids)[:decode(stopped.ids).find(stop)]
    assert completion_text(Completion([65, EOD], "eod"), decode, EOD) == "A"


def _tp_worker(rank, world_size, prompt):
    from parallel.collectives import CommLedger
    from parallel.layout import ParallelLayout
    from parallel.topology import ParallelContext
    from engine.config import ApogeeConfig
    from engine.model.parallelize import parallelize_model

    single = tiny_model()
    ctx = ParallelContext.create(ParallelLayout(tp=world_size, dp=1))
    ledger = CommLedger()
    cfg = ApogeeConfig(model=single.cfg, parallel=ParallelLayout(tp=world_size, dp=1))
    sharded = parallelize_model(LlamaModel(single.cfg), cfg, ctx, ledger)
    init_parameters(sharded, 7)
    tp = ctx.comm_group("tp", ledger)
    out = Generator(sharded.eval(), 384, EOD, tp).generate(prompt, _rows(5, 2), 16, temperature=0.7)
    return [c.ids for c in out], ledger.total(op="generate_logits")


def test_tp2_generation_equals_the_single_rank_one():
    from tests.distributed import run_distributed

    prompt = [10, 20, 30, 40]
    single = [c.ids for c in Generator(tiny_model(), 384, EOD).generate(prompt, _rows(5, 2), 16, temperature=0.7)]
    results = run_distributed(_tp_worker, 2, prompt, timeout=120)
    assert results[0][0] == results[1][0] == single
    assert results[0][1] > 0  # the vocab-sharded logits were gathered
