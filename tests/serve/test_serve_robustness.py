"""One bad request fails alone, on a real server: hostile inputs, failures inside a step, disconnects.

Every hostile request is followed by a normal one that must succeed, while a long greedy
request streams alongside and must end exactly as it does alone. Failures that no input
reaches any more are injected through the engine's real extension points (a logits
processor, a wrapped executor) to prove that only the request that causes one fails.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from serve_helpers import RunningServer, serve_config

BUDGET = 5  # tokens per step: a 6-token prompt prefills as 5 + 1, its last chunk one token
VOCAB = 320  # the test tokenizer's (and so the tiny model's) vocabulary
NORMAL = {"prompt": "the model serves", "max_tokens": 2, "ignore_eos": True}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def hostile(model_dir):
    srv = RunningServer(serve_config(model_dir, max_num_seqs=4, max_num_batched_tokens=BUDGET))
    yield srv
    srv.stop()


def post(srv, path: str, body, timeout: float = 120) -> httpx.Response:
    """JSON with ASCII escapes (json.dumps' default), so lone surrogates travel as `\\udXXX`; raw bytes as given."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_normal_request_works(srv) -> None:
    r = post(srv, "/v1/completions", NORMAL)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(srv.url + "/health").status_code == 200


def _ids(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


SCORING = {  # echo + logprobs + max_tokens 0/1: (body, prompt tokens scored)
    "one-token prompt": ({"prompt": [316], "echo": True, "logprobs": 1, "max_tokens": 0}, 1),
    "empty prompt": ({"prompt": "", "echo": True, "logprobs": 1, "max_tokens": 0}, 1),
    "one-token last chunk": ({"prompt": _ids(BUDGET + 1), "echo": True, "logprobs": 1, "max_tokens": 0},
                             BUDGET + 1),
    "one-token last chunk, logprobs 0": ({"prompt": _ids(2 * BUDGET + 1), "echo": True, "logprobs": 0,
                                          "max_tokens": 0}, 2 * BUDGET + 1),
    "one-token last chunk, logprobs 20, one new token": ({"prompt": _ids(BUDGET + 1), "echo": True,
                                                          "logprobs": 20, "max_tokens": 1, "ignore_eos": True},
                                                         BUDGET + 1),
    "one-token prompt, one new token": ({"prompt": [316], "echo": True, "logprobs": 2, "max_tokens": 1,
                                         "ignore_eos": True}, 1),
    "batch of one-token and chunked prompts": ({"prompt": [[5], _ids(BUDGET + 1), [7, 8]], "echo": True,
                                                "logprobs": 1, "max_tokens": 0}, None),
    "streamed one-token prompt": ({"prompt": [316], "echo": True, "logprobs": 1, "max_tokens": 0,
                                   "stream": True}, None),
}


@pytest.mark.parametrize("case", SCORING)
def test_scoring_prompts_with_one_token_chunks_succeed_and_the_engine_lives(hostile, case):
    body, scored = SCORING[case]
    r = post(hostile, "/v1/completions", body)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        for choice in r.json()["choices"]:
            lp = choice["logprobs"]
            assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
            assert choice["finish_reason"] == "length"
        if scored is not None:
            lp = r.json()["choices"][0]["logprobs"]
            assert len(lp["tokens"]) == scored + body["max_tokens"]
            k = body["logprobs"]  # alternatives keyed by token text: two ids may decode alike
            assert all(min(k, 1) <= len(t) <= k for t in lp["top_logprobs"][1:])
    assert_normal_request_works(hostile)


V = VOCAB
HOSTILE = {  # name: (path, body, status, param)
    # sizes
    "max_tokens 1": ("/v1/completions", {"prompt": "hi", "max_tokens": 1}, 200, None),
    "n 16 over four prompts": ("/v1/completions", {"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 2,
                                                   "ignore_eos": True}, 200, None),
    "logprobs 0": ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 0}, 200, None),
    "logprobs 20": ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 20}, 200, None),
    "chat top_logprobs 20": ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "logprobs": True,
                                                      "top_logprobs": 20}, 200, None),
    "chat top_logprobs 0": ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "logprobs": True,
                                                     "top_logprobs": 0}, 200, None),
    "top_logprobs without logprobs": ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, 400,
                                      "top_logprobs"),
    "logit_bias at the vocabulary's last id": ("/v1/completions", {"prompt": "hi", "max_tokens": 3,
                                                                   "logit_bias": {str(V - 1): 100}}, 200, None),
    "logit_bias one past the vocabulary": ("/v1/completions", {"prompt": "hi", "logit_bias": {str(V): 1}}, 400,
                                           "logit_bias"),
    "token id one past the vocabulary": ("/v1/completions", {"prompt": [1, V]}, 400, "prompt"),
    "stop straddling tokens": ("/v1/completions", {"prompt": "the model serves", "max_tokens": 12,
                                                   "stop": ["e t", "s q", "\n"]}, 200, None),
    # unicode
    "emoji, combining, RTL, ZWJ": ("/v1/completions", {"prompt": "\U0001f600 e\u0301 \u0647\u200d", "max_tokens": 2},
                                   200, None),
    "NUL and U+FFFF": ("/v1/completions", {"prompt": "\u0000x\uffff", "max_tokens": 2}, 200, None),
    "surrogate pair (valid)": ("/v1/completions", b'{"prompt": "a\\ud83d\\ude00b", "max_tokens": 2}', 200, None),
    "lone high surrogate": ("/v1/completions", {"prompt": "abc\ud800def"}, 400, "prompt"),
    "lone low surrogate in a batch": ("/v1/completions", {"prompt": ["ok", "x\udc00"]}, 400, "prompt.1"),
    "surrogate in chat content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]},
                                  400, "messages.0.content"),
    "surrogate in a content part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a\udbff"}]}]}, 400, "messages.0.content.0.text"),
    "surrogate in a stop string": ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, 400, "stop.0"),
    "surrogate in user": ("/v1/completions", {"prompt": "hi", "user": "\udfff"}, 400, "user"),
    "surrogate in model": ("/v1/completions", {"prompt": "hi", "model": "\ud800"}, 400, "model"),
    "surrogate in a logit_bias key": ("/v1/completions", {"prompt": "hi", "logit_bias": {"\ud800": 1}}, 400,
                                      "logit_bias"),
    "invalid UTF-8 bytes": ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', 400, None),
    # huge numbers
    "temperature 1e308": ("/v1/completions", {"prompt": "hi", "temperature": 1e308}, 400, "temperature"),
    "temperature NaN": ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    "top_p Infinity": ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    "logit_bias -Infinity": ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": -Infinity}}', 400,
                             "logit_bias.5"),
    "max_tokens 10**30": ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    "max_tokens 1e30": ("/v1/completions", {"prompt": "hi", "max_tokens": 1e30}, 400, "max_tokens"),
    "seed 2**64": ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    "token id 10**30": ("/v1/completions", {"prompt": [10**30]}, 400, "prompt"),
    "stop token id 10**30": ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**30]}, 400,
                             "stop_token_ids"),
    "min_tokens 10**30": ("/v1/completions", {"prompt": "hi", "min_tokens": 10**30}, 400, "min_tokens"),
    # wrong types
    "prompt a number": ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    "prompt mixing ids and text": ("/v1/completions", {"prompt": [[1, 2], "a"]}, 400, None),
    "stop a number": ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    "logit_bias a list": ("/v1/completions", {"prompt": "hi", "logit_bias": [1]}, 400, "logit_bias"),
    "messages a string": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    "echo a string": ("/v1/completions", {"prompt": "hi", "echo": "true"}, 400, "echo"),
    "min_p a word": ("/v1/completions", {"prompt": "hi", "min_p": "high"}, 400, "min_p"),
    "min_p above 1": ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    # accepted-but-ignored fields are refused, naming the field
    "unknown field": ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    "vLLM field not done here": ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, 400,
                                 "use_beam_search"),
    "chat echo": ("/v1/chat/completions", {"messages": MSG, "echo": True}, 400, "echo"),
    "unknown stream option": ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {
        "continuous_usage_stats": True}}, 400, "stream_options.continuous_usage_stats"),
    "stream_options without stream": ("/v1/completions", {"prompt": "hi", "stream_options": {
        "include_usage": True}}, 400, "stream_options"),
    "unknown message field": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x",
                                                                      "weight": 2}]}, 400, "messages.0.weight"),
    "message with tool calls": ("/v1/chat/completions", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]}, 400,
        "messages.0.tool_calls"),
    "message with null tool calls": ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "x", "tool_calls": None, "refusal": None}], "max_tokens": 2}, 200, None),
    "tool_choice auto": ("/v1/chat/completions", {"messages": MSG, "tool_choice": "auto"}, 400, "tool_choice"),
    "tool_choice none": ("/v1/chat/completions", {"messages": MSG, "tool_choice": "none", "max_tokens": 2}, 200,
                         None),
    "min_tokens above max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400,
                                    "min_tokens"),
    "stop token id past the vocabulary": ("/v1/completions", {"prompt": "hi", "stop_token_ids": [V]}, 400,
                                          "stop_token_ids"),
}


