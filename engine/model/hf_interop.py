"""Hugging Face weights: our state dict <-> LlamaForCausalLM's or MixtralForCausalLM's, safetensors.

Our parameter names are HF Llama's without the `model.` prefix (and `lm_head.weight` as is), and
our RoPE uses HF's rotate_half convention, so q/k weights map without any permutation. A tied
model has no `lm_head` in either layout. A MoE layer's stacked experts (engine/model/moe.py:
gate/up [E * ffn, h], down [E * h, ffn], router [E, h]) are written as Mixtral's checkpoints on
the Hub hold them, one matrix per expert: `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up),
`w2` (down) and `block_sparse_moe.gate` (the router); transformers 5 fuses them when it loads
(and its own fused `mlp.experts.gate_up_proj` / `down_proj` layout is read too).

`save_hf` writes safetensors shards of at most `max_shard_bytes` with HF's index file;
`load_hf` reads a directory back (config through engine/model/hf_config.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from engine.config import ModelConfig
from engine.model.hf_config import check_exportable, hf_config, model_config_from_hf

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
"""Largest safetensors shard written by default (transformers' max_shard_size of 5GB)."""

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_OUR_NAMES = {v: k for k, v in _MIXTRAL_NAMES.items()}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
"""Our tensors with one row per token id: padded to padded_vocab_size here, vocab_size in HF files."""


def fit_vocab_rows(tensor: Tensor, rows: int) -> Tensor:
    """`tensor` [V, h] with `rows` rows: the first rows, or zero rows appended (the padding rows,
    which never get probability: engine/model/decoder.py drop_padded_vocab)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def to_hf_state_dict(state_dict: dict, cfg: ModelConfig) -> dict:
    """Our names -> HF names (`model.embed_tokens.weight`, `model.layers.{i}...`, `lm_head.weight`;
    a MoE layer's experts one matrix each, Mixtral's names); the vocabulary padding rows are left out."""
    check_exportable(cfg)
    out = {}
    for name, tensor in state_dict.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # a pipeline stage's copy of the tied embedding
        if name in VOCAB_TENSORS and tensor.shape[0] != cfg.vocab_size:
            tensor = tensor[:cfg.vocab_size].clone()  # a copy: safetensors writes whole storages
        if name == "lm_head.weight":
            out[name] = tensor
            continue
        expert = _EXPERT.match(name) if cfg.num_experts else None
        if expert:
            layer, kind = expert.groups()
            for e, block in enumerate(tensor.chunk(cfg.num_experts, dim=0)):
                # A copy: safetensors refuses tensors that share storage.
                out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[kind]}.weight"] = block.clone()
        elif cfg.num_experts and name.endswith(".mlp.router.weight"):
            out["model." + name.replace(".mlp.router.", ".block_sparse_moe.gate.")] = tensor
        else:
            out["model." + name] = tensor
    return out


def _stack_experts(hf_sd: dict, cfg: ModelConfig) -> dict:
    """Mixtral's per-expert matrices (or transformers 5's fused ones) -> our stacked names."""
    out, blocks = {}, {}
    for name, tensor in hf_sd.items():
        expert = _HF_EXPERT.match(name)
        if expert:
            layer, e, kind = expert.groups()
            blocks.setdefault((layer, _OUR_NAMES[kind]), {})[int(e)] = tensor
            continue
        fused = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if fused:  # [E, 2 ffn, h] (gate then up) or [E, h, ffn]
            layer, kind = fused.groups()
            if kind == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                out[f"model.layers.{layer}.mlp.gate_proj.weight"] = gate.flatten(0, 1)
                out[f"model.layers.{layer}.mlp.up_proj.weight"] = up.flatten(0, 1)
            else:
                out[f"model.layers.{layer}.mlp.down_proj.weight"] = tensor.flatten(0, 1)
            continue
        out[re.sub(r"\.(block_sparse_moe|mlp)\.gate\.weight$", ".mlp.router.weight", name)] = tensor
    for (layer, kind), by_expert in blocks.items():
        if sorted(by_expert) != list(range(cfg.num_experts)):
            raise ValueError(f"HF checkpoint layer {layer} {_MIXTRAL_NAMES[kind]}: experts {sorted(by_expert)}, "
                             f"expected 0..{cfg.num_experts - 1} (num_local_experts={cfg.num_experts})")
        out[f"model.layers.{layer}.mlp.{kind}.weight"] = torch.cat([by_expert[e] for e in range(cfg.num_experts)])
    return out


def from_hf_state_dict(hf_sd: dict, cfg: ModelConfig) -> dict:
    """HF names -> our names; drops HF's tied `lm_head.weight` and stale rotary buffers, and pads the
    vocabulary tensors to cfg.padded_vocab_size rows (zeros)."""
    check_exportable(cfg)
    if cfg.num_experts:
        hf_sd = _stack_experts(hf_sd, cfg)
    out = {}
    for name, tensor in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers versions saved; we recompute it
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = tensor
        elif name.startswith("model."):
            out[name[len("model."):]] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r} in a HF {'Mixtral' if cfg.num_experts else 'Llama'} checkpoint")
    expected = "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    if expected not in out:
        raise ValueError(f"HF checkpoint lacks the tensor for {expected!r} (tie_embeddings={cfg.tie_embeddings})")
    for name in VOCAB_TENSORS:
        if name in out:
            out[name] = fit_vocab_rows(out[name], cfg.padded_vocab_size)
    return out


def shard_names(tensors: dict, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in shards of at most max_shard_bytes each (a larger tensor gets a shard of its
    own), in order, as transformers splits a checkpoint."""
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf(model_or_state_dict: Union[nn.Module, dict], cfg: ModelConfig, out_dir: Union[str, Path],
            dtype: Optional[torch.dtype] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            tokens: Optional[dict] = None) -> list[str]:
    """Write `out_dir/config.json` and the weights as safetensors shards with their index
    (model-0000k-of-0000n.safetensors + model.safetensors.index.json), loadable by transformers.

    dtype: cast every tensor to it (default: keep theirs); tokens: BOS/EOS/pad ids for config.json.
    Returns the shard file names.
    """
    from safetensors.torch import save_file

    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in to_hf_state_dict(state, cfg).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_names(tensors, max_shard_bytes)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    kinds = {t.dtype for t in tensors.values()}
    name = _DTYPE_NAMES.get(kinds.pop(), "float32") if len(kinds) == 1 else "float32"
    config = hf_config(cfg, tokens=tokens, dtype=name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return files


def read_hf_config(directory: Union[str, Path]) -> ModelConfig:
    """ModelConfig of a HF directory's config.json (ValueError naming the file and the field)."""
    path = Path(directory) / "config.json"
    try:
        return model_config_from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def load_hf(directory: Union[str, Path]) -> tuple[ModelConfig, dict]:
    """Read a HF Llama or Mixtral directory (config.json + safetensors, sharded or not) -> (cfg, our state dict)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_hf_config(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX).read_text())
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    elif (directory / SAFETENSORS).is_file():
        files = [directory / SAFETENSORS]
    else:
        raise FileNotFoundError(f"{directory}: no {SAFETENSORS} or {SAFETENSORS_INDEX} (safetensors weights; "
                                f"pickled .bin checkpoints are not read)")
    hf_sd: dict[str, Tensor] = {}
    for f in files:
        hf_sd.update(load_file(str(f)))
    return cfg, from_hf_state_dict(hf_sd, cfg)
