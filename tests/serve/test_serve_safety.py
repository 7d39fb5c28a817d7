"""Safety on a real server: API keys, rate limits, moderation (input, output, streaming), audit,
system-prompt steering and watermarking with its detector (endpoint and CLI)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import openai
import pytest

from serve_helpers import RunningServer, serve_config
from neox_runtime.serve.config import SafetyConfig

GOOD_KEY, OTHER_KEY = "sk-test-good-0123456789", "sk-test-other-abcdef"
WM_KEY = "watermark-secret-42"


@pytest.fixture(scope="module")
def plain_greedy(model_dir):
    """Greedy continuations from an unguarded server, used to choose blocked words the model emits."""
    srv = RunningServer(serve_config(model_dir))
    try:
        out = {}
        for prompt in ("the model serves", "Kubernetes schedules", "safety filters", "the operator"):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                               "ignore_eos": True}, timeout=60)
            out[prompt] = r.json()["choices"][0]["text"]
        sampled = httpx.post(srv.url + "/v1/completions", json={
            "prompt": "the model", "max_tokens": 40, "temperature": 1.0, "seed": 3, "ignore_eos": True,
            "logprobs": 1}, timeout=60).json()
        return out, sampled
    finally:
        srv.stop()


def emitted_word(texts: dict[str, str]) -> tuple[str, str]:
    for prompt, text in texts.items():
        for w in re.findall(r"\b[A-Za-z]{3,}\b", text):
            if w.lower() not in prompt.lower():
                return prompt, w
    pytest.skip("the random model emitted no whole word")


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory, plain_greedy):
    tmp = tmp_path_factory.mktemp("safety")
    secret_dir = tmp / "secret"  # a mounted Secret: one key per file, plus kubelet's dot-links
    secret_dir.mkdir()
    (secret_dir / "alice").write_text(GOOD_KEY + "\n")
    (secret_dir / "bob").write_text(OTHER_KEY)
    (secret_dir / "..data").mkdir()
    safety = SafetyConfig(api_keys_file=secret_dir, blocklist=("forbiddenword",), blocklist_action="redact",
                          audit_log=tmp / "audit.jsonl", watermark_key=WM_KEY, watermark_delta=4.0,
                          system_prompt="You are a careful assistant.", max_tokens_cap=64)
    srv = RunningServer(serve_config(model_dir, safety=safety))
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["redact", "refuse"])
def moderated(request, model_dir, plain_greedy, tmp_path_factory):
    """Blocks a word that the unguarded model emits for a known prompt (no watermark: same tokens)."""
    prompt, word = emitted_word(plain_greedy[0])
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    srv = RunningServer(serve_config(model_dir, safety=SafetyConfig(
        blocklist=(word,), blocklist_action=request.param, audit_log=audit)))
    srv.blocked, srv.action, srv.audit_path = (prompt, word), request.param, audit
    yield srv
    srv.stop()


def post(srv, path, body, key=GOOD_KEY, stream=False):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def test_missing_or_wrong_key_is_401_and_good_keys_work(guarded):
    body = {"prompt": "the", "max_tokens": 2}
    assert post(guarded, "/v1/completions", body, key=None).status_code == 401
    r = post(guarded, "/v1/completions", body, key="sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(guarded, "/v1/completions", body, key=GOOD_KEY).status_code == 200
    assert post(guarded, "/v1/completions", body, key=OTHER_KEY).status_code == 200
    assert httpx.get(guarded.url + "/health").status_code == 200  # probes need no key


def test_keys_are_kept_hashed(guarded):
    stored = guarded.state.keys._digests
    assert GOOD_KEY.encode() not in stored and all(len(d) == 32 for d in stored)


def test_max_tokens_cap_is_a_clear_400(guarded):
    r = post(guarded, "/v1/completions", {"prompt": "the", "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "64" in r.json()["error"]["message"]


def test_blocked_prompt_is_refused_or_redacted_and_audited(guarded, model_dir, tmp_path):
    r = post(guarded, "/v1/completions", {"prompt": "say ForbiddenWord now", "max_tokens": 2})
    assert r.status_code == 200  # redact mode: the prompt is cleaned, not refused
    refusing = RunningServer(serve_config(model_dir, safety=SafetyConfig(
        blocklist=("forbiddenword",), audit_log=tmp_path / "audit.jsonl")))
    try:
        r = httpx.post(refusing.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "please say forbiddenWORD"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
        entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
        assert entry["event"] == "refused" and entry["terms"] == ["forbiddenword"]
        assert "please" not in json.dumps(entry)  # no prompt text in the audit log
    finally:
        refusing.stop()


def test_token_id_prompts_and_each_chat_message_are_moderated_like_text(guarded, model_dir, tmp_path):
    tok = guarded.state.tokenizer
    ids = tok.encode("say forbiddenword now").ids
    redacted = post(guarded, "/v1/completions", {"prompt": ids, "max_tokens": 1, "echo": True})
    assert redacted.status_code == 200  # redact mode: the model gets the cleaned text's tokens
    assert redacted.json()["choices"][0]["text"].startswith("say [redacted] now")
    assert redacted.json()["usage"]["prompt_tokens"] == len(tok.encode("say [redacted] now").ids)
    refusing = RunningServer(serve_config(model_dir, safety=SafetyConfig(
        blocklist=("forbiddenword",), audit_log=tmp_path / "audit.jsonl")))
    try:
        for body, param in (({"prompt": ids}, "prompt"), ({"prompt": [[5, 6], ids]}, "prompt"),
                            ({"messages": [{"role": "system", "content": "fine"},
                                           {"role": "user", "content": [{"type": "text", "text": "say"},
                                                                        {"type": "text", "text": " forbiddenword"}]}]},
                             "messages.1.content")):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = httpx.post(refusing.url + path, json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation", r.text
            assert r.json()["error"]["param"] == param
        ok = httpx.post(refusing.url + "/v1/completions", json={"prompt": tok.encode("say fine words").ids,
                                                                 "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
    finally:
        refusing.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_output_moderation_applies_to_emitted_text_even_when_streamed(moderated, plain_greedy, stream):
    prompt, word = moderated.blocked
    client = openai.OpenAI(base_url=moderated.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="tiny-neox", prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kw)]
        text = "".join(c.choices[0].text for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][-1]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert not re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE)
    unmoderated = plain_greedy[0][prompt]
    if moderated.action == "redact":
        assert "[redacted]" in text and finish == "length"
        assert text == re.sub(rf"\b{re.escape(word)}\b", "[redacted]", unmoderated, flags=re.IGNORECASE)
    else:
        assert finish == "content_filter" and unmoderated.startswith(text)
    entry = json.loads(moderated.audit_path.read_text().splitlines()[-1])
    assert entry["reason"] == "moderation_output" and entry["terms"] == [word.lower()]


def test_system_prompt_steering_is_prepended_to_chat(guarded):
    msgs = [{"role": "user", "content": "hi"}]
    r = post(guarded, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    tok = guarded.state.tokenizer
    expected = tok.encode("You are a careful assistant.\n\nUser: hi\nAssistant:").ids
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_watermarked_text_scores_high_and_plain_text_low(guarded, plain_greedy):
    body = {"prompt": "the model", "max_tokens": 40, "temperature": 1.0, "seed": 3, "ignore_eos": True,
            "logprobs": 1}
    marked = post(guarded, "/v1/completions", body).json()["choices"][0]
    plain = plain_greedy[1]["choices"][0]
    assert marked["logprobs"]["tokens"] != plain["logprobs"]["tokens"]  # the watermark steers sampling
    z_marked = post(guarded, "/v1/watermark/detect", {"text": marked["text"]}).json()
    z_plain = post(guarded, "/v1/watermark/detect", {"text": plain["text"]}).json()
    assert z_marked["z_score"] > 4 and z_marked["watermarked"]
    assert z_plain["z_score"] < 2.5 and not z_plain["watermarked"]


def test_watermark_cli_detect(guarded, plain_greedy, model_dir, tmp_path):
    body = {"prompt": "the operator", "max_tokens": 40, "temperature": 1.0, "seed": 9, "ignore_eos": True}
    text = post(guarded, "/v1/completions", body).json()["choices"][0]["text"]
    key_file = tmp_path / "wm.key"
    key_file.write_text(WM_KEY)
    out = subprocess.run([sys.executable, "-m", "neox_runtime.safety.watermark", "detect", "--tokenizer",
                          str(model_dir), "--key-file", str(key_file), "-"], input=text, capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout)["z_score"] > 4
    wrong = subprocess.run([sys.executable, "-m", "neox_runtime.safety.watermark", "detect", "--tokenizer",
                            str(model_dir), "--key", "another-secret", text], capture_output=True, text=True,
                           check=True)
    assert json.loads(wrong.stdout)["z_score"] < 2.5


def test_rate_limits_answer_429_with_retry_after(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team keys\n{GOOD_KEY}\n{OTHER_KEY}\n")
    srv = RunningServer(serve_config(model_dir, safety=SafetyConfig(api_keys_file=keys, requests_per_minute=2,
                                                                    tokens_per_minute=400)))
    try:
        body = {"prompt": "the", "max_tokens": 2}
        assert [post(srv, "/v1/completions", body).status_code for _ in range(2)] == [200, 200]
        r = post(srv, "/v1/completions", body)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        long = {"prompt": "the", "max_tokens": 200, "ignore_eos": True}
        assert post(srv, "/v1/completions", long, key=OTHER_KEY).status_code == 200  # quotas are per key
        r = post(srv, "/v1/completions", long, key=OTHER_KEY)  # ~201 of 400 tokens/minute are spent
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
    finally:
        srv.stop()
