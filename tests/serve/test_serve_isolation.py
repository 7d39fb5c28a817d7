"""A failure inside an engine step fails only the request that causes it; a broken engine says so.

No input reaches a failing step any more, so failures are injected through the engine's
real extension points: a logits processor (the sampler's plug-in interface, as the
watermark uses it) that raises for rows of a poisoned prompt, and a wrapper around the
real executor that raises for steps prefilling a poisoned prompt. Everything else is the
real server: HTTP, the engine thread, the scheduler, the model.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from serve_helpers import RunningServer, serve_config

POISON_SAMPLER, POISON_FORWARD, POISON_MIDSTREAM = 300, 301, 302
NORMAL_PROMPTS = [[84, 261, 221], [303, 284, 261, 68, 85], [173, 254], [10, 11, 12, 13, 14, 15, 16]]


class PoisonProcessor:
    """Raises while a row's prompt holds `poison` and it has at least `after` output tokens."""

    def __init__(self, poison: int, after: int = 0):
        self.poison, self.after = poison, after

    def __call__(self, logits, seqs):
        if any(self.poison in s.prompt_ids and len(s.output_ids) >= self.after for s in seqs):
            raise RuntimeError("poisoned row")
        return logits


class PoisonExecutor:
    """The real executor, except that a step prefilling `poison` raises before computing anything."""

    def __init__(self, inner, poison: int | None = None):
        self.inner, self.poison, self.broken = inner, poison, False

    def execute(self, plan):
        if self.broken:
            raise RuntimeError("worker lost")
        if self.poison is not None and (plan.token_ids[plan.num_decode:] == self.poison).any():
            raise RuntimeError("poisoned prefill")
        return self.inner.execute(plan)


@pytest.fixture(scope="module")
def faulty(model_dir):
    srv = RunningServer(serve_config(model_dir, max_num_seqs=4, max_num_batched_tokens=16))
    engine = srv.state.engine.engine
    engine.sampler.processors += [PoisonProcessor(POISON_SAMPLER), PoisonProcessor(POISON_MIDSTREAM, after=3)]
    engine.executor = PoisonExecutor(engine.executor, POISON_FORWARD)
    yield srv
    srv.stop()


def body(prompt: list[int], **kw) -> dict:
    return {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, **kw}


async def send_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


@pytest.mark.parametrize("poison", [POISON_SAMPLER, POISON_FORWARD], ids=["in-sampling", "in-forward-pass"])
def test_poisoned_request_fails_alone_and_concurrent_requests_are_exact(faulty, poison):
    alone = [httpx.post(faulty.url + "/v1/completions", json=body(p), timeout=300).json()["choices"][0]["text"]
             for p in NORMAL_PROMPTS]
    bad = body([84, poison, 261], n=2)
    responses = asyncio.run(send_all(faulty.url, [body(p) for p in NORMAL_PROMPTS[:2]] + [bad]
                                     + [body(p) for p in NORMAL_PROMPTS[2:]]))
    failed = responses.pop(2)
    assert failed.status_code == 500, failed.text
    err = failed.json()["error"]
    assert err["code"] == "engine_error" and err["type"] == "server_error" and "poisoned" in err["message"]
    assert [r.status_code for r in responses] == [200] * len(NORMAL_PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in responses] == alone
    assert httpx.get(faulty.url + "/health").status_code == 200
    assert faulty.state.engine.engine.request_ids() == []
    later = httpx.post(faulty.url + "/v1/completions", json=body(NORMAL_PROMPTS[0]), timeout=300)
    assert later.status_code == 200 and later.json()["choices"][0]["text"] == alone[0]


def test_failure_mid_stream_ends_the_stream_with_an_error_event(faulty):
    raw = httpx.post(faulty.url + "/v1/completions", json=body([84, POISON_MIDSTREAM], stream=True), timeout=300)
    events = [line[6:] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and set(error) == {"message", "type", "param", "code"}
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])  # text came before the failure

    client = openai.OpenAI(base_url=faulty.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    received = []
    with pytest.raises(openai.APIError, match="engine failed on this request"):
        for chunk in client.completions.create(model="tiny-neox", prompt=[84, POISON_MIDSTREAM], max_tokens=24,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True}):
            received.append(chunk.choices[0].text)
    assert received  # the SDK saw the tokens, then the error
    chat = client.chat.completions.create(model="tiny-neox", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3)
    assert chat.choices[0].message.content is not None


def test_an_engine_that_fails_known_good_input_reports_itself_dead(model_dir):
    srv = RunningServer(serve_config(model_dir, max_num_seqs=4, max_num_batched_tokens=16))
    try:
        engine = srv.state.engine.engine
        engine.executor = executor = PoisonExecutor(engine.executor)
        ok = httpx.post(srv.url + "/v1/completions", json=body(NORMAL_PROMPTS[0]), timeout=300)
        assert ok.status_code == 200
        executor.broken = True  # as a lost tensor-parallel worker: every forward pass raises
        r = httpx.post(srv.url + "/v1/completions", json=body(NORMAL_PROMPTS[1]), timeout=300)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "worker lost" in health.json()["reason"]
        assert httpx.get(srv.url + "/ready").status_code == 503
        later = httpx.post(srv.url + "/v1/completions", json=body(NORMAL_PROMPTS[0]), timeout=300)
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_dead"
    finally:
        srv.stop()
