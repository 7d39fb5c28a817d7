"""Tensor parallel serving: two worker processes over gloo give the same tokens as one."""

from __future__ import annotations

import pytest

from serve_helpers import run_all
from neox_runtime.serve.config import EngineConfig
from neox_runtime.serve.engine.build import build_engine
from neox_runtime.serve.engine.sequence import SamplingParams


@pytest.mark.parametrize("variant", [dict(), dict(parallel_residual=False, rotary_pct=1.0, act="gelu_fast")],
                         ids=["parallel-residual", "sequential-residual"])
def test_tp2_gives_the_same_tokens_as_tp1(model_factory, variant):
    path = model_factory(**variant)
    outputs = []
    for tp in (1, 2):
        engine, loaded = build_engine(EngineConfig(model=path, tensor_parallel=tp, max_num_seqs=4,
                                                   max_num_batched_tokens=32, threads=1))
        enc = loaded.tokenizer.encode
        reqs = {"greedy": (enc("the model serves").ids, SamplingParams(max_tokens=16, temperature=0,
                                                                         ignore_eos=True)),
                "seeded": (enc("Kubernetes schedules GPUs").ids,
                           SamplingParams(max_tokens=16, temperature=0.8, seed=4, ignore_eos=True, n=2)),
                "long": (enc("safety filters bad words " * 6).ids, SamplingParams(max_tokens=8, temperature=0,
                                                                                   ignore_eos=True))}
        try:
            outputs.append({rid: {i: c[0] for i, c in o.items()} for rid, o in run_all(engine, reqs).items()})
        finally:
            if tp > 1:
                engine.executor.close()
    assert outputs[0] == outputs[1]
