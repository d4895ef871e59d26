"""Sharded initialisation: a rank builds the model on the meta device and draws only its shard.

A shard drawn alone equals the same slice of the single-rank tensor (tensor-, vocab- and
expert-parallel; tile boundaries inside shards), no tp > 1 rank allocates any parameter at full
size, and `train.init_from` of a Hugging Face directory reads only the rank's slices."""
import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import ModelConfig
from engine.model.decoder import LlamaModel, init_parameters
from engine.model.meta_init import materialize, meta_model
from engine.model.parallelize import LLAMA_TP_PLAN
from parallel.collectives import CommLedger, Group
from parallel.sharding import EP_SHARD, shard_of
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.tiled_random import TILE_COLS, TILE_ROWS, normal_full, normal_slice_, slice_bounds

# Every matrix spans several tiles and every tp=2/4 shard boundary falls inside a tile
# (320 / 2 = 160, 384 / 4 = 96), so slices of tiles are exercised, not just whole ones.
CFG = ModelConfig(hidden_size=192, num_layers=2, num_heads=6, num_kv_heads=2, ffn_hidden_size=320,
                  vocab_size=384, seq_length=16)
MOE = dataclasses.replace(CFG, num_experts=4, moe_topk=2, ffn_hidden_size=160)


def _group(rank: int, size: int) -> Group:
    """A TP group for construction-only tests (no communication happens)."""
    return Group("tp", None, size, rank, CommLedger())


def _full(cfg: ModelConfig, seed: int) -> dict:
    model = LlamaModel(cfg)
    init_parameters(model, seed)
    return dict(model.named_parameters())


def _shard_experts(model: LlamaModel, rank: int, ep: int) -> None:
    """Keep chunk `rank` of each expert stack, as MoE.shard_experts does (no dispatcher needed here)."""
    for name, param in list(model.named_parameters()):
        if ".mlp." in name and not name.endswith("router.weight"):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.weight = torch.nn.Parameter(param.chunk(ep)[rank].clone())
            setattr(module.weight, EP_SHARD, (0, rank, ep))


def _expected(full: dict, name: str, param) -> torch.Tensor:
    shard = shard_of(param)
    return full[name] if shard is None else full[name].chunk(shard[2], shard[0])[shard[1]]


