"""GPT-NeoX as a plain nn.Module whose state_dict matches Hugging Face's GPTNeoXForCausalLM.

One short file in the nanoGPT manner. Hugging Face is the numerical reference (tests
compare logits on the same weights), so any HF-format NeoX/Pythia checkpoint loads by
`load_state_dict`, and what we train loads in `transformers`. Parallelism is applied
from outside (`neox_runtime.parallel`); the serving engine reuses the building blocks
(`RotaryEmbedding`, `apply_rotary`, `Block` parts) with its own KV-cache attention.

Shapes: B batch, T sequence, C hidden, H heads (local to a tensor-parallel rank),
D head_dim, R rotary_ndims, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox_runtime.api.architecture import ModelArchitecture

# gelu_fast and gelu_new are both the tanh approximation (HF's FastGELU / NewGELU).
GELU_APPROXIMATION = {"gelu": "none", "gelu_fast": "tanh", "gelu_new": "tanh"}


def rotary_width(arch: ModelArchitecture) -> int:
    """Dims that actually rotate: HF builds arange(0, R, 2) frequencies, so an odd R rounds up."""
    return 2 * math.ceil(arch.rotary_ndims / 2)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, HF layout: frequencies repeated twice, (.., T, R)."""

    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        dim = arch.rotary_ndims
        inv_freq = 1.0 / (arch.rotary_emb_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (R/2,)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # (.., T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (.., T, R)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rotary_ndims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `rotary_ndims` dims of each head of q and k, (B, H, T, D).

    cos/sin are (T, R) or (B, T, R); the remaining D - R dims pass through unchanged.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, R)
    q_rot, q_pass = q[..., :rotary_ndims], q[..., rotary_ndims:]
    k_rot, k_pass = k[..., :rotary_ndims], k[..., rotary_ndims:]
    q_rot = q_rot * cos + _rotate_half(q_rot) * sin
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.head_dim = arch.head_dim
        self.rotary_ndims = rotary_width(arch)
        # Fused QKV, HF layout: output features viewed as (H, 3, D).
        self.query_key_value = nn.Linear(arch.hidden_size, 3 * arch.hidden_size)
        self.dense = nn.Linear(arch.hidden_size, arch.hidden_size)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Project and rotate: (B, T, C) -> q, k, v each (B, H, T, D). H is local under TP."""
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, -1, 3 * self.head_dim).transpose(1, 2)  # (B, H, T, 3D)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q, k = apply_rotary(q, k, cos, sin, self.rotary_ndims)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.dense_4h_to_h = nn.Linear(arch.intermediate_size, arch.hidden_size)
        self.approximate = GELU_APPROXIMATION[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.use_parallel_residual = arch.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.attention = Attention(arch)
        self.mlp = MLP(arch)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin)  # (B, T, C)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.embed_in = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(arch)
        self.activation_checkpointing = False

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.embed_in(input_ids)  # (B, T, C)
        cos, sin = self.rotary_emb(position_ids, dtype=x.dtype)  # (T, R) or (B, T, R)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.final_layer_norm(x)


def parameter_init(hf_name: str, arch: ModelArchitecture, std: float = 0.02) -> tuple[float, float]:
    """GPT-NeoX init of a parameter as (mean, std) of a normal; std 0 is the constant `mean`.

    Biases 0, LayerNorm weights 1, output layers (attention.dense, dense_4h_to_h) scaled
    by depth ("wang_init"), every other weight normal(0, std).
    """
    if hf_name.endswith("bias"):
        return 0.0, 0.0
    if "layernorm" in hf_name or "layer_norm" in hf_name:
        return 1.0, 0.0
    if hf_name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return 0.0, std / math.sqrt(2 * arch.num_hidden_layers)
    return 0.0, std


class GPTNeoXForCausalLM(nn.Module):
    """forward(input_ids (B, T), position_ids (T,) | (B, T) | None) -> logits (B, T, V)."""

    def __init__(self, arch: ModelArchitecture):
        super().__init__()
        self.arch = arch
        self.gpt_neox = GPTNeoXModel(arch)
        self.embed_out = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-NeoX init from the global RNG (`parameter_init`); training uses seeded `init_parameter`."""
        for name, p in self.named_parameters():
            mean, std = parameter_init(name, self.arch)
            if std:
                nn.init.normal_(p, mean, std)
            else:
                nn.init.constant_(p, mean)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.gpt_neox.activation_checkpointing = enabled

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_out(self.gpt_neox(input_ids, position_ids))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; labels are already shifted, (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


def flops_per_token(arch: ModelArchitecture, seq_length: int) -> float:
    """Training FLOPs per token: 6 N (matmul params) + attention scores, forward + backward."""
    n_matmul = arch.num_parameters() - arch.vocab_size * arch.hidden_size * (0 if arch.tie_word_embeddings else 1)
    attention = 6 * 2 * arch.num_hidden_layers * arch.hidden_size * seq_length  # QK^T and AV (PaLM convention: no causal discount)
    return 6 * n_matmul + attention
