"""The model runner: one forward pass over a step's rows, using the module's own weights.

It does not redefine GPT-NeoX: it reads the parameters of `neox_runtime.model`'s
`GPTNeoXForCausalLM` (views, not copies, at TP 1; this rank's shard under TP) and reuses
its `RotaryEmbedding` tables, but owns attention so that K/V go to the engine's cache. A
step's rows are flat (N tokens, no padding): decode rows first, one per running sequence,
then prefill chunks. Every linear layer is one matmul over all rows; rotary embedding is
applied to q and k together, in place in the QKV output; decode attention reads a strided
view of the cache with a length mask (on CPU, where the cache is float32, two batched
matmuls: no slower than SDPA's float32 kernel and much faster than its bfloat16 one; SDPA
on GPU); each prefill chunk attends with SDPA. Attention runs in the cache's dtype. Only
rows that sample produce logits.

Shapes: N rows, C hidden, H heads on this rank, D head_dim, R rotary dims, S slots, L length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import GELU_APPROXIMATION, GPTNeoXForCausalLM, RotaryEmbedding, rotary_width
from neox_runtime.serve.engine.kv_cache import KVCache, kv_cache_dtype



class Linear:
    """y = x W^T + b, optionally followed by GELU, with W prepacked once into oneDNN's blocked layout on CPU.

    Decode steps multiply a few dozen rows by every weight, so the GEMM's own reordering
    of W dominates; prepacking (what torch.compile's CPU backend does with frozen weights)
    makes the 70M shape's decode matmuls 25-50% faster in float32 and bfloat16. The MLP's
    GELU runs inside the packed GEMM as oneDNN's post-op (no second pass over the 4h-wide
    activations: 4-18% faster at 1,024 prefill rows). Falls back to `F.linear` where oneDNN
    is missing or the packed product disagrees with it, and in float32 for one or two rows,
    where MKL's matrix-vector path is faster than the packed GEMM.
    """

    __slots__ = ("w", "b", "gelu", "packed", "min_rows")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, pack: bool, gelu: str | None = None):
        """`gelu`: None, or the GELU to apply, as F.gelu's `approximate` ("none" = erf, "tanh")."""
        self.w, self.b, self.gelu, self.packed = w, b, gelu, None
        self.min_rows = 3 if w.dtype == torch.float32 else 1
        if pack and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) \
                and torch.backends.mkldnn.is_available():
            try:
                with torch.no_grad():
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 32)
                    x = torch.randn(8, w.shape[1], dtype=w.dtype)
                    tol = 1e-2 if w.dtype == torch.bfloat16 else 1e-4
                    if not torch.allclose(self(x).float(), self._reference(x).float(), rtol=tol, atol=tol):
                        self.packed = None
            except (RuntimeError, AttributeError):
                self.packed = None

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.w, self.b)
        return y if self.gelu is None else F.gelu(y, approximate=self.gelu)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] >= self.min_rows:
            if self.gelu is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "gelu", [], self.gelu)
        return self._reference(x)


@dataclass
class PrefillChunk:
    row: int  # first row of the chunk in the step
    slot: int
    start: int  # position of the chunk's first token
    length: int


@dataclass
class StepPlan:
    """Everything a rank needs to execute one step; rank 0 broadcasts it under TP."""

    token_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    slots: torch.Tensor  # (N,) int64
    num_decode: int
    prefill: list[PrefillChunk]
    sample_rows: torch.Tensor  # (M,) rows whose next-token logits are wanted


@dataclass
class LayerWeights:
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor]  # (3 H D, C), HF layout (H, 3, D)
    dense: tuple[torch.Tensor, torch.Tensor | None]  # bias only on rank 0
    fc1: tuple[torch.Tensor, torch.Tensor]
    fc2: tuple[torch.Tensor, torch.Tensor | None]


