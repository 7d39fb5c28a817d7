"""Sampling semantics on a real engine: seeds, top-k/top-p, penalties, stops, n, logprobs, batching."""

from __future__ import annotations

import math

import pytest

from serve_helpers import run_all
from neox_runtime.serve.config import EngineConfig
from neox_runtime.serve.engine.build import build_engine
from neox_runtime.serve.engine.sequence import SamplingParams


@pytest.fixture(scope="module")
def built(model_dir):
    return build_engine(EngineConfig(model=model_dir, max_num_seqs=8, max_num_batched_tokens=64))


@pytest.fixture
def engine(built):
    return built[0]


@pytest.fixture
def encode(built):
    return lambda text: built[1].tokenizer.encode(text).ids


def one(engine, ids, **kw):
    return run_all(engine, {"r": (ids, SamplingParams(ignore_eos=True, **kw))})["r"]


def test_seeded_sample_is_reproducible_regardless_of_batch(engine, encode):
    p = encode("the model serves")
    alone = one(engine, p, max_tokens=20, temperature=1.0, seed=7)[0][0]
    crowd = {f"other{i}": (encode("safety filters bad words" * (i + 1)),
                           SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)) for i in range(5)}
    crowd["mine"] = (p, SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))
    assert run_all(engine, crowd)["mine"][0][0] == alone
    assert one(engine, p, max_tokens=20, temperature=1.0, seed=8)[0][0] != alone


def test_top_k_1_and_tiny_top_p_equal_greedy(engine, encode):
    p = encode("Kubernetes schedules")
    greedy = one(engine, p, max_tokens=16, temperature=0.0)[0][0]
    assert one(engine, p, max_tokens=16, temperature=1.5, top_k=1, seed=1)[0][0] == greedy
    assert one(engine, p, max_tokens=16, temperature=1.0, top_p=1e-6, seed=1)[0][0] == greedy


def test_top_k_restricts_to_the_k_best_raw_tokens(engine, encode):
    p = encode("the cluster")
    for seed in range(4):
        tokens, _, _, lps = one(engine, p, max_tokens=1, temperature=2.0, top_k=3, seed=seed, logprobs=3)[0]
        assert tokens[0] in [t for t, _ in lps[0].top]


def test_penalties_change_greedy_output_and_reduce_repeats(engine, encode):
    p = encode("the model the model the model")
    plain = one(engine, p, max_tokens=32, temperature=0.0)[0][0]
    penalized = one(engine, p, max_tokens=32, temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)[0][0]
    repeated = one(engine, p, max_tokens=32, temperature=0.0, repetition_penalty=5.0)[0][0]
    assert penalized != plain and repeated != plain
    assert len(set(penalized)) >= len(set(plain))


def test_logit_bias_bans_and_forces_tokens_only_in_its_own_row(engine, encode):
    p = encode("the model serves")
    plain = one(engine, p, max_tokens=8, temperature=0.0)[0][0]
    banned = one(engine, p, max_tokens=8, temperature=0.0, logit_bias=((plain[0], -100.0),))[0][0]
    assert banned[0] != plain[0] and plain[0] not in banned
    forced = 7 if plain[0] != 7 else 8
    out = run_all(engine, {
        "forced": (p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias=((forced, 100.0),))),
        "plain": (p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
    })
    assert out["forced"][0][0] == [forced] * 4
    assert out["plain"][0][0] == plain  # the bias does not leak into the other row of the batch


def test_stop_string_cuts_text_and_finishes(engine, encode):
    p = encode("the model serves")
    tokens, text, finish, _ = one(engine, p, max_tokens=24, temperature=0.0)[0]
    stop = text[5:8]
    assert len(stop) == 3
    _, stopped_text, reason, _ = one(engine, p, max_tokens=24, temperature=0.0, stop=(stop,))[0]
    assert reason == "stop"
    assert stopped_text == text[:text.index(stop)]


