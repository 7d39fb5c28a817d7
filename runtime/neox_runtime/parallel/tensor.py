"""Megatron-style tensor parallelism applied to a built GPTNeoXForCausalLM from outside.

`apply_tensor_parallel(model, tp)` replaces modules by name, following `TENSOR_PLAN`:
per block, the fused QKV and h_to_4h are column parallel (each rank computes whole heads
of the fused (H, 3, D) layout, resp. a slice of the MLP width), attention.dense and
4h_to_h row parallel (partial products all-reduced, bias added once after); the input
embedding and the output head are vocab parallel (each rank holds V/t rows), and the
loss is a vocab-parallel cross entropy, so full (B, T, V) logits never exist on a rank.
LayerNorms stay replicated.

Which slice of a parameter a rank holds is `parallel.sharding`'s answer, never this
module's: the modules here only compute. Sharded parameters keep their HF names. The
model may be on the meta device (sharded start-up: nothing is allocated until
`parallel.startup` materialises this rank's slices) or hold full weights (every rank the
same), which are then cut down to this rank's slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neox_runtime.model import causal_lm_loss
from neox_runtime.parallel import sharding


@dataclass(frozen=True)
class TensorSlice:
    """This rank's place in its tensor-parallel group."""

    rank: int
    size: int
    group: Any = None  # torch.distributed ProcessGroup; None with size 1

    def vocab_range(self, vocab_size: int) -> slice:
        return sharding.shard_range(vocab_size, self.rank, self.size)


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
    """All-reduce forward; identity backward (row-parallel output, vocab-parallel embedding)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _local_parameter(hf_name: str, full: torch.Tensor | None, tp: TensorSlice) -> nn.Parameter | None:
    """This rank's slice of `full` as a new parameter (shape only when `full` is on meta)."""
    if full is None:
        return None
    if full.is_meta:
        return nn.Parameter(torch.empty(sharding.local_shape(hf_name, full.shape, tp.size), dtype=full.dtype,
                                        device="meta"))
    return nn.Parameter(sharding.shard(hf_name, full.detach(), tp.rank, tp.size).clone())


class _ShardedLinear(nn.Module):
    split_dim: int

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: TensorSlice):
        super().__init__()
        self.weight, self.bias, self.tp = weight, bias, tp

    @classmethod
    def from_module(cls, linear: nn.Linear, name: str, tp: TensorSlice) -> "_ShardedLinear":
        return cls(_local_parameter(f"{name}.weight", linear.weight, tp),
                   _local_parameter(f"{name}.bias", linear.bias, tp), tp)


class ColumnParallelLinear(_ShardedLinear):
    """y_local = x W_local^T + b_local: (.., C) -> (.., out / tp); weight (out / tp, in), bias (out / tp,)."""

    split_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToParallel.apply(x, self.tp.group), self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """y = all_reduce(x_local W_local^T) + b: (.., in / tp) -> (.., out); weight (out, in / tp), bias whole."""

    split_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromParallel.apply(F.linear(x, self.weight), self.tp.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the (V, C) embedding; ids outside give 0, the all-reduce adds the owner's row."""

    split_dim = 0

    def __init__(self, weight: nn.Parameter, tp: TensorSlice, vocab_start: int):
        super().__init__()
        self.weight, self.tp, self.vocab_start = weight, tp, vocab_start  # (V / tp, C)

    @classmethod
    def from_module(cls, embedding: nn.Embedding, name: str, tp: TensorSlice) -> "VocabParallelEmbedding":
        return cls(_local_parameter(f"{name}.weight", embedding.weight, tp), tp,
                   tp.vocab_range(embedding.num_embeddings).start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start  # (B, T)
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return _ReduceFromParallel.apply(x, self.tp.group)  # (B, T, C)


class VocabParallelHead(nn.Module):
    """(.., C) -> this rank's logits (.., V / tp) for vocabulary rows [start, stop)."""

    split_dim = 0

    def __init__(self, weight: nn.Parameter, tp: TensorSlice):
        super().__init__()
        self.weight, self.tp = weight, tp  # (V / tp, C)

    @classmethod
    def from_module(cls, linear: nn.Linear, name: str, tp: TensorSlice) -> "VocabParallelHead":
        return cls(_local_parameter(f"{name}.weight", linear.weight, tp), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(x, self.weight, self.tp)


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, tp: TensorSlice) -> torch.Tensor:
    """Local logits x W_local^T, (B, T, C) -> (B, T, V / tp); the input gradient is all-reduced."""
    if tp.size == 1:
        return F.linear(x, weight)
    return F.linear(_CopyToParallel.apply(x, tp.group), weight)


# HF module-name suffix -> the module that replaces it (split as `sharding` says).
TENSOR_PLAN: dict[str, type[nn.Module]] = {
    "attention.query_key_value": ColumnParallelLinear,
    "attention.dense": RowParallelLinear,
    "mlp.dense_h_to_4h": ColumnParallelLinear,
    "mlp.dense_4h_to_h": RowParallelLinear,
    "embed_in": VocabParallelEmbedding,
    "embed_out": VocabParallelHead,
}


def apply_tensor_parallel(model: nn.Module, tp: TensorSlice) -> nn.Module:
    """Replace `model`'s modules (by HF name) with tensor-parallel ones, in place; ties are kept."""
    if tp.size == 1:
        return model
    tied = getattr(getattr(model, "arch", None), "tie_word_embeddings", False)
    for name, module in list(model.named_modules()):
        style = next((cls for suffix, cls in TENSOR_PLAN.items() if name.endswith(suffix)), None)
        if style is None:
            continue
        assert sharding.split_dim(f"{name}.weight") == style.split_dim, (name, style)
        model.set_submodule(name, style.from_module(module, name, tp))
    if tied:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    return model


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over N tokens from vocab-parallel logits (N, V / tp), never gathered."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        logits_max = logits.max(dim=-1).values  # (N,)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max[:, None]  # (N, V / tp)
        local = labels - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])  # label owned by another rank
        local = local.masked_fill(outside, 0)
        target = shifted.gather(-1, local[:, None]).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), target])  # (2, N): one all-reduce for both
        dist.all_reduce(sums, group=group)
        sum_exp, target = sums
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local, outside)  # softmax, (N, V / tp)
        return (sum_exp.log() - target).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local[:, None], (outside.to(softmax.dtype) - 1.0)[:, None])
        return grad_logits.mul_(grad / softmax.shape[0]), None, None, None


def loss_function(tp: TensorSlice, vocab_size: int):
    """(logits, shifted labels (B, T)) -> mean loss; logits are this rank's (B, T, V / tp)."""
    if tp.size == 1:
        return causal_lm_loss
    start = tp.vocab_range(vocab_size).start

    def vocab_parallel_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCrossEntropy.apply(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                start, tp.group)

    return vocab_parallel_causal_lm_loss


def gather_state_dict(model: nn.Module, tp: TensorSlice) -> dict[str, torch.Tensor]:
    """All-gather a tensor-parallel model back into the full HF state dict (on every rank)."""
    local = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [None] * tp.size  # type: ignore[list-item]
    dist.all_gather_object(shards, local, group=tp.group)
    return {key: sharding.merge(key, [s[key] for s in shards]) for key in local}
