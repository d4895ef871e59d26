"""Reading only this rank's slice of each tensor of a Hugging Face directory (safetensors' get_slice).

`load_hf` (engine/model/hf_interop.py) reads a whole checkpoint: right for export and tests, wrong
for `train.init_from` at scale, where every rank would read every byte of a 405B model. A
`HFSliceReader` maps one of our parameter names and its shard (parallel/sharding.py) to the HF
tensors behind it and reads just the rows or columns the shard covers: a column- or
vocab-parallel weight its rows, a row-parallel one its columns, an expert-parallel stack only the
experts this rank holds (Mixtral's per-expert matrices, or the experts' range of transformers 5's
fused `gate_up_proj` / `down_proj`). `bytes_read` counts what came off the files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from engine.model.hf_interop import SAFETENSORS, SAFETENSORS_INDEX, read_hf_config
from parallel.tiled_random import slice_bounds

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTER = re.compile(r"^layers\.(\d+)\.mlp\.router\.weight$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class HFSliceReader:
    """Slices of a HF Llama / Mixtral directory's tensors under our names (see the module doc)."""

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        self.cfg = read_hf_config(self.directory)
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SAFETENSORS).is_file():
            from safetensors import safe_open

            with safe_open(str(self.directory / SAFETENSORS), framework="pt") as handle:
                self.weight_map = {name: SAFETENSORS for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{self.directory}: no {SAFETENSORS} or {SAFETENSORS_INDEX} (safetensors "
                                    f"weights; pickled .bin checkpoints are not read)")
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def _slice(self, hf_name: str):
        from safetensors import safe_open

        file = self.weight_map.get(hf_name)
        if file is None:
            raise ValueError(f"{self.directory}: the checkpoint holds no tensor {hf_name!r}")
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file].get_slice(hf_name)

    def _read(self, hf_name: str, index: tuple) -> Tensor:
        tensor = self._slice(hf_name)[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def global_shape(self, name: str) -> list[int]:
        """The global shape of our tensor `name` in this checkpoint."""
        expert = _EXPERT.match(name) if self.cfg.num_experts else None
        if expert is None:
            return list(self._slice(self._hf_name(name)).get_shape())
        layer, kind = expert.groups()
        fused = self._fused(layer, kind)
        if fused is not None:
            shape = list(self._slice(fused).get_shape())  # [E, 2 ffn, h] or [E, h, ffn]
            rows = shape[1] // 2 if kind != "down_proj" else shape[1]
            return [shape[0] * rows, shape[2]]
        rows, cols = self._slice(self._expert_name(layer, kind, 0)).get_shape()
        return [self.cfg.num_experts * rows, cols]

    def _hf_name(self, name: str) -> str:
        if name == "lm_head.weight":
            return name
        router = _ROUTER.match(name) if self.cfg.num_experts else None
        if router is not None:
            for candidate in (f"model.layers.{router.group(1)}.block_sparse_moe.gate.weight",
                              f"model.layers.{router.group(1)}.mlp.gate.weight"):
                if candidate in self.weight_map:
                    return candidate
        return "model." + name

    def _expert_name(self, layer: str, kind: str, e: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[kind]}.weight"

    def _fused(self, layer: str, kind: str) -> Optional[str]:
        name = f"model.layers.{layer}.mlp.experts.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"
        return name if name in self.weight_map else None

    def read_rows(self, name: str, shape: list, shard=None) -> Tensor:
        """The slice `shard` of a [rows, h] tensor of global `shape` whose first rows are this
        checkpoint's `name` and the rest zeros (vocabulary padding rows the HF files leave out)."""
        rows, cols = self.global_shape(name)
        if cols != shape[1] or rows > shape[0]:
            raise ValueError(f"{name} has shape {[rows, cols]} in the checkpoint, {list(shape)} here (with padding)")
        (r0, r1), _ = slice_bounds(shape, shard)
        out = torch.zeros(r1 - r0, cols)  # fp32; the caller copies it into its dtype
        if min(r1, rows) > r0:
            out[:min(r1, rows) - r0] = self._read(self._hf_name(name), (slice(r0, min(r1, rows)), slice(0, cols)))
        return out

    def read(self, name: str, shard=None) -> Tensor:
        """Our tensor `name`, or only the slice `shard` = (dim, rank, world) of it, read from the files."""
        shape = self.global_shape(name)
        (r0, r1), (c0, c1) = slice_bounds(shape, shard) if len(shape) == 2 else (slice_bounds(shape, shard)[0], (0, 1))
        expert = _EXPERT.match(name) if self.cfg.num_experts else None
        if len(shape) == 1:
            return self._read(self._hf_name(name), (slice(r0, r1),))
        if expert is None:
            return self._read(self._hf_name(name), (slice(r0, r1), slice(c0, c1)))
        layer, kind = expert.groups()
        rows = shape[0] // self.cfg.num_experts
        blocks = []
        fused = self._fused(layer, kind)
        for e in range(r0 // rows, (r1 + rows - 1) // rows):
            lo, hi = max(r0, e * rows) - e * rows, min(r1, (e + 1) * rows) - e * rows
            if fused is None:
                blocks.append(self._read(self._expert_name(layer, kind, e), (slice(lo, hi), slice(c0, c1))))
            else:  # gate_up_proj holds gate's rows, then up's
                offset = rows if kind == "up_proj" else 0
                blocks.append(self._read(fused, (slice(e, e + 1), slice(offset + lo, offset + hi), slice(c0, c1)))[0])
        return torch.cat(blocks)
