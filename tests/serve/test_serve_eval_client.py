"""An evaluation harness's scoring traffic: many concurrent echo + logprobs + max_tokens 0 requests.

Prompts of random lengths, one-token and context-length ones included, single and
batched, under a step budget small enough that prefill chunks end on one token and one
large enough to batch whole prompts. No request may get a 5xx, and every scored token's
logprob (and its top alternative) must equal transformers' log-softmax on the same weights.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from transformers import GPTNeoXForCausalLM

from serve_helpers import RunningServer, reference_logprobs, serve_config

VOCAB = 320


def prompts_of_random_lengths(rng: random.Random, max_prompt: int, budget: int) -> list[list[int]]:
    lengths = [1, 1, 2, max_prompt, max_prompt - 1] + [n for n in (budget, budget + 1, 2 * budget + 1)
                                                        if n <= max_prompt]
    lengths += [rng.randint(1, max_prompt) for _ in range(36 - len(lengths))]
    return [[rng.randrange(1, VOCAB) for _ in range(n)] for n in lengths]


async def score_all(url: str, prompts: list[list[int]], rng: random.Random) -> list[tuple[list[int], dict]]:
    """Each request scores one prompt, or a batch of up to three (as harnesses batch them); all at once."""
    requests, i = [], 0
    while i < len(prompts):
        k = rng.choice([1, 1, 3])
        requests.append(prompts[i:i + k])
        i += k
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(batch):
            body = {"prompt": batch if len(batch) > 1 else batch[0], "echo": True, "logprobs": 1, "max_tokens": 0}
            return batch, await client.post("/v1/completions", json=body)
        answers = await asyncio.gather(*(one(b) for b in requests))
    out = []
    for batch, r in answers:
        assert r.status_code == 200, r.text
        out += zip(batch, (c["logprobs"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])))
    return out


@pytest.mark.parametrize("budget,slots", [(7, 4), (512, 16)], ids=["small-step-budget", "large-step-budget"])
def test_concurrent_scoring_equals_transformers_log_softmax(model_dir, budget, slots):
    srv = RunningServer(serve_config(model_dir, max_num_seqs=slots, max_num_batched_tokens=budget))
    try:
        rng = random.Random(budget)
        prompts = prompts_of_random_lengths(rng, srv.state.max_len - 1, budget)
        scored = asyncio.run(score_all(srv.url, prompts, rng))
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
    assert len(scored) == len(prompts)
    hf = GPTNeoXForCausalLM.from_pretrained(model_dir).eval()
    tok = srv.state.tokenizer
    worst = 0.0
    for ids, lp in scored:
        assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
        ref = reference_logprobs(hf, ids)  # (T, V)
        for t in range(1, len(ids)):
            worst = max(worst, abs(lp["token_logprobs"][t] - ref[t - 1, ids[t]].item()))
            (best_text, best_lp), = lp["top_logprobs"][t].items()
            best = int(ref[t - 1].argmax())
            assert abs(best_lp - ref[t - 1, best].item()) < 1e-4
            assert best_text == tok.decode([best], skip_special_tokens=False)
    assert worst < 1e-4, worst
