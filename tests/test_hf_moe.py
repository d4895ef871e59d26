"""MoE export and import: a MoE model leaves as a Hugging Face Mixtral directory that transformers
loads with no missing or unexpected keys and equal logits (Mixtral's router is ours: softmax, top
k, renormalised), and `train.init_from` reads it back into every expert-parallel layout."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model.decoder import LlamaModel, init_parameters
from engine.model.hf_interop import from_hf_state_dict, load_hf, save_hf, to_hf_state_dict
from tests.parity import FakeData, parity_config

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96, vocab_size=96,
                  seq_length=32, num_experts=4, moe_topk=2, moe_ffn_hidden_size=48, norm_eps=1e-6, rope_base=500000.0)
MOE = ["model.num_experts=4", "model.moe_topk=2", "model.moe_aux_loss_coeff=0.01",
       "model.vocab_size=264"]  # the parity MoE model, with room for the byte tokenizer's 258 ids
LOGIT_TOLERANCE = 1e-5
"""fp32 logits of two implementations of the same math: measured ~1e-6 (printed)."""


def _model(cfg=CFG, seed=3):
    model = LlamaModel(cfg)
    init_parameters(model, seed)
    with torch.no_grad():  # wider weights, so the router's choices and the experts matter
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
    return model


def _logit_diff(ours, theirs, cfg, seed=0):
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    print(f"max |logit diff| vs transformers Mixtral: {diff:.2e}")
    return diff


def _load_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(model).__name__ == "MixtralForCausalLM"
    return model.eval()


def test_moe_export_is_a_mixtral_directory_transformers_loads_with_equal_logits(tmp_path):
    ours = _model()
    save_hf(ours, CFG, tmp_path, max_shard_bytes=100_000)
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (auto.model_type, auto.num_local_experts, auto.num_experts_per_tok, auto.intermediate_size) == ("mixtral", 4, 2, 48)
    assert _logit_diff(ours, _load_transformers(tmp_path), CFG) < LOGIT_TOLERANCE
    cfg, state = load_hf(tmp_path)
    assert dataclasses.replace(cfg, ffn_hidden_size=CFG.ffn_hidden_size, max_position_embeddings=None) == CFG
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


def test_a_transformers_mixtral_loads_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32, initializer_range=0.2,
                                        rms_norm_eps=1e-6, tie_word_embeddings=False)
    theirs = transformers.MixtralForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path)
    cfg, state = load_hf(tmp_path)
    ours = LlamaModel(cfg)
    ours.load_state_dict(state)
    assert (cfg.num_experts, cfg.moe_topk, cfg.moe_ffn_hidden_size, cfg.rope_base) == (4, 2, 48, 1e6)
    assert _logit_diff(ours, theirs, cfg, seed=1) < LOGIT_TOLERANCE


def test_experts_read_from_per_expert_and_fused_layouts_alike():
    """Hub Mixtral checkpoints keep one matrix per expert; transformers 5 fuses gate and up per layer."""
    state = _model().state_dict()
    hf = to_hf_state_dict(state, CFG)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hf and "model.layers.0.block_sparse_moe.gate.weight" in hf
    fused = {k: v for k, v in hf.items() if ".experts." not in k}
    for layer in range(CFG.num_layers):
        expert = [[hf[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(4)]
                  for w in ("w1", "w3", "w2")]
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(p) for p in zip(*expert[:2])])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(expert[2])
        fused[f"model.layers.{layer}.mlp.gate.weight"] = fused.pop(f"model.layers.{layer}.block_sparse_moe.gate.weight")
    for source in (hf, fused):
        back = from_hf_state_dict(source, CFG)
        assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# A MoE run's checkpoint -> `apogee export` -> `train.init_from` in every expert-parallel layout

LAYOUTS = {"ep1_dp2": ["parallel.dp=2"], "ep2": ["parallel.ep=2"]}
"""The layouts started for real (two gloo ranks); every rank of ep 2 and 4 is checked in-process below."""


def _read_back(world_size: int, layouts: dict, hf_dir: str) -> dict:
    """{layout: (gathered weights, first step's loss)} of runs started from `hf_dir`."""
    from engine.model.parallelize import gather_full_state_dict
    from engine.state.init_from import initialize_from
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    out = {}
    for name, layout in layouts.items():
        cfg = parity_config([*MOE, *layout, f"train.init_from={hf_dir}"], world_size, 1)
        ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
        trainer = Trainer(cfg, ctx, FakeData.for_config(cfg))
        assert initialize_from(trainer, hf_dir) == "hf weights"
        state = gather_full_state_dict(trainer.chunks, ctx)
        loss = trainer.train_step(0).loss
        out[name] = ({k: v.numpy() for k, v in state.items()}, loss) if ctx.rank == 0 else None
    return out


def _worker(rank, world_size, layouts, hf_dir):
    return _read_back(world_size, layouts, hf_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A MoE parity run trained 2 steps, checkpointed and exported: (HF directory, its weights)."""
    from engine.state.checkpoint import Checkpointer
    from engine.state.export import export_hf
    from engine.state.resume import checkpoint_store, run_id
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    tmp = tmp_path_factory.mktemp("moe")
    cfg = parity_config(MOE, 1, 2)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg))
    for step in range(2):
        trainer.train_step(step)
    store = checkpoint_store(cfg, tmp / "run")
    Checkpointer(store, 0, 1, run_id(tmp / "run")).save(trainer, 2, trainer.checkpoint_metadata(), blocking=True)
    model = export_hf(store.latest_good(lambda _: None).path, tmp / "hf")
    return str(tmp / "hf"), {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_moe_checkpoint_exports_as_mixtral_with_its_tokenizer(exported):
    hf_dir, weights = exported
    theirs = _load_transformers(hf_dir)
    ours = LlamaModel(load_hf(hf_dir)[0])
    ours.load_state_dict(weights)
    assert _logit_diff(ours, theirs, ours.cfg) < LOGIT_TOLERANCE
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer("ab")["input_ids"] == [97, 98] and tokenizer.eos_token_id == 256
    generation = json.loads((Path(hf_dir) / "generation_config.json").read_text())
    assert generation == {"eos_token_id": 256, "pad_token_id": 257}


@pytest.mark.parametrize("ep", [2, 4])
def test_every_expert_parallel_rank_reads_its_slice_of_the_export(exported, ep):
    """What each rank of an EP group loads is chunk `rank` of the stacked experts (parallel/sharding.py)."""
    from engine.state.init_from import initialize_chunks
    from parallel.sharding import EP_SHARD

    hf_dir, weights = exported
    cfg = load_hf(hf_dir)[0]
    for rank in range(ep):
        model = LlamaModel(cfg)
        with torch.no_grad():
            for name, param in list(model.named_parameters()):
                if ".mlp." in name and not name.endswith("router.weight"):  # as MoE.shard_experts keeps them
                    module = model.get_submodule(name.rsplit(".", 1)[0])
                    module.weight = torch.nn.Parameter(param.chunk(ep)[rank].clone())
                    setattr(module.weight, EP_SHARD, (0, rank, ep))
        initialize_chunks([model], hf_dir, cfg.tie_embeddings, world_size=ep)
        for name, param in model.named_parameters():
            expected = weights[name].chunk(ep)[rank] if hasattr(param, EP_SHARD) else weights[name]
            assert torch.equal(param, expected), (ep, rank, name)


@pytest.mark.distributed
def test_init_from_reads_the_export_back_into_expert_parallel_runs(exported):
    from tests.distributed import run_distributed

    hf_dir, weights = exported
    reference = _read_back(1, {"ep1": []}, hf_dir)["ep1"]
    runs = run_distributed(_worker, 2, LAYOUTS, hf_dir, timeout=300)[0]
    for name, (state, loss) in [("ep1", reference), *runs.items()]:
        assert state.keys() == weights.keys(), name
        assert all(torch.equal(torch.from_numpy(state[k]), v) for k, v in weights.items()), name  # bitwise
        relative = abs(loss - reference[1]) / reference[1]
        print(f"{name}: first step's loss {loss:.6f}, relative to ep1 {relative:.1e}")
        assert relative <= 1e-5, name
