"""The official `openai` SDK against a real uvicorn server: completions, chat, streaming, usage."""

from __future__ import annotations

import asyncio

import openai
import pytest



@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-neox"]


def test_completion_has_text_and_usage(client, server):
    r = client.completions.create(model="tiny-neox", prompt="the model serves", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    prompt_len = len(server.state.tokenizer.encode("the model serves").ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 7, prompt_len + 7)


def test_token_id_prompt_equals_text_prompt(client, server):
    ids = server.state.tokenizer.encode("Kubernetes schedules").ids
    kw = dict(model="tiny-neox", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    by_ids = client.completions.create(prompt=ids, **kw)
    by_text = client.completions.create(prompt="Kubernetes schedules", **kw)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_batched_prompts_and_n_number_choices_in_openai_order(client):
    r = client.completions.create(model="tiny-neox", prompt=["safety", "the cluster"], n=2, max_tokens=3,
                                  temperature=1, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12


def test_completion_logprobs_shape(client):
    r = client.completions.create(model="tiny-neox", prompt="the", max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 3 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask(client, server):
    """lm-evaluation-harness's loglikelihood request: echo, max_tokens=0, logprobs."""
    prompt = "the model serves tokens"
    ids = server.state.tokenizer.encode(prompt).ids
    r = client.completions.create(model="tiny-neox", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    kw = dict(model="tiny-neox", prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0]
    assert full.text.startswith(prompt) and len(full.logprobs.tokens) == len(ids) + 3
    assert full.logprobs.token_logprobs[0] is None
    assert full.logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:])
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].text == prompt  # the echo comes first, with the prompt's logprobs
    assert chunks[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:])
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.text


def test_chat_completion_and_logprobs(client):
    r = client.chat.completions.create(model="tiny-neox", messages=[{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "hello"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length")
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_chat_text_response_format_is_accepted_and_tools_are_refused(client):
    import openai
    import pytest

    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny-neox", messages=msgs, max_tokens=2, response_format={"type": "text"})
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="tool and function calling is not supported"):
        client.chat.completions.create(model="tiny-neox", messages=msgs, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}])


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model="tiny-neox", prompt="the operator", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streaming_chat_sends_role_first_and_usage_last(client):
    stream = client.chat.completions.create(model="tiny-neox", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_concurrent_requests_each_equal_their_sequential_result(server):
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompts = [f"the model serves {' '.join(['tokens'] * i)}" for i in range(12)]
    seeds = list(range(12))

    async def one(i):
        r = await aclient.completions.create(model="tiny-neox", prompt=prompts[i], max_tokens=10 + i,
                                             temperature=0.9 if i % 2 else 0, seed=seeds[i],
                                             extra_body={"ignore_eos": True})
        return r.choices[0].text

    async def both():
        sequential = [await one(i) for i in range(len(prompts))]
        concurrent = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return sequential, list(concurrent)

    sequential, concurrent = asyncio.run(both())
    assert concurrent == sequential


def test_metrics_expose_vllm_names_after_traffic(client, server):
    import httpx
    client.completions.create(model="tiny-neox", prompt="the", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"):
        assert name in text
    gen = [l for l in text.splitlines() if l.startswith("vllm:generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 3


def test_health_and_ready(server):
    import httpx
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").json() == {"ready": True}


def test_vllm_sampling_extensions_are_honoured_over_http(client):
    """stop_token_ids, min_tokens and min_p (vLLM's names) change the answer; they are not ignored."""
    kw = dict(model="tiny-neox", prompt="the model serves", max_tokens=10, temperature=0)
    forced = {"logit_bias": {"7": 100}, "ignore_eos": True}  # every token is 7
    r = client.completions.create(extra_body={**forced, "stop_token_ids": [7]}, **kw)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 1)
    r = client.completions.create(extra_body={**forced, "stop_token_ids": [7], "min_tokens": 3}, **kw)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 4)
    greedy = client.completions.create(extra_body={"ignore_eos": True}, **kw).choices[0].text
    hot = client.completions.create(extra_body={"ignore_eos": True, "min_p": 1.0}, seed=4,
                                    **{**kw, "temperature": 2.0}).choices[0].text
    assert hot == greedy
