"""Our GPT-NeoX matches transformers' GPTNeoXForCausalLM on the same weights."""

import pytest
import torch
import transformers

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import GPTNeoXForCausalLM, RotaryEmbedding, apply_rotary


def hf_model(arch: ModelArchitecture) -> transformers.GPTNeoXForCausalLM:
    config = transformers.GPTNeoXConfig(**arch.to_hf_config())
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm / bias values, so a swapped name would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_state_dict(model: transformers.GPTNeoXForCausalLM) -> dict[str, torch.Tensor]:
    """transformers 5 names the head `lm_head` in memory; published files (and ours) say `embed_out`."""
    return {k.replace("lm_head.", "embed_out."): v for k, v in model.state_dict().items()}


CASES = [
    dict(rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False),
    dict(rotary_pct=1.0, use_parallel_residual=False, hidden_act="gelu_fast", tie_word_embeddings=False),
    dict(rotary_pct=0.25, use_parallel_residual=False, hidden_act="gelu_new", tie_word_embeddings=True),
    dict(rotary_pct=1.0, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=True,
         rotary_emb_base=500.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_logits_equal_transformers(case):
    arch = ModelArchitecture(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=64, **case)
    ref = hf_model(arch)
    ours = GPTNeoXForCausalLM(arch).eval()
    assert set(ours.state_dict()) == set(hf_state_dict(ref))
    ours.load_state_dict(hf_state_dict(ref))
    ids = torch.randint(0, arch.vocab_size, (2, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
        assert got.shape == (2, 17, arch.vocab_size)
        assert (got - expected).abs().max().item() <= 1e-4
        # explicit, offset positions (as a KV-cache server uses them) also agree
        pos = torch.arange(5, 22).expand(2, -1)
        assert (ours(ids, pos) - ref(ids, position_ids=pos).logits).abs().max().item() <= 1e-4


def test_tied_embeddings_share_storage(tiny_arch):
    arch = tiny_arch.model_copy(update=dict(tie_word_embeddings=True))
    model = GPTNeoXForCausalLM(arch)
    assert model.embed_out.weight.data_ptr() == model.gpt_neox.embed_in.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == arch.num_parameters()


def test_parameter_count_matches_architecture(tiny_arch):
    assert sum(p.numel() for p in GPTNeoXForCausalLM(tiny_arch).parameters()) == tiny_arch.num_parameters()


def test_partial_rotary_leaves_pass_through_dims(tiny_arch):
    rot = RotaryEmbedding(tiny_arch)
    cos, sin = rot(torch.arange(6))
    q, k = torch.randn(2, 1, 4, 6, tiny_arch.head_dim).unbind(0)
    q2, k2 = apply_rotary(q, k, cos, sin, tiny_arch.rotary_ndims)
    r = tiny_arch.rotary_ndims
    assert torch.equal(q2[..., r:], q[..., r:]) and torch.equal(k2[..., r:], k[..., r:])
    assert not torch.allclose(q2[..., 1:, :r], q[..., 1:, :r])
    torch.testing.assert_close(q2[..., 0, :], q[..., 0, :])  # position 0 is the identity


def test_activation_checkpointing_gives_same_gradients(tiny_arch):
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(tiny_arch)
    ids = torch.randint(0, tiny_arch.vocab_size, (2, 9))
    model(ids).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_activation_checkpointing(True)
    model(ids).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad)