class AllocationMeter(TorchDispatchMode):
    """The largest storage (bytes) any op allocated off the meta device while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def test_a_slice_drawn_alone_equals_the_slice_of_the_whole_tensor():
    shape = [3 * TILE_ROWS + 18, 2 * TILE_COLS + 40]  # 402 x 296
    whole = normal_full(shape, 0.5, 9, "init", "w")
    assert not torch.equal(whole[:TILE_ROWS, :TILE_COLS], whole[:TILE_ROWS, TILE_COLS:2 * TILE_COLS])  # tiles differ
    for shard in [(0, 0, 1), (0, 1, 3), (1, 1, 2), (0, 4, 7)]:
        if shape[shard[0]] % shard[2]:
            with pytest.raises(ValueError, match=r"not divisible into 7 equal shards"):
                slice_bounds(shape, shard)
            continue
        bounds = slice_bounds(shape, shard)
        out = torch.empty(*(stop - start for start, stop in bounds))
        normal_slice_(out, shape, bounds, 0.5, 9, "init", "w")
        assert torch.equal(out, whole.chunk(shard[2], shard[0])[shard[1]]), shard


@pytest.mark.parametrize("tp", [2, 4])
def test_a_tensor_parallel_shard_materialised_from_meta_equals_the_slice_of_the_single_rank_init(tp):
    """Column-, row- and vocab-parallel weights; bf16 is the fp32 value rounded once."""
    full = _full(CFG, 11)
    for rank in range(tp):
        for dtype in (torch.float32, torch.bfloat16):
            model = meta_model(CFG)
            apply_tensor_parallel(model, LLAMA_TP_PLAN, _group(rank, tp))
            materialize(model, 11, "cpu", dtype)
            assert model.embed_tokens.weight.shape == (CFG.vocab_size // tp, CFG.hidden_size)
            for name, param in model.named_parameters():
                assert param.dtype == dtype and not param.is_meta, name
                assert torch.equal(param, _expected(full, name, param).to(dtype)), (tp, rank, name)
            assert torch.equal(model.inv_freq, LlamaModel(CFG).inv_freq)  # recomputed after to_empty


def test_an_expert_parallel_shard_equals_the_slice_of_the_single_rank_init():
    full = _full(MOE, 5)
    for rank in range(2):
        model = meta_model(MOE)
        _shard_experts(model, rank, 2)
        materialize(model, 5, "cpu", torch.float32)
        for name, param in model.named_parameters():
            assert torch.equal(param, _expected(full, name, param)), (rank, name)
        assert model.layers["0"].mlp.aux_loss_sum.device.type == "cpu"


def test_no_parameter_is_allocated_at_full_size_on_a_tp2_rank():
    """The largest allocation while building a tp=2 rank is its largest shard, never a full tensor."""
    with AllocationMeter() as meter:
        model = meta_model(CFG)
        apply_tensor_parallel(model, LLAMA_TP_PLAN, _group(1, 2))
        materialize(model, 3, "cpu", torch.float32)
    local = max(p.numel() * p.element_size() for p in model.parameters())
    full = max(p.numel() * p.element_size() for p in LlamaModel(CFG).parameters())
    print(f"largest allocation {meter.largest} B, largest shard {local} B, largest full tensor {full} B")
    assert meter.largest <= local < full


def _save_hf(tmp_path, cfg: ModelConfig, seed: int, fused: bool = False) -> dict:
    """A HF directory of a seeded model (experts per expert, or transformers 5's fused layout)."""
    from safetensors.torch import save_file

    from engine.model.hf_interop import save_hf, to_hf_state_dict

    model = LlamaModel(cfg)
    init_parameters(model, seed)
    save_hf(model, cfg, tmp_path, max_shard_bytes=2**20)
    if fused:
        hf = to_hf_state_dict(model.state_dict(), cfg)
        out = {k: v.contiguous() for k, v in hf.items() if ".experts." not in k}
        for layer in range(cfg.num_layers):
            w = {k: [hf[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{k}.weight"] for e in range(cfg.num_experts)]
                 for k in ("w1", "w3", "w2")}
            out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(p) for p in zip(w["w1"], w["w3"])])
            out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(w["w2"])
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        save_file(out, str(tmp_path / "model.safetensors"))
        (tmp_path / "model.safetensors.index.json").unlink()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg,fused", [(CFG, False), (MOE, False), (MOE, True)], ids=["dense", "mixtral", "fused"])
def test_hf_slices_read_only_what_the_shard_covers(tmp_path, cfg, fused):
    from engine.model.hf_slices import HFSliceReader

    weights = _save_hf(tmp_path, cfg, 4, fused)
    for shard in [None, (0, 1, 2), (1, 0, 2)]:
        reader = HFSliceReader(tmp_path)
        expected_bytes = 0
        for name, value in weights.items():
            if value.dim() == 1 and shard is not None and shard[0] == 1:
                continue
            got = reader.read(name, shard)
            want = value if shard is None else value.chunk(shard[2], shard[0])[shard[1]]
            assert torch.equal(got, want), (shard, name)
            expected_bytes += want.numel() * want.element_size()
        assert reader.bytes_read == expected_bytes, shard  # not a byte of the other ranks' slices


def test_init_from_a_hf_directory_loads_each_tp_rank_its_slice(tmp_path):
    from engine.state.init_from import initialize_chunks

    weights = _save_hf(tmp_path, CFG, 6)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]  # sharded files
    for rank in range(2):
        model = meta_model(CFG)
        apply_tensor_parallel(model, LLAMA_TP_PLAN, _group(rank, 2))
        materialize(model, 0, "cpu", torch.float32)
        assert initialize_chunks([model], str(tmp_path), CFG.tie_embeddings, world_size=2) == "hf weights"
        for name, param in model.named_parameters():
            assert torch.equal(param, _expected(weights, name, param)), (rank, name)


# ---------------------------------------------------------------------------------------------
# Real gloo ranks: the trainer's chunks at tp=2 and ep=2 against the single-rank trainer's


LAYOUTS = {"tp2": ["parallel.tp=2"], "ep2": ["parallel.ep=2", "model.num_experts=4", "model.moe_topk=2"],
           "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}
WIDE = ["model.hidden_size=192", "model.num_heads=6", "model.num_kv_heads=2", "model.ffn_hidden_size=320",
        "model.vocab_size=384"]


def _trainer_state(layout: list[str], world_size: int) -> tuple[dict, int, int]:
    """(gathered initial weights, the largest allocation while building, the largest full parameter)."""
    from engine.model.parallelize import gather_full_state_dict
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext
    from tests.parity import FakeData, parity_config

    cfg = parity_config([*WIDE, *layout], world_size, 1)
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg))
    with AllocationMeter() as meter:  # the model alone (the gradient buffer is one flat tensor)
        trainer.build_model_chunks()
    build = meter.largest
    state = gather_full_state_dict(trainer.chunks, ctx)
    largest_full = max(v.numel() * v.element_size() for k, v in state.items() if ".mlp." in k or "embed" in k)
    return {k: v.numpy() for k, v in state.items()}, build, largest_full


def _worker(rank, world_size):
    return {name: _trainer_state(layout, world_size) for name, layout in LAYOUTS.items()}


@pytest.mark.distributed
def test_trainer_shards_at_tp2_and_ep2_are_the_single_rank_weights_and_never_full_size():
    from tests.distributed import run_distributed

    results = run_distributed(_worker, 2, timeout=300)
    for name, layout in LAYOUTS.items():
        reference, _, _ = _trainer_state([item for item in layout if item.startswith("model.")], 1)
        for rank, by_layout in enumerate(results):
            state, build, largest_full = by_layout[name]
            assert state.keys() == reference.keys(), name
            for key, value in reference.items():
                assert (state[key] == value).all(), (name, rank, key)  # bitwise
            print(f"{name} rank {rank}: largest allocation while building {build} B, largest full tensor "
                  f"{largest_full} B")
            assert build < largest_full, (name, rank)
