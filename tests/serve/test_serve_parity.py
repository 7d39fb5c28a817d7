"""Greedy decoding equals transformers `generate` on the same weights, across NeoX variants.

The engine's own attention/KV-cache path (batched decode, chunked prefill) must give the
exact token sequence of the reference implementation, for every architecture knob.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from serve_helpers import reference_logprobs, run_all
from neox_runtime.serve.config import EngineConfig
from neox_runtime.serve.engine.build import build_engine
from neox_runtime.serve.engine.sequence import SamplingParams

PROMPTS = ["the model serves", "Kubernetes schedules GPUs and the operator reconciles state; a request streams",
           "safety", "training saves checkpoints while the cluster scales pods and the model serves tokens"]

VARIANTS = {
    "rotary0.25-parallel-gelu-newkeys": dict(rotary_pct=0.25, parallel_residual=True, act="gelu", key_style="new"),
    "rotary1.0-sequential-gelufast-oldkeys": dict(rotary_pct=1.0, parallel_residual=False, act="gelu_fast",
                                                  key_style="old"),
    "rotary0.25-sequential-gelu-oldkeys": dict(rotary_pct=0.25, parallel_residual=False, act="gelu",
                                               key_style="old"),
    "rotary1.0-parallel-gelufast-newkeys": dict(rotary_pct=1.0, parallel_residual=True, act="gelu_fast",
                                                key_style="new", heads=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("token_budget", [256, 7], ids=["batched-prefill", "chunked-prefill"])
def test_greedy_equals_transformers_generate(model_factory, variant, token_budget):
    path = model_factory(**VARIANTS[variant])
    engine, loaded = build_engine(EngineConfig(model=path, max_num_seqs=3, max_num_batched_tokens=token_budget))
    ids = [loaded.tokenizer.encode(p).ids for p in PROMPTS]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    out = run_all(engine, {str(i): (p, params) for i, p in enumerate(ids)})  # 4 prompts, 3 slots: join/leave
    hf = GPTNeoXForCausalLM.from_pretrained(path).eval()
    for i, p in enumerate(ids):
        x = torch.tensor([p])
        ref = hf.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[str(i)][0][0] == ref[0, len(p):].tolist(), f"prompt {i} diverged from transformers"


def test_bfloat16_serving_tracks_transformers_bfloat16(model_factory):
    """bf16 weights (float32 KV cache on CPU): each chosen token's logprob matches transformers in bf16."""
    path = model_factory(**VARIANTS["rotary0.25-parallel-gelu-newkeys"])
    engine, loaded = build_engine(EngineConfig(model=path, dtype="bfloat16", max_num_seqs=4,
                                               max_num_batched_tokens=64))
    ids = [loaded.tokenizer.encode(p).ids for p in PROMPTS]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    out = run_all(engine, {str(i): (p, params) for i, p in enumerate(ids)})
    hf = GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    worst = 0.0
    for i, p in enumerate(ids):
        tokens, _, _, lps = out[str(i)][0]
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p + tokens])).logits[0].float(), dim=-1)
        for t, (tok, lp) in enumerate(zip(tokens, lps)):
            worst = max(worst, abs(lp.logprob - ref[len(p) - 1 + t, tok].item()))
    assert worst < 0.05, worst


@pytest.mark.parametrize("token_budget", [256, 7], ids=["batched-prefill", "chunked-prefill"])
def test_prompt_logprobs_equal_transformers(model_factory, token_budget):
    """Echo with logprobs (how lm-evaluation-harness scores text): the prompt's own logprobs."""
    path = model_factory(**VARIANTS["rotary1.0-sequential-gelufast-oldkeys"])
    engine, loaded = build_engine(EngineConfig(model=path, max_num_seqs=3, max_num_batched_tokens=token_budget))
    ids = [loaded.tokenizer.encode(p).ids for p in PROMPTS]
    out = {}
    for rid, (p, max_tokens) in enumerate(zip(ids, [0, 3, 0, 1])):
        engine.add_request(str(rid), p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                       prompt_logprobs=2))
    while engine.has_work():
        for d in engine.step():
            if d.prompt_logprobs is not None:
                out[d.request_id] = d.prompt_logprobs
            assert d.finish_reason is None or d.num_output_tokens == [0, 3, 0, 1][int(d.request_id)]
    hf = GPTNeoXForCausalLM.from_pretrained(path).eval()
    for i, p in enumerate(ids):
        got = out[str(i)]
        assert [g.token_id for g in got] == p and got[0].logprob is None and got[0].top is None
        ref = reference_logprobs(hf, p)  # (T, V)
        for t in range(1, len(p)):
            assert abs(got[t].logprob - ref[t - 1, p[t]].item()) < 1e-4, (i, t)
            assert [tok for tok, _ in got[t].top] == ref[t - 1].topk(2).indices.tolist()
