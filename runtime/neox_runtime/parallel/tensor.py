"""Megatron-style tensor parallelism applied to a built GPTNeoXForCausalLM from outside.

Per block: the fused QKV and h_to_4h are column-parallel (each rank keeps whole heads of
the fused (H, 3, D) layout, resp. a slice of the MLP width), attention.dense and 4h_to_h
are row-parallel (partial products all-reduced, bias added once after). Embeddings,
LayerNorms and the output head stay replicated: simple, exact, and the head's matmul is
small next to the blocks for NeoX shapes. (Vocab-parallel embeddings would save memory
for 50k-vocab models at TP >= 4; not done.)

Sharded parameters keep their HF names, so `gather_state_dict` can rebuild full HF
weights for conversion and serving.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neox_runtime.model import GPTNeoXForCausalLM


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward (column-parallel input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """All-reduce forward; identity backward (row-parallel output)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (out / tp, in)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToParallel.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (out, in / tp)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None  # replicated
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromParallel.apply(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


def _qkv_rows(heads: int, head_dim: int, rank: int, tp: int) -> torch.Tensor:
    """Row indices of the fused QKV weight owned by `rank`: whole heads of the (H, 3, D) layout."""
    per = heads // tp
    return torch.arange(heads * 3 * head_dim).view(heads, 3 * head_dim)[rank * per:(rank + 1) * per].reshape(-1)


def _dense_cols(heads: int, head_dim: int, rank: int, tp: int) -> slice:
    per = heads // tp * head_dim
    return slice(rank * per, (rank + 1) * per)


def apply_tensor_parallel(model: GPTNeoXForCausalLM, group=None) -> GPTNeoXForCausalLM:
    """Shard `model` in place across `group` (all ranks must hold the same full weights)."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    arch = model.arch
    if arch.num_attention_heads % tp or arch.intermediate_size % tp:
        raise ValueError(f"tensor_parallel: {tp} must divide num_attention_heads ({arch.num_attention_heads}) "
                         f"and intermediate_size ({arch.intermediate_size})")
    H, D, Fw = arch.num_attention_heads, arch.head_dim, arch.intermediate_size // tp
    rows = _qkv_rows(H, D, rank, tp)
    cols = _dense_cols(H, D, rank, tp)
    for block in model.gpt_neox.layers:
        attn, mlp = block.attention, block.mlp
        attn.query_key_value = ColumnParallelLinear(attn.query_key_value.weight[rows],
                                                    attn.query_key_value.bias[rows], group)
        attn.dense = RowParallelLinear(attn.dense.weight[:, cols], attn.dense.bias, group)
        mlp.dense_h_to_4h = ColumnParallelLinear(mlp.dense_h_to_4h.weight[rank * Fw:(rank + 1) * Fw],
                                                 mlp.dense_h_to_4h.bias[rank * Fw:(rank + 1) * Fw], group)
        mlp.dense_4h_to_h = RowParallelLinear(mlp.dense_4h_to_h.weight[:, rank * Fw:(rank + 1) * Fw],
                                              mlp.dense_4h_to_h.bias, group)
    return model


def merge_shards(shards: list[dict[str, torch.Tensor]], num_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Full HF state dict from the per-rank state dicts of a tensor-parallel model (rank order)."""
    tp = len(shards)
    full = {}
    for key, first in shards[0].items():
        parts = [s[key] for s in shards]
        if key.endswith("attention.query_key_value.weight") or key.endswith("attention.query_key_value.bias"):
            # (H/tp * 3D, ...) per rank -> whole heads in rank order
            full[key] = torch.cat([p.view(num_heads // tp, 3 * head_dim, *p.shape[1:]) for p in parts]) \
                .reshape(num_heads * 3 * head_dim, *first.shape[1:])
        elif key.endswith("mlp.dense_h_to_4h.weight") or key.endswith("mlp.dense_h_to_4h.bias"):
            full[key] = torch.cat(parts, dim=0)
        elif key.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            full[key] = torch.cat(parts, dim=1)
        else:
            full[key] = first
    return full


def gather_state_dict(model: GPTNeoXForCausalLM, group=None) -> dict[str, torch.Tensor]:
    """All-gather a tensor-parallel model back into the full HF state dict (on every rank)."""
    local = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(shards, local, group=group)
    return merge_shards(shards, model.arch.num_attention_heads, model.arch.head_dim)
