"""Pipeline parallelism: the same GPT-NeoX blocks as a DeepSpeed PipelineModule.

Stages pass one tensor, the hidden state (B, T, C); each block recomputes its rotary
tables from T (cheap, and no extra tensors cross stage borders). Layer i of the pipeline:
0 = embedding, 1..L = blocks, L+1 = final norm, L+2 = head, so a pipeline checkpoint's
`layer_XX-model_states.pt` files map onto HF names with `hf_name`. Tied embeddings use
DeepSpeed's TiedLayerSpec so the first and last stage share (and all-reduce) one matrix.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import Block, RotaryEmbedding, causal_lm_loss


class EmbedPipe(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.embed_in = nn.Embedding(arch.vocab_size, arch.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_in(input_ids)  # (B, T, C)


class BlockPipe(Block):
    def __init__(self, arch: ModelArchitecture):
        super().__init__(arch)
        self.rotary = RotaryEmbedding(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        cos, sin = self.rotary(torch.arange(x.shape[1], device=x.device), dtype=x.dtype)
        return super().forward(x, cos, sin)


class FinalNormPipe(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.final_layer_norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(x)


class HeadPipe(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.embed_out = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_out(x)  # (B, T, V)


def _tied_head(module: EmbedPipe, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, module.embed_in.weight)  # (B, T, V)


def pipeline_module(arch: ModelArchitecture, num_stages: int, activation_checkpoint_interval: int = 0):
    """Layers: 0 embedding, 1..L blocks, L+1 final norm, L+2 head (tied: the embedding again)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    blocks = [LayerSpec(BlockPipe, arch) for _ in range(arch.num_hidden_layers)]
    if arch.tie_word_embeddings:
        first = TiedLayerSpec("embed", EmbedPipe, arch, tied_weight_attr=["embed_in.weight"])
        last = TiedLayerSpec("embed", EmbedPipe, arch, forward_fn=_tied_head, tied_weight_attr=["embed_in.weight"])
    else:
        first, last = LayerSpec(EmbedPipe, arch), LayerSpec(HeadPipe, arch)
    pipe = PipelineModule(layers=[first, *blocks, LayerSpec(FinalNormPipe, arch), last], num_stages=num_stages,
                          loss_fn=causal_lm_loss, partition_method="type:BlockPipe",
                          activation_checkpoint_interval=activation_checkpoint_interval)
    # DeepSpeed's gradient clipping sums norms over the model-parallel group only for
    # parameters flagged model_parallel (else only model-parallel rank 0's count), and
    # PipelineModule flags none: without this every stage would clip by stage 0's norm.
    # A tied embedding is counted once, on the first stage that holds it.
    for p in pipe.parameters():
        p.model_parallel = True
    if pipe.tied_modules and pipe.stage_id != 0:
        for p in pipe.tied_modules.parameters():
            p.model_parallel = False
    return pipe


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


def load_from_full(pipe, full_state: dict[str, torch.Tensor], num_layers: int) -> None:
    """Copy a full HF state dict into this rank's stage of `pipe` (a PipelineModule)."""
    with torch.no_grad():
        for idx, layer in zip(range(pipe._local_start, pipe._local_stop), pipe.forward_funcs):
            module = layer.args[0] if isinstance(layer, functools.partial) else layer  # tied head
            if not isinstance(module, nn.Module):
                continue
            for name, p in module.named_parameters():
                key = hf_name(idx, name, num_layers)
                if key is not None:
                    p.copy_(full_state[key])
