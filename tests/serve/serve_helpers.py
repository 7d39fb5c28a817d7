"""Helpers shared by the serving tests: real servers on loopback and an engine driver."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from neox_runtime.serve.api.app import ServerState, build_state, create_app
from neox_runtime.serve.config import EngineConfig, SafetyConfig, ServeConfig
from neox_runtime.serve.engine.core import LLMEngine
from neox_runtime.serve.engine.sequence import SamplingParams
from neox_runtime.launch import free_port  # noqa: F401 - re-exported to the tests



class RunningServer:
    """A real uvicorn server in a background thread of the test process."""

    def __init__(self, cfg: ServeConfig, **state_kwargs):
        self.state: ServerState = build_state(cfg, **state_kwargs)
        self.url = f"http://127.0.0.1:{cfg.port}"
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=cfg.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve_config(model: Path, *, safety: SafetyConfig | None = None, **engine) -> ServeConfig:
    engine.setdefault("max_num_seqs", 16)
    engine.setdefault("max_num_batched_tokens", 256)
    return ServeConfig(engine=EngineConfig(model=model, served_model_name="tiny-neox", **engine),
                       safety=safety or SafetyConfig(), port=free_port())


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Submit all requests at once; returns {request_id: {index: (token ids, text, finish, logprobs)}}."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    out: dict = {rid: {} for rid in requests}
    while engine.has_work():
        for d in engine.step():
            tokens, text, finish, lps = out[d.request_id].get(d.index, ([], "", None, []))
            out[d.request_id][d.index] = (tokens + d.token_ids, text + d.text, d.finish_reason, lps + d.logprobs)
    return out


def reference_logprobs(hf_model, ids: list[int]):
    """transformers' log-softmax over one prompt: row t is the distribution of token t + 1, (T, V)."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