def shard_layer(block: torch.nn.Module, arch: ModelArchitecture, rank: int, world: int) -> LayerWeights:
    """This rank's Megatron shard of one block: QKV and fc1 by output, dense and fc2 by input."""
    att, mlp = block.attention, block.mlp
    ln1 = (block.input_layernorm.weight, block.input_layernorm.bias)
    ln2 = (block.post_attention_layernorm.weight, block.post_attention_layernorm.bias)
    if world == 1:
        return LayerWeights(ln1, ln2, (att.query_key_value.weight, att.query_key_value.bias),
                            (att.dense.weight, att.dense.bias),
                            (mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias),
                            (mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias))
    H, D, C, Fi = arch.num_attention_heads, arch.head_dim, arch.hidden_size, arch.intermediate_size
    if H % world or Fi % world:
        raise ValueError(f"tensor_parallel={world} must divide heads ({H}) and intermediate_size ({Fi})")
    h0, h1 = rank * H // world, (rank + 1) * H // world
    f0, f1 = rank * Fi // world, (rank + 1) * Fi // world
    qkv_w = att.query_key_value.weight.view(H, 3, D, C)[h0:h1].reshape(-1, C).clone()
    qkv_b = att.query_key_value.bias.view(H, 3, D)[h0:h1].reshape(-1).clone()
    first = rank == 0
    return LayerWeights(
        ln1, ln2, (qkv_w, qkv_b),
        (att.dense.weight[:, h0 * D:h1 * D].clone(), att.dense.bias if first else None),
        (mlp.dense_h_to_4h.weight[f0:f1].clone(), mlp.dense_h_to_4h.bias[f0:f1].clone()),
        (mlp.dense_4h_to_h.weight[:, f0:f1].clone(), mlp.dense_4h_to_h.bias if first else None),
    )


