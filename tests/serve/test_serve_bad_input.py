"""Bad input is a 4xx with OpenAI's error body, never a 5xx — by table and by fuzzing the OpenAPI spec."""

from __future__ import annotations

import pytest

BIG = 10**9

BAD_COMPLETIONS = {
    "negative max_tokens": ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    "zero max_tokens": ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "huge max_tokens": ({"prompt": "hi", "max_tokens": BIG}, "max_tokens"),
    "temperature above 2": ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    "negative temperature": ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    "top_p zero": ({"prompt": "hi", "top_p": 0}, "top_p"),
    "top_p above 1": ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    "n zero": ({"prompt": "hi", "n": 0}, "n"),
    "n huge": ({"prompt": "hi", "n": 1000}, "n"),
    "logprobs negative": ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    "logprobs huge": ({"prompt": "hi", "logprobs": 1000}, "logprobs"),
    "prompt over context": ({"prompt": "the model " * 400}, "prompt"),
    "megabyte prompt": ({"prompt": "x" * 1_000_000}, "prompt"),
    "prompt plus max_tokens over context": ({"prompt": "the model " * 60, "max_tokens": 250}, "max_tokens"),
    "token id out of vocab": ({"prompt": [1, 2, 10**6]}, "prompt"),
    "negative token id": ({"prompt": [1, -2]}, "prompt.1"),
    "too many stop strings": ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "empty stop string": ({"prompt": "hi", "stop": [""]}, "stop"),
    "wrong type max_tokens": ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    "wrong type prompt": ({"prompt": {"text": "hi"}}, "prompt"),
    "missing prompt": ({"max_tokens": 3}, "prompt"),
    "empty prompt list": ({"prompt": []}, "prompt"),
    "too many prompts": ({"prompt": ["hi"] * 65}, "prompt"),
    "top_k overflow": ({"prompt": "hi", "top_k": 10**30}, "top_k"),
    "stream not a bool": ({"prompt": "hi", "stream": "yes"}, "stream"),
    "penalty out of range": ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    "unknown model": ({"prompt": "hi", "model": "gpt-4"}, "model"),
    "logit_bias above 100": ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5"),
    "logit_bias key not a token id": ({"prompt": "hi", "logit_bias": {"hello": 1}}, "logit_bias"),
    "logit_bias key a unicode digit": ({"prompt": "hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    "logit_bias token out of vocab": ({"prompt": "hi", "logit_bias": {"99999999": 1}}, "logit_bias"),
    "best_of other than n": ({"prompt": "hi", "best_of": 3}, "best_of"),
    "suffix": ({"prompt": "hi", "suffix": "end"}, "suffix"),
}

BAD_CHAT = {
    "no messages": ({"messages": []}, "messages"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      "messages.0.content.0.type"),
    "top_logprobs huge": ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99},
                          "top_logprobs"),
    "chat over context": ({"messages": [{"role": "user", "content": "the model " * 400}]}, "messages"),
    "tools": ({"messages": [{"role": "user", "content": "x"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "functions": ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
    "json response format": ({"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
}


def assert_openai_error(r, status: int = 400, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("case", BAD_COMPLETIONS)
def test_bad_completion_is_400_naming_the_param(http, case):
    body, param = BAD_COMPLETIONS[case]
    r = http.post("/v1/completions", json=body)
    assert_openai_error(r, 404 if param == "model" else 400, param)


@pytest.mark.parametrize("case", BAD_CHAT)
def test_bad_chat_is_400_naming_the_param(http, case):
    body, param = BAD_CHAT[case]
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("raw", [b"{", b"not json", b"[]", b'"a string"', b"", b'{"prompt": "hi",}'])
def test_malformed_json_is_400(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_unknown_route_and_method_are_4xx_in_openai_shape(http):
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def _shorten(body):
    """Keep fuzzed generations short so the fuzz stays fast; leave ill-typed values as they are."""
    if isinstance(body, dict):
        if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 4  # a chat's default runs to the end of the context
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and not isinstance(body.get(field), bool):
                body[field] = min(body[field], 4)
        if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
            body["n"] = min(body["n"], 2)
    return body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_from_own_openapi_spec_never_5xx(server, path):
    """schemathesis generates bodies (valid and invalid) from /openapi.json; none may get a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    strategy = schema[path]["POST"].as_strategy()

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(case=strategy)
    def check(case):
        case.body = _shorten(case.body)
        response = case.call(base_url=server.url, timeout=120)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
