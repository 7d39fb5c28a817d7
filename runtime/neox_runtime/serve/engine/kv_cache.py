"""The preallocated KV cache: one slot per running sequence, sized once at start.

Slot-based (not paged): every slot holds `max_model_len` positions, so a sequence is
admitted when a slot is free and its prompt + max_tokens fit in one slot; nothing is
allocated while serving. Slots are handed out lowest-first so the running batch stays
packed at the low end, where decode attention reads it as one strided view.
"""

from __future__ import annotations

import heapq

import torch


def kv_cache_dtype(model_dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """float32 on CPU whatever the weights' dtype, the model's dtype on GPU.

    On CPU, decode attention over a float32 cache is two float32 batched matmuls on
    unrounded K/V: for bfloat16 weights that is more exact than SDPA's bfloat16 kernel
    and faster (that kernel took 0.94 ms a layer, half of a decode step, for 32 sequences
    of the 70M shape). On GPU, SDPA's fused kernels want the model's dtype.
    """
    return torch.float32 if torch.device(device).type == "cpu" else model_dtype


class KVCache:
    """K and V for every layer: (layers, slots, heads, max_len, head_dim) each."""

    def __init__(self, *, num_layers: int, num_slots: int, num_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device):
        shape = (num_layers, num_slots, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_slot(*, num_layers: int, num_heads: int, max_len: int, head_dim: int,
                       dtype: torch.dtype) -> int:
        return 2 * num_layers * num_heads * max_len * head_dim * torch.finfo(dtype).bits // 8


class SlotAllocator:
    """Free-slot bookkeeping with lowest-first reuse; tracks tokens held for the usage metric."""

    def __init__(self, num_slots: int, max_len: int):
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self.num_slots = num_slots
        self.max_len = max_len
        self.used_tokens: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        slot = heapq.heappop(self._free)
        self.used_tokens[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.used_tokens.pop(slot, None)
        heapq.heappush(self._free, slot)

    def usage(self) -> float:
        """Fraction of the cache's positions holding live K/V (vLLM's kv_cache_usage_perc)."""
        return sum(self.used_tokens.values()) / (self.num_slots * self.max_len)
