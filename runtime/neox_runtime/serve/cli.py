"""`neox-serve`: parse flags into one ServeConfig, load the model, serve HTTP, drain on SIGTERM.

On SIGTERM the server keeps its socket open but fails /ready and refuses new /v1
requests with 503, waits for in-flight requests (streams too) to finish or for
--drain-grace-seconds, and only then lets uvicorn shut down. A second SIGTERM or a
SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from pathlib import Path

import uvicorn

from neox_runtime.serve.config import EngineConfig, SafetyConfig, ServeConfig

log = logging.getLogger("neox.serve")


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    p = argparse.ArgumentParser(prog="neox-serve", description="OpenAI-compatible GPT-NeoX server")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face format GPT-NeoX directory")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id in the API (default: the directory name)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="ranks; one worker process each")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-num-seqs", type=int, default=64, help="KV-cache slots (most sequences at once)")
    p.add_argument("--max-model-len", type=int, help="context per slot (default: min(model, 2048))")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens computed per step")
    p.add_argument("--kv-cache-bytes", type=int, help="cap the KV cache (fewer slots)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--api-keys-file", type=Path, help="file of keys, one a line, or a mounted Secret directory")
    p.add_argument("--requests-per-minute", type=float, help="per-key request quota")
    p.add_argument("--tokens-per-minute", type=float, help="per-key token quota (prompt + max_tokens)")
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--max-tokens-cap", type=int, help="largest max_tokens accepted")
    p.add_argument("--blocklist", default="", help="comma-separated blocked terms (moderation)")
    p.add_argument("--blocklist-file", type=Path, help="blocked terms, one a line")
    p.add_argument("--blocklist-action", default="refuse", choices=["refuse", "redact"])
    p.add_argument("--system-prompt", help="steering prompt placed first in every chat")
    p.add_argument("--chat-template", type=Path,
                   help="jinja2 chat template file (default: the model directory's, else a plain transcript)")
    p.add_argument("--audit-log", type=Path, help="JSON-lines audit log of refused and flagged requests")
    p.add_argument("--watermark-key-file", type=Path, help="secret for output watermarking (on when given)")
    p.add_argument("--watermark-gamma", type=float, default=0.25)
    p.add_argument("--watermark-delta", type=float, default=2.0)
    p.add_argument("--drain-grace-seconds", type=float, default=30.0)
    p.add_argument("--health-stall-seconds", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    terms = [t for t in a.blocklist.split(",") if t.strip()]
    if a.blocklist_file:
        terms += [t for t in a.blocklist_file.read_text().splitlines() if t.strip()]
    engine = EngineConfig(model=a.model, dtype=a.dtype, device=a.device, tensor_parallel=a.tensor_parallel,
                          max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
                          max_num_batched_tokens=a.max_num_batched_tokens, kv_cache_bytes=a.kv_cache_bytes,
                          threads=a.threads, served_model_name=a.served_model_name)
    safety = SafetyConfig(
        api_keys_file=a.api_keys_file, requests_per_minute=a.requests_per_minute,
        tokens_per_minute=a.tokens_per_minute, max_prompt_tokens=a.max_prompt_tokens,
        max_tokens_cap=a.max_tokens_cap, blocklist=tuple(terms), blocklist_action=a.blocklist_action,
        system_prompt=a.system_prompt, audit_log=a.audit_log,
        watermark_key=a.watermark_key_file.read_text().strip() if a.watermark_key_file else None,
        watermark_gamma=a.watermark_gamma, watermark_delta=a.watermark_delta)
    return ServeConfig(engine=engine, safety=safety, host=a.host, port=a.port,
                       drain_grace_seconds=a.drain_grace_seconds, health_stall_seconds=a.health_stall_seconds,
                       chat_template=a.chat_template)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the socket."""

    def __init__(self, config: uvicorn.Config, state, grace: float):
        super().__init__(config)
        self.state, self.grace = state, grace

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.state.draining:
            self.state.draining = True
            log.info("SIGTERM: draining inflight=%d grace_s=%s", self.state.inflight, self.grace)
            asyncio.get_event_loop().create_task(self._drain())
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while self.state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("Drained inflight=%d", self.state.inflight)
        self.should_exit = True


def serve(cfg: ServeConfig, log_level: str = "info") -> None:
    from neox_runtime.serve.api.app import build_state, create_app

    state = build_state(cfg)
    app = create_app(state)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    try:
        DrainingServer(config, state, cfg.drain_grace_seconds).run()
    finally:
        close = getattr(state.engine.engine.executor, "close", None)
        if close:
            close()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(cfg)


if __name__ == "__main__":
    main()
