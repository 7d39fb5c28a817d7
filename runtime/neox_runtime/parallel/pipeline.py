"""Pipeline parallelism: a (possibly tensor-parallel) GPT-NeoX as a DeepSpeed PipelineModule.

`pipeline_layers(model)` turns the plain model's modules into pipeline layers that hold
those same modules (so a tensor-parallel plan applied before carries over): layer i is
0 = embedding, 1..L = blocks, L+1 = final norm, L+2 = head, and a layer's parameters are
named `<i>.<HF suffix>`, so a pipeline checkpoint's `layer_XX-*model_states.pt` files map
onto HF names with `hf_name`. Stages pass one tensor, the hidden state (B, T, C); each
block recomputes its rotary tables from T (cheap, and no extra tensors cross stage
borders). Tied embeddings are one module on the first and the last stage (DeepSpeed's
TiedLayerSpec all-reduces its gradient between them, per tensor rank).

`NeoXPipeline` partitions stages by `ParallelLayout.stage_layers` (what the planner
counts), not by DeepSpeed's own methods.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.api.layout import ParallelLayout
from neox_runtime.model import Block, GPTNeoXForCausalLM, RotaryEmbedding
from neox_runtime.parallel.tensor import VocabParallelEmbedding, vocab_parallel_logits

TIED_KEY = "embed"


class EmbedPipe(nn.Module):
    def __init__(self, embed_in: nn.Module):
        super().__init__()
        self.embed_in = embed_in

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)  # (B, T, C)


class BlockPipe(nn.Module):
    """One block as a pipeline layer, (B, T, C) -> (B, T, C); it adopts the block's children by name."""

    def __init__(self, block: Block, arch: ModelArchitecture):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)  # parameter names stay the HF suffixes
        self.use_parallel_residual = block.use_parallel_residual
        self.rotary = RotaryEmbedding(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(torch.arange(x.shape[1], device=x.device), dtype=x.dtype)
        return Block.forward(self, x, cos, sin)  # type: ignore[arg-type]


class FinalNormPipe(nn.Module):
    def __init__(self, final_layer_norm: nn.Module):
        super().__init__()
        self.final_layer_norm = final_layer_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(x)


class HeadPipe(nn.Module):
    def __init__(self, embed_out: nn.Module):
        super().__init__()
        self.embed_out = embed_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_out(x)  # (B, T, V) or this tensor rank's (B, T, V / tp)


def _tied_head(module: EmbedPipe, x: torch.Tensor) -> torch.Tensor:
    embedding = module.embed_in
    if isinstance(embedding, VocabParallelEmbedding):
        return vocab_parallel_logits(x, embedding.weight, embedding.tp)  # (B, T, V / tp)
    return torch.nn.functional.linear(x, embedding.weight)  # (B, T, V)


def _tied_spec(module: EmbedPipe, forward_fn=None):
    """A TiedLayerSpec whose module is already built (DeepSpeed builds specs itself)."""
    from deepspeed.pipe import TiedLayerSpec

    class BuiltTiedLayerSpec(TiedLayerSpec):
        def build(self, log=False):  # noqa: ARG002 - DeepSpeed's signature
            return module

    return BuiltTiedLayerSpec(TIED_KEY, EmbedPipe, forward_fn=forward_fn, tied_weight_attr=["embed_in.weight"])


def pipeline_layers(model: GPTNeoXForCausalLM) -> list:
    """Layers 0 embedding, 1..L blocks, L+1 final norm, L+2 head (tied: the embedding again)."""
    arch = model.arch
    embed = EmbedPipe(model.gpt_neox.embed_in)
    blocks = [BlockPipe(block, arch) for block in model.gpt_neox.layers]
    norm = FinalNormPipe(model.gpt_neox.final_layer_norm)
    if arch.tie_word_embeddings:
        return [_tied_spec(embed), *blocks, norm, _tied_spec(embed, forward_fn=_tied_head)]
    return [embed, *blocks, norm, HeadPipe(model.embed_out)]


def stage_bounds(layout: ParallelLayout, num_layers: int) -> list[int]:
    """Pipeline-layer boundaries of the stages (DeepSpeed's `parts`): stage s holds [b[s], b[s + 1])."""
    stages = layout.stage_layers(num_layers)
    return [0, *(1 + r.start for r in stages[1:]), num_layers + 3]


def layer_module(layer) -> nn.Module | None:
    """The module a pipeline layer (a module, a built tied spec, or DeepSpeed's partial) holds."""
    if isinstance(layer, functools.partial):
        layer = layer.args[0]
    if hasattr(layer, "build") and not isinstance(layer, nn.Module):
        layer = layer.build()
    return layer if isinstance(layer, nn.Module) else None


def hf_name(layer: int, name: str, num_layers: int) -> str | None:
    """HF state-dict name of parameter `name` of pipeline layer `layer` (None: not a weight)."""
    if name.startswith("rotary."):
        return None
    if layer == 0:
        return "gpt_neox.embed_in.weight"
    if layer <= num_layers:
        return f"gpt_neox.layers.{layer - 1}.{name}"
    if layer == num_layers + 1:
        return f"gpt_neox.{name}"
    return "embed_out.weight" if name == "embed_out.weight" else "gpt_neox.embed_in.weight"


def neox_pipeline(layers: list, layout: ParallelLayout, num_layers: int, **kwargs):
    """DeepSpeed's PipelineModule over `layers`, stages as `layout.stage_layers` partitions them."""
    from deepspeed.pipe import PipelineModule

    class NeoXPipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):  # noqa: ARG002 - our partition, not a method name
            self.parts = stage_bounds(layout, num_layers)
            self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    return NeoXPipeline(layers=layers, **kwargs)