def test_max_tokens_and_n_choices(engine, encode):
    out = one(engine, encode("safety"), max_tokens=5, temperature=1.0, n=3, seed=11)
    assert sorted(out) == [0, 1, 2]
    assert all(len(t) == 5 and f == "length" for t, _, f, _ in out.values())
    assert len({tuple(t) for t, _, _, _ in out.values()}) > 1  # choices are sampled independently


def test_logprobs_are_normalized_and_chosen_token_is_top_under_greedy(engine, encode):
    out = one(engine, encode("training saves"), max_tokens=6, temperature=0.0, logprobs=5)[0]
    for lp in out[3]:
        assert lp.top[0][0] == lp.token_id and math.isclose(lp.top[0][1], lp.logprob)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-5


def test_eos_finishes_unless_ignored(built, encode):
    engine, loaded = built
    p = encode("the")
    tokens = one(engine, p, max_tokens=8, temperature=0.0)[0][0]
    engine.eos_token_id, saved = tokens[2], engine.eos_token_id
    try:
        out = run_all(engine, {"r": (p, SamplingParams(max_tokens=8, temperature=0.0))})["r"][0]
        k = tokens.index(tokens[2])
        assert out[2] == "stop" and out[0] == tokens[:k + 1]
    finally:
        engine.eos_token_id = saved


def test_stop_token_ids_finish_with_the_token_kept(engine, encode):
    p = encode("the model serves")
    tokens = one(engine, p, max_tokens=16, temperature=0.0)[0][0]
    stop = tokens[4]
    k = tokens.index(stop)
    out, _, reason, _ = run_all(engine, {"r": (p, SamplingParams(max_tokens=16, temperature=0.0,
                                                                 stop_token_ids=(stop,)))})["r"][0]
    assert reason == "stop" and out == tokens[:k + 1]


def test_min_tokens_holds_back_eos_stop_tokens_and_stop_strings(built, encode):
    engine, _ = built
    p = encode("the")
    tokens, text, _, _ = one(engine, p, max_tokens=12, temperature=0.0)[0]
    stop_id = tokens[1]
    saved = engine.eos_token_id
    engine.eos_token_id = tokens[0]  # greedy would end at once on this "EOS"
    try:
        plain = run_all(engine, {"r": (p, SamplingParams(max_tokens=12, temperature=0.0))})["r"][0]
        assert plain[2] == "stop" and plain[0] == tokens[:1]
        held = run_all(engine, {"r": (p, SamplingParams(max_tokens=12, temperature=0.0, min_tokens=6,
                                                        stop_token_ids=(stop_id,)))})["r"][0]
        out, _, reason, _ = held
        assert len(out) >= 6 and not {engine.eos_token_id, stop_id} & set(out[:6])
        assert reason == "length" or (reason == "stop" and out[-1] in (engine.eos_token_id, stop_id))
    finally:
        engine.eos_token_id = saved
    stop = text[1:3]  # a stop string the greedy text hits at once
    _, early, reason, _ = one(engine, p, max_tokens=12, temperature=0.0, stop=(stop,))[0]
    assert reason == "stop" and early == text[:text.index(stop)]
    _, late, reason, _ = one(engine, p, max_tokens=12, temperature=0.0, stop=(stop,), min_tokens=12)[0]
    assert reason == "length" and late == text  # every token is under min_tokens: nothing can stop it


def test_min_p_keeps_only_tokens_near_the_best(engine, encode):
    p = encode("the cluster")
    greedy = one(engine, p, max_tokens=12, temperature=0.0)[0][0]
    assert one(engine, p, max_tokens=12, temperature=2.0, min_p=1.0, seed=3)[0][0] == greedy
    temperature, min_p = 1.5, 0.3
    for seed in range(6):
        _, _, _, lps = one(engine, p, max_tokens=4, temperature=temperature, min_p=min_p, seed=seed, logprobs=1)[0]
        for lp in lps:  # p_T(token) >= min_p * p_T(best)  <=>  (logprob - best) / T >= log(min_p)
            assert (lp.logprob - lp.top[0][1]) / temperature >= math.log(min_p) - 1e-5
