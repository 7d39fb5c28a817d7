"""Pure pieces of the serving path: stream moderation, stop strings over tokens, token buckets."""

from __future__ import annotations

from tokenizers import Tokenizer

from neox_runtime.safety.moderation import BlocklistHook, StreamFilter
from neox_runtime.safety.ratelimit import RateLimited, RateLimiter, TokenBucket
from neox_runtime.safety.watermark import detect_ids
from neox_runtime.serve.engine.detokenizer import Detokenizer, DetokState


def test_stream_filter_redacts_a_term_split_across_deltas():
    f = StreamFilter([BlocklistHook(["secret"], action="redact")])
    out = "".join(f.feed(d) for d in ["the sec", "ret is ", "out", " now"]) + f.feed("", final=True)
    assert out == "the [redacted] is out now"


def test_stream_filter_refusal_stops_output_before_the_term():
    f = StreamFilter([BlocklistHook(["secret"])])
    sent = f.feed("a long preamble then se") + f.feed("cret") + f.feed(" more")
    assert f.refused and "se" not in sent.split()[-1] and f.feed(" after") == ""
    assert sent == "a long preamble then "[:len(sent)]


def test_blocklist_matches_whole_words_only():
    hook = BlocklistHook(["ass"], action="redact")
    assert hook.check_input("a class and an ass").text == "a class and an [redacted]"


def test_stop_string_spanning_tokens_is_never_sent(tokenizer_file):
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = tok.encode(" the model serves tokens quickly").ids
    detok = Detokenizer(tok)
    st = DetokState(stop=("serves tok",))
    sent = ""
    for i, t in enumerate(ids):
        sent += detok.add(st, t, final=i == len(ids) - 1)
        if st.stopped:
            break
    assert st.stopped and sent == " the model "


def test_token_bucket_refills_over_time():
    b = TokenBucket(60.0)  # one per second
    b.take(60)
    assert 0.9 < b.wait_for(1, b.stamp) <= 1.0 and b.wait_for(1, b.stamp + 1.0) == 0.0


def test_request_larger_than_the_token_quota_is_refused_with_retry_after():
    limiter = RateLimiter(None, 100)
    try:
        limiter.acquire("k", 101)
    except RateLimited as exc:
        assert exc.retry_after > 0
    else:
        raise AssertionError("expected RateLimited")


def test_watermark_detector_ignores_repeated_bigrams():
    assert detect_ids([5, 6] * 50, "k").num_tokens == 2


def test_prepacked_linear_matches_f_linear_for_every_batch_size():
    import pytest
    import torch
    import torch.nn.functional as F

    from neox_runtime.serve.engine.runner import Linear

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        w, b = torch.randn(96, 64, dtype=dtype), torch.randn(96, dtype=dtype)
        packed, plain = Linear(w, b, pack=True), Linear(w, b, pack=False)
        assert plain.packed is None
        for rows in (0, 1, 7, 32, 200):
            x = torch.randn(rows, 64, dtype=dtype)
            ref = F.linear(x, w, b).float()
            assert packed(x).shape == (rows, 96)
            assert torch.allclose(packed(x).float(), ref, rtol=tol, atol=tol)
            assert torch.equal(plain(x).float(), ref)
        for approximate in ("none", "tanh"):  # the MLP's fc1 with its GELU fused into the packed GEMM
            fused = Linear(w, b, pack=True, gelu=approximate)
            for rows in (1, 32, 200):
                x = torch.randn(rows, 64, dtype=dtype)
                ref = F.gelu(F.linear(x, w, b), approximate=approximate).float()
                assert torch.allclose(fused(x).float(), ref, rtol=tol, atol=tol)
        if not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN: the packed path is the fallback")


def test_engine_thread_builds_the_engine_and_runs_its_steps(model_dir):
    """The model must be loaded on the thread that steps it (one OpenMP pool; see async_engine)."""
    import asyncio
    import threading

    import pytest

    from neox_runtime.serve.config import EngineConfig
    from neox_runtime.serve.engine.async_engine import AsyncEngine
    from neox_runtime.serve.engine.build import build_engine
    from neox_runtime.serve.engine.sequence import SamplingParams

    seen: dict = {"stepped_on": set()}

    def build():
        seen["built_on"] = threading.current_thread()
        engine, loaded = build_engine(EngineConfig(model=model_dir, max_num_seqs=2, max_num_batched_tokens=64))
        seen["prompt"] = loaded.tokenizer.encode("the model serves").ids
        step = engine.step

        def recorded_step():
            seen["stepped_on"].add(threading.current_thread())
            return step()

        engine.step = recorded_step
        return engine

    engine = AsyncEngine(build)
    assert seen["built_on"] is not threading.current_thread()

    async def generate():
        engine.start(asyncio.get_running_loop())
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        return [d async for d in engine.generate("r", seen["prompt"], params)]

    try:
        deltas = asyncio.run(generate())
    finally:
        engine.shutdown()
    assert sum(len(d.token_ids) for d in deltas) == 3
    assert seen["stepped_on"] == {seen["built_on"]}

    def broken():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(broken)


def test_watermark_green_lists_agree_between_sampler_and_detector():
    import numpy as np
    import torch

    from neox_runtime.safety.watermark import green_mask

    prev = [0, 7, 50_000, 2**20]
    vocab = list(range(0, 60_000, 7))
    on_torch = green_mask(torch.tensor(prev)[:, None], torch.tensor(vocab), 12345, 0.25).numpy()
    on_numpy = green_mask(np.array(prev, dtype=np.int64)[:, None], np.array(vocab, dtype=np.int64), 12345, 0.25)
    assert (on_torch == on_numpy).all() and 0.2 < on_numpy.mean() < 0.3


def test_decode_attention_paths_agree_with_holes_in_the_slot_window():
    import torch

    from neox_runtime.api.architecture import PRESETS
    from neox_runtime.model import GPTNeoXForCausalLM
    from neox_runtime.serve.engine.runner import ModelRunner, StepPlan

    arch = PRESETS["tiny"].architecture
    runner = ModelRunner(GPTNeoXForCausalLM(arch).eval(), arch, num_slots=6, max_len=32)
    assert runner.bmm_decode  # float32 on CPU
    torch.manual_seed(0)
    runner.cache.k.normal_()
    runner.cache.v.normal_()
    H, D = runner.num_heads, runner.head_dim
    pos = torch.tensor([5, 17, 2, 30])
    slots = torch.tensor([1, 2, 4, 5])  # slot 3 is a hole
    plan = StepPlan(token_ids=torch.zeros(4, dtype=torch.long), positions=pos, slots=slots, num_decode=4,
                    prefill=[], sample_rows=torch.arange(4))
    layout = runner._decode_layout(plan, pos, slots)
    q = torch.randn(4, H, D)
    kc, vc = runner.cache.k[0], runner.cache.v[0]
    fast = runner._decode_attention(q, kc, vc, layout)
    runner.bmm_decode = False
    sdpa = runner._decode_attention(q, kc, vc, layout)
    ref = torch.stack([torch.softmax(kc[s, :, :p + 1] @ q[r][:, :, None] / D ** 0.5, dim=1).transpose(1, 2)
                       @ vc[s, :, :p + 1] for r, (s, p) in enumerate(zip(slots.tolist(), pos.tolist()))])[:, :, 0]
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(sdpa, ref, atol=1e-5)
