"""How each GPT-NeoX parameter is split across tensor-parallel ranks: written once.

Training (the tensor-parallel modules and their sharded initialisation), conversion
(merging any layout's shards back into Hugging Face tensors), checkpoint resharding
(resuming on another layout) and serving (each rank reading only its slice of the
safetensors files) all ask this module, by Hugging Face name, which dimension of a
tensor is split and which slice a rank owns.

Megatron's split for a NeoX block, in HF layout:
- `attention.query_key_value` (3 H D, C) and its bias: split along dim 0. HF orders the
  fused rows as (H, 3, D), so equal contiguous chunks are whole heads (q, k and v of
  the same heads), which is what a column-parallel rank needs.
- `mlp.dense_h_to_4h` (F, C) and its bias: dim 0 (column parallel).
- `attention.dense` (C, H D) and `mlp.dense_4h_to_h` (C, F): dim 1 (row parallel); their
  biases are replicated and added once, after the all-reduce.
- `embed_in` (V, C) and `embed_out` (V, C): dim 0, by vocabulary rows (vocab parallel).
- LayerNorms and the row-parallel biases: replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# HF-name suffix -> split dimension; anything else is replicated.
_SPLIT_DIM = {
    "attention.query_key_value.weight": 0,
    "attention.query_key_value.bias": 0,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "attention.dense.weight": 1,
    "mlp.dense_4h_to_h.weight": 1,
    "embed_in.weight": 0,
    "embed_out.weight": 0,
}


def split_dim(hf_name: str) -> int | None:
    """The dimension `hf_name` is split along under tensor parallelism; None when replicated."""
    for suffix, dim in _SPLIT_DIM.items():
        if hf_name.endswith(suffix):
            return dim
    return None


def is_vocab_parallel(hf_name: str) -> bool:
    return hf_name.endswith(("embed_in.weight", "embed_out.weight"))


def shard_range(size: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous part of a dimension of `size` split `world` ways (equal parts)."""
    if size % world:
        raise ValueError(f"a dimension of {size} does not split into {world} equal parts")
    per = size // world
    return slice(rank * per, (rank + 1) * per)


def shard_slices(hf_name: str, shape: Sequence[int], rank: int, world: int) -> tuple[slice, ...]:
    """Index of rank `rank`'s slice of the full tensor `hf_name` of `shape` (all of it when replicated)."""
    index = [slice(None)] * len(shape)
    dim = split_dim(hf_name)
    if dim is not None and world > 1:
        index[dim] = shard_range(shape[dim], rank, world)
    return tuple(index)


def shard(hf_name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s slice of `full` (a view; replicated tensors are returned whole)."""
    return full[shard_slices(hf_name, full.shape, rank, world)]


def local_shape(hf_name: str, shape: Sequence[int], world: int) -> tuple[int, ...]:
    out = list(shape)
    dim = split_dim(hf_name)
    if dim is not None and world > 1:
        if out[dim] % world:
            raise ValueError(f"{hf_name}: dimension {dim} of {tuple(shape)} does not split into {world} parts")
        out[dim] //= world
    return tuple(out)


def full_shape(hf_name: str, local: Sequence[int], world: int) -> tuple[int, ...]:
    """The full tensor's shape from one rank's slice shape (the inverse of `local_shape`)."""
    out = list(local)
    dim = split_dim(hf_name)
    if dim is not None:
        out[dim] *= world
    return tuple(out)


def merge(hf_name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's slice, in rank order."""
    dim = split_dim(hf_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    return torch.cat(list(shards), dim=dim)