class ModelRunner:
    def __init__(self, model: GPTNeoXForCausalLM, arch: ModelArchitecture, *, num_slots: int,
                 max_len: int, rank: int = 0, world: int = 1, prepack: bool = True):
        self.arch, self.rank, self.world = arch, rank, world
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.embed = model.gpt_neox.embed_in.weight
        self.ln_f = (model.gpt_neox.final_layer_norm.weight, model.gpt_neox.final_layer_norm.bias)
        self.unembed = model.embed_out.weight
        self.layers = [shard_layer(b, arch, rank, world) for b in model.gpt_neox.layers]
        gelu = GELU_APPROXIMATION[arch.hidden_act]
        self.linears = [(Linear(*w.qkv, prepack), Linear(*w.dense, prepack), Linear(*w.fc1, prepack, gelu=gelu),
                         Linear(*w.fc2, prepack)) for w in self.layers]
        self.lm_head = Linear(self.unembed, None, prepack)
        self.num_heads = arch.num_attention_heads // world
        self.head_dim, self.rotary_ndims = arch.head_dim, rotary_width(arch)
        self.kv_dtype = kv_cache_dtype(self.dtype, self.device)
        # Decode attention as batched matmuls where that is faster than SDPA (see the module doc).
        self.bmm_decode = self.device.type == "cpu" and self.kv_dtype == torch.float32
        positions = torch.arange(max_len, device=self.device)
        cos, sin = RotaryEmbedding(arch).to(self.device)(positions, dtype=self.dtype)  # (L, R)
        self.cos, self.sin = cos, sin
        self.cache = KVCache(num_layers=arch.num_hidden_layers, num_slots=num_slots,
                             num_heads=self.num_heads, max_len=max_len, head_dim=arch.head_dim,
                             dtype=self.kv_dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step; returns float32 logits (M, V) of the sample rows on rank 0, else None."""
        ids, pos, slots = (t.to(self.device) for t in (plan.token_ids, plan.positions, plan.slots))
        x = F.embedding(ids, self.embed)  # (N, C)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (N, 1, 1, R)
        decode = self._decode_layout(plan, pos, slots)
        eps, C = self.arch.layer_norm_eps, self.arch.hidden_size
        for i, w in enumerate(self.layers):
            h = F.layer_norm(x, (C,), *w.ln1, eps)
            lin = self.linears[i]
            attn = lin[1](self._attention(i, lin[0], h, plan, cos, sin, pos, slots, decode))
            if self.arch.use_parallel_residual:
                out = attn + self._mlp(lin, F.layer_norm(x, (C,), *w.ln2, eps))
                x = x + self._reduce(out)
            else:
                x = x + self._reduce(attn)
                x = x + self._reduce(self._mlp(lin, F.layer_norm(x, (C,), *w.ln2, eps)))
        if self.rank != 0:
            return None
        h = F.layer_norm(x[plan.sample_rows.to(self.device)], (C,), *self.ln_f, eps)
        return self.lm_head(h).float()  # (M, V)

    def _mlp(self, lin: tuple[Linear, ...], h: torch.Tensor) -> torch.Tensor:
        return lin[3](lin[2](h))  # fc1 applies the GELU

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def _decode_layout(self, plan: StepPlan, pos: torch.Tensor, slots: torch.Tensor):
        """Slot window, row->slot map and length mask shared by all layers' decode attention."""
        nd = plan.num_decode
        if nd == 0:
            return None
        dslots = slots[:nd]
        lo, hi = int(dslots.min()), int(dslots.max()) + 1
        lengths = torch.ones(hi - lo, dtype=torch.long, device=self.device)  # holes see position 0 only
        lengths[dslots - lo] = pos[:nd] + 1
        lmax = int(lengths.max())
        valid = torch.arange(lmax, device=self.device)[None, :] < lengths[:, None]  # (S, L)
        bias = torch.zeros(valid.shape, dtype=self.kv_dtype, device=self.device)
        bias.masked_fill_(~valid, float("-inf"))
        packed = hi - lo == nd and bool((dslots == torch.arange(lo, hi, device=self.device)).all())
        return lo, hi, lmax, dslots - lo, bias[:, None, None, :], packed  # bias (S, 1, 1, L)

    def _attention(self, i, qkv_proj, h, plan, cos, sin, pos, slots, decode) -> torch.Tensor:
        N, H, D = h.shape[0], self.num_heads, self.head_dim
        qkv = qkv_proj(h).view(N, H, 3, D)  # HF layout: per head q, k, v
        self._rotate(qkv[:, :, :2], cos, sin)
        q, k, v = (t.to(self.kv_dtype) for t in qkv.unbind(2))  # (N, H, D); strided views when dtypes agree
        kc, vc = self.cache.k[i], self.cache.v[i]  # (S, H, L, D)
        kc[slots, :, pos] = k
        vc[slots, :, pos] = v
        out = torch.empty(N, H, D, dtype=self.kv_dtype, device=h.device)
        if decode is not None:
            out[:plan.num_decode] = self._decode_attention(q[:plan.num_decode], kc, vc, decode)
        for c in plan.prefill:
            qc = q[c.row:c.row + c.length].transpose(0, 1)[None]  # (1, H, T, D)
            end = c.start + c.length
            kk, vv = kc[c.slot:c.slot + 1, :, :end], vc[c.slot:c.slot + 1, :, :end]
            if c.start == 0:
                y = F.scaled_dot_product_attention(qc, kk, vv, is_causal=True)
            else:
                rows = torch.arange(c.start, end, device=h.device)[:, None]
                mask = torch.arange(end, device=h.device)[None, :] <= rows  # (T, end)
                y = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=mask)
            out[c.row:c.row + c.length] = y[0].transpose(0, 1)
        return out.view(N, H * D).to(h.dtype)

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotary embedding in place on the first R dims of q and k, qk (N, H, 2, D); cos/sin (N, 1, 1, R)."""
        x = qk[..., :self.rotary_ndims]
        half = self.rotary_ndims // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # HF's rotate_half
        x.mul_(cos).add_(rotated.mul_(sin))

    def _decode_attention(self, q, kc, vc, decode) -> torch.Tensor:
        """q (n, H, D) of the decode rows -> (n, H, D), each row over its own slot's first `length` positions."""
        lo, hi, lmax, rows, bias, packed = decode
        S, H, D = hi - lo, q.shape[1], q.shape[2]
        if packed:
            qs = q
        else:  # holes in the slot window get zero queries; their rows are dropped below
            qs = q.new_zeros(S, H, D)
            qs[rows] = q
        kk, vv = kc[lo:hi, :, :lmax], vc[lo:hi, :, :lmax]  # (S, H, L, D) strided views
        if self.bmm_decode:
            scores = torch.baddbmm(bias.expand(S, H, 1, lmax).reshape(S * H, 1, lmax),
                                   qs.reshape(S * H, 1, D), kk.reshape(S * H, lmax, D).transpose(1, 2),
                                   alpha=D ** -0.5)  # (S H, 1, L)
            y = torch.bmm(scores.softmax(dim=-1), vv.reshape(S * H, lmax, D)).view(S, H, D)
        else:
            y = F.scaled_dot_product_attention(qs[:, :, None], kk, vv, attn_mask=bias)[:, :, 0]  # (S, H, D)
        return y if packed else y[rows]
