"""Vocabulary padding (model.make_vocab_size_divisible_by): the padding rows never get probability
(the loss is the unpadded model's), HF files hold no padding both ways, and tp must divide the
padded size (a config error naming the keys). tp2 parity with padding: tests/test_tensor_parallel.py
(llama_padded*); older checkpoints without the field: tests/test_checkpoint.py."""
import dataclasses
import json

import pytest
import torch

from engine.config import ConfigError, ModelConfig, load_config
from engine.config_validation import validate
from engine.model.decoder import LlamaModel, init_parameters, lm_loss
from tests.noise_floor import EPS32, MIN_ULPS

PADDED = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                     vocab_size=100, seq_length=16)


def _pair(cfg):
    """(padded model, unpadded model holding the same weights but the padding rows)."""
    padded = LlamaModel(cfg)
    init_parameters(padded, 5)
    with torch.no_grad():  # weights on the padding rows large: any mass they got would show
        for name in ("embed_tokens.weight", "lm_head.weight"):
            if name in dict(padded.named_parameters()):
                padded.get_parameter(name)[cfg.vocab_size:] = 50.0
    plain = LlamaModel(dataclasses.replace(cfg, make_vocab_size_divisible_by=1))
    plain.load_state_dict({k: v[:cfg.vocab_size] if k in ("embed_tokens.weight", "lm_head.weight") else v
                           for k, v in padded.state_dict().items()})
    return padded, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("tie", [False, True])
def test_padding_rows_get_no_probability_and_the_loss_is_the_unpadded_one(dtype, z_loss, tie):
    cfg = dataclasses.replace(PADDED, tie_embeddings=tie)
    assert cfg.padded_vocab_size == 128
    padded, plain = _pair(cfg)
    assert padded.output_weight().shape[0] == 128 and plain.output_weight().shape[0] == 100
    padded, plain = padded.to(dtype), plain.to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    logits = padded(tokens[:, :-1])
    assert logits.shape[-1] == cfg.vocab_size  # unsharded: the padding columns are not there at all
    loss, count = lm_loss(logits, tokens[:, 1:], z_loss)
    ref, ref_count = lm_loss(plain(tokens[:, :-1]), tokens[:, 1:], z_loss)
    tolerance = MIN_ULPS * EPS32 * abs(ref.item())  # the same math; only matmul blocking may differ
    print(f"{dtype} z={z_loss} tie={tie}: |loss - unpadded| = {abs(loss - ref).item():.3e} (tolerance {tolerance:.3e})")
    assert count == ref_count and abs(loss - ref).item() <= tolerance
    loss.backward()
    ref.backward()
    weight = padded.output_weight()
    assert weight.grad[cfg.vocab_size:].abs().max() == 0  # no gradient reaches a padding row
    scale = plain.output_weight().grad.abs().max().item()
    torch.testing.assert_close(weight.grad[:cfg.vocab_size].float(), plain.output_weight().grad.float(),
                               rtol=0, atol=MIN_ULPS * torch.finfo(dtype).eps * scale)


def test_a_sharded_vocabulary_masks_its_padding_columns():
    from engine.model.decoder import drop_padded_vocab

    logits = torch.randn(2, 3, 64)
    # shard 1 of 2 of a 128-row vocabulary holding 100 ids: columns 36..63 are padding
    masked = drop_padded_vocab(logits, 100, (0, 1, 2))
    assert masked.shape == logits.shape and torch.equal(masked[..., :36], logits[..., :36])
    assert torch.softmax(masked.double(), -1)[..., 36:].max() == 0
    assert drop_padded_vocab(logits, 100, (0, 0, 2)) is logits  # shard 0 holds no padding


def _validate(*sets, world=8):
    cfg = load_config(None, ["model.num_heads=8", "model.num_kv_heads=8", "model.hidden_size=128", *sets])
    return validate(cfg, world)


def test_tp_must_divide_the_padded_vocabulary_not_the_vocabulary():
    cfg = _validate("model.vocab_size=100", "parallel.tp=8")  # 100 ids in 128 rows: 16 per rank
    assert cfg.model.padded_vocab_size == 128
    with pytest.raises(ConfigError) as err:
        _validate("model.vocab_size=100", "model.make_vocab_size_divisible_by=2", "parallel.tp=8")
    message = str(err.value)
    print(message)
    assert "parallel.tp=8" in message and "model.make_vocab_size_divisible_by=2" in message
    assert "model.vocab_size=100" in message and "100" in message
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by"):
        _validate("model.make_vocab_size_divisible_by=0", world=1)


def test_the_default_leaves_a_divisible_vocabulary_alone():
    """The tiny model (vocab 384 = 3 x 128) and Llama 3's 128256 keep their shapes: same golden curve."""
    assert ModelConfig().padded_vocab_size == ModelConfig().vocab_size == 384
    assert ModelConfig(vocab_size=128256).padded_vocab_size == 128256
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304  # GPT-2's, as Megatron pads it


def test_hf_export_and_import_hold_no_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from engine.model.hf_interop import load_hf, save_hf

    cfg = dataclasses.replace(PADDED, vocab_size=90)
    ours, _ = _pair(cfg)
    files = save_hf(ours, cfg, tmp_path)
    with safe_open(str(tmp_path / files[0]), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes["model.embed_tokens.weight"] == [90, 32] and shapes["lm_head.weight"] == [90, 32]
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 90
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    assert diff < 1e-5  # two implementations of the same fp32 math (tests/test_hf_interop.py LOGIT_TOLERANCE)
    back_cfg, state = load_hf(tmp_path)
    assert back_cfg.vocab_size == 90 and back_cfg.padded_vocab_size == 128
    assert state["embed_tokens.weight"].shape == (128, 32) and state["embed_tokens.weight"][90:].abs().max() == 0
    back = LlamaModel(back_cfg)
    back.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(back(tokens), ours(tokens))
