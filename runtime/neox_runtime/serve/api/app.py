"""The FastAPI application: routes, auth, drain gate, health, readiness and metrics.

`ServerState` holds what every request needs (engine, tokenizer, chat format, safety
pieces); it is built once by `build_state` from the `ServeConfig` and passed whole to
`create_app`. Every endpoint but /health, /ready and /metrics takes the API key.
Draining (after SIGTERM): /ready answers 503, new /v1 requests get 503, requests
already in flight (streams included) run to the end; `inflight` counts them until
their last byte is sent.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Body, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.safety.audit import AuditLog
from neox_runtime.safety.auth import KeyStore, bearer_token
from neox_runtime.safety.moderation import BlocklistHook, ModerationHook
from neox_runtime.safety.ratelimit import RateLimiter
from neox_runtime.safety.watermark import WatermarkProcessor, detect_text
from neox_runtime.serve.api import errors
from neox_runtime.serve.api.chat import ChatFormat
from neox_runtime.serve.api.errors import APIError
from neox_runtime.serve.api.prepare import Preparer
from neox_runtime.serve.api.protocol import ChatCompletionRequest, CompletionRequest, DetectRequest, DetokenizeRequest
from neox_runtime.serve.api.serving import Serving
from neox_runtime.serve.api.tokenization import Tokenization, parse_tokenize
from neox_runtime.serve.config import ServeConfig
from neox_runtime.serve.engine.async_engine import AsyncEngine
from neox_runtime.serve.engine.build import build_engine
from neox_runtime.serve.metrics import ServerMetrics


@dataclass
class ServerState:
    cfg: ServeConfig
    engine: AsyncEngine
    tokenizer: object
    arch: ModelArchitecture
    max_len: int
    model_name: str
    metrics: ServerMetrics
    keys: KeyStore | None
    limiter: RateLimiter
    hooks: list[ModerationHook]
    audit: AuditLog
    watermark: WatermarkProcessor | None
    chat_format: ChatFormat = field(default_factory=ChatFormat)
    eos_token_id: int | None = None
    draining: bool = False
    inflight: int = 0
    started: float = field(default_factory=time.time)


def build_state(cfg: ServeConfig, hooks: list[ModerationHook] | None = None) -> ServerState:
    s = cfg.safety
    metrics = ServerMetrics(cfg.engine.model_name)
    watermark = WatermarkProcessor(s.watermark_key, s.watermark_gamma, s.watermark_delta) \
        if s.watermark_key else None
    built = {}

    def build():  # runs on the engine thread (see async_engine)
        built["engine"], built["loaded"] = build_engine(cfg.engine, processors=[watermark] if watermark else None,
                                                        metrics=metrics)
        return built["engine"]

    async_engine = AsyncEngine(build)
    loaded = built["loaded"]
    if hooks is None:
        hooks = [BlocklistHook(s.blocklist, s.blocklist_action)] if s.blocklist else []
    return ServerState(
        cfg=cfg, engine=async_engine, tokenizer=loaded.tokenizer, arch=loaded.arch,
        max_len=built["engine"].max_len, model_name=cfg.engine.model_name, metrics=metrics,
        keys=KeyStore.from_path(s.api_keys_file) if s.api_keys_file else None,
        limiter=RateLimiter(s.requests_per_minute, s.tokens_per_minute), hooks=hooks,
        audit=AuditLog(s.audit_log), watermark=watermark,
        chat_format=ChatFormat.from_model_dir(cfg.engine.model, loaded.tokenizer, loaded.eos_token_id,
                                              cfg.chat_template),
        eos_token_id=loaded.eos_token_id)


class InflightGate:
    """ASGI middleware: 503 for new /v1 requests while draining; counts /v1 requests to their last byte."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.state.draining:
            self.state.metrics.refused.labels(self.state.model_name, "draining").inc()
            resp = errors.error_response(APIError(503, "The server is shutting down; retry on another replica.",
                                                  code="draining"))
            return await resp(scope, receive, send)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start(asyncio.get_running_loop())
        yield
        state.engine.shutdown()

    app = FastAPI(title="neox-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible GPT-NeoX server with auth, quotas, moderation and watermarking.")
    errors.install(app)
    app.add_middleware(InflightGate, state=state)
    app.state.server = state

    async def authorize(authorization: str | None = Header(None)) -> str:  # async: no thread-pool hop per request
        if state.keys is None:
            return "anonymous"
        key_id = state.keys.identify(bearer_token(authorization))
        if key_id is None:
            state.metrics.refused.labels(state.model_name, "auth").inc()
            state.audit.record("refused", reason="auth", key_id=None)
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        return key_id

    def check_model(model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{state.model_name}'.",
                           param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, key_id: str = Depends(authorize)):
        check_model(req.model)
        job = Preparer(state, key_id, "/v1/completions", req.user).completion(req)
        return await Serving(state).respond(job, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request, key_id: str = Depends(authorize)):
        check_model(req.model)
        job = Preparer(state, key_id, "/v1/chat/completions", req.user).chat(req)
        return await Serving(state).respond(job, request)

    @app.post("/tokenize")
    async def tokenize(body=Body(...), key_id: str = Depends(authorize)):
        req = parse_tokenize(body)
        check_model(req.model)
        return Tokenization(state, key_id).tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, key_id: str = Depends(authorize)):
        check_model(req.model)
        return Tokenization(state, key_id).detokenize(req)

    @app.get("/v1/models")
    async def models(_: str = Depends(authorize)):
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "neox-k8s", "max_model_len": state.max_len}]}

    @app.post("/v1/watermark/detect")
    async def watermark_detect(req: DetectRequest, _: str = Depends(authorize)):
        if state.watermark is None:
            raise APIError(404, "Watermarking is not enabled on this server.", code="watermark_disabled")
        cfg = state.cfg.safety
        d = detect_text(req.text, state.tokenizer, cfg.watermark_key, cfg.watermark_gamma)
        return d.__dict__

    @app.get("/health")
    async def health():
        eng = state.engine
        if eng.error is not None:
            return JSONResponse({"status": "error", "reason": f"engine failed: {eng.error}"}, status_code=503)
        stalled = eng.stalled_for()
        if stalled > state.cfg.health_stall_seconds:
            return JSONResponse({"status": "error", "reason": f"no token progress for {stalled:.0f}s "
                                 "while requests are pending"}, status_code=503)
        return {"status": "ok", "tokens_generated": eng.engine.tokens_generated}

    @app.get("/ready")
    async def ready():
        if state.draining or state.engine.error is not None:
            return JSONResponse({"ready": False, "draining": state.draining}, status_code=503)
        return {"ready": True}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
