"""The KV caches of generation: one per attention layer (`KVCache`), a model's by layer name (`ModelCache`).

engine/model/decoder.py's Attention takes an optional cache; engine/eval/generate.py fills one
per layer through the prompt, then extends it one token at a time.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache:
    """Keys and values of one attention layer during generation, [b, kv_heads, capacity, d] each.

    Filled lazily on the first `attend` (the layer's local kv-head count is known then, so a
    tensor-parallel shard caches only its heads). A step's s new queries sit at positions
    length .. length+s-1 and attend to keys 0 .. length+s-1 (causal among themselves): the first
    call (the prompt) runs the layer's own causal core, later ones one masked SDPA over the cache.
    Training never passes a cache, so its path and numerics are untouched.
    """

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: Optional[Tensor] = None
        self.values: Optional[Tensor] = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, core: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Append k, v [b, hkv, s, d] at the current length and attend q [b, hq, s, d] to the cache."""
        b, heads, s, d = k.shape
        start, end = self.length, self.length + s
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; position {end - 1} does not fit")
        if self.keys is None:
            self.keys = k.new_empty(b, heads, self.capacity, d)
            self.values = v.new_empty(b, heads, self.capacity, d)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        if start == 0:  # the prompt: exactly the layer's causal attention over its own tokens
            return core(q, k, v)
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        mask = None
        if s > 1:  # new query i (position start + i) sees keys up to start + i
            mask = torch.arange(end, device=q.device) <= start + torch.arange(s, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=heads != q.shape[1])


class ModelCache(dict):
    """The KV caches of a whole model (or a pipeline stage's layers), by layer name, each made on
    first use for up to `capacity` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def __missing__(self, layer: str) -> KVCache:
        self[layer] = KVCache(self.capacity)
        return self[layer]
