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
        if not torch.backends.mkldnn.is_available():
            pytest.skip("no oneDNN: the packed path is the fallback")