@pytest.fixture(scope="module")
def bystander(hostile):
    """A long greedy stream that runs while the hostile table is sent; it must end as it does alone."""
    body = {"prompt": "Kubernetes schedules GPUs", "max_tokens": 160, "temperature": 0, "ignore_eos": True}
    alone = post(hostile, "/v1/completions", body).json()["choices"][0]["text"]
    result: dict = {}

    def run():
        try:
            result["text"] = post(hostile, "/v1/completions", body, timeout=600).json()["choices"][0]["text"]
        except Exception as exc:  # noqa: BLE001 - reported by the test that checks it
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    yield alone, result, thread
    thread.join(timeout=600)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_request_gets_its_answer_and_the_next_request_works(hostile, bystander, case):
    path, body, status, param = HOSTILE[case]
    r = post(hostile, path, body)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, param)
    if case == "stop straddling tokens":
        assert not any(s in r.json()["choices"][0]["text"] for s in body["stop"])
    if case == "logit_bias at the vocabulary's last id":
        assert r.json()["usage"]["completion_tokens"] == 3
    assert_normal_request_works(hostile)


def test_concurrent_request_ran_unaffected_by_the_hostile_ones(hostile, bystander):
    alone, result, thread = bystander
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert result["text"] == alone


def test_openai_sdk_cannot_send_a_lone_surrogate_so_raw_json_meets_the_400(hostile):
    """The SDK encodes JSON as UTF-8 and refuses before sending; raw JSON with the escape gets the 400."""
    client = openai.OpenAI(base_url=hostile.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(UnicodeEncodeError):
        client.completions.create(model="tiny-neox", prompt="abc\ud800def", max_tokens=2)
    err = assert_error(post(hostile, "/v1/completions", {"prompt": "abc\ud800def"}), 400, "prompt")
    assert "surrogate" in err["message"]
    assert_normal_request_works(hostile)


def _live_requests(engine) -> int:
    return len(engine._by_request)  # len() of a dict is atomic; the engine thread mutates it


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_goes_away_stops_its_generation(model_factory, stream):
    """4 prompts x n=16 x 1,500 tokens fill every slot; the client closes its socket; a normal request is quick."""
    srv = RunningServer(serve_config(model_factory(max_pos=2048), max_num_seqs=16, max_num_batched_tokens=256))
    try:
        engine = srv.state.engine.engine
        big = json.dumps({"prompt": ["the model", "the cluster", "safety filters", "tokens"], "n": 16,
                          "max_tokens": 1500, "ignore_eos": True, "stream": stream}).encode()
        port = int(srv.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(big) + big)
        deadline = time.monotonic() + 120
        while not (len(engine.scheduler.running) == 16 and engine.tokens_generated > 16):
            assert time.monotonic() < deadline, "the big request never filled the slots"
            time.sleep(0.05)
        sock.close()
        closed = time.monotonic()
        while _live_requests(engine) or engine.has_work():
            assert time.monotonic() - closed < 20, f"still generating {len(engine.scheduler.running)} sequences"
            time.sleep(0.05)
        generated_at_stop = engine.tokens_generated
        assert generated_at_stop < 64 * 1500 / 4  # far from done: it was stopped, not finished
        start = time.monotonic()
        r = post(srv, "/v1/completions", {"prompt": "the model", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert time.monotonic() - start < 30
    finally:
        srv.stop()
