"""One job's execution: run it on the engine and answer as OpenAI does (JSON or an SSE stream).

Choices are numbered `prompt_index * n + i` (OpenAI's order for batched prompts). Output
moderation runs on every delta through a `StreamFilter`, so a stream never sends text a
hook would have refused or redacted; a refusal ends the choice with
finish_reason "content_filter".

Failures: a request the engine failed alone is a 500 in OpenAI's shape (code
"engine_error"), a dead engine a 503; mid-stream, either is one SSE event
`data: {"error": {...}}` before `data: [DONE]`. A non-streamed request whose client
disconnects is cancelled, which aborts its sequences in the engine (a stream's is
cancelled by Starlette, to the same effect).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from neox_runtime.safety.moderation import StreamFilter
from neox_runtime.serve.api import responses as R
from neox_runtime.serve.api.errors import APIError, error_body
from neox_runtime.serve.api.prepare import Job
from neox_runtime.serve.engine.async_engine import EngineDeadError, RequestFailedError, RequestRefusedError
from neox_runtime.serve.engine.sequence import SequenceDelta

log = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer


def api_error(exc: Exception) -> APIError:
    """The OpenAI-shaped error for what went wrong while running a job."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRefusedError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"The engine failed on this request ({exc}); other requests were not affected.",
                        code="engine_error")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine has failed ({exc}); retry on another replica.", code="engine_dead")
    log.error("Unexpected error while running a request", exc_info=exc)
    return APIError(500, "internal error")


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (its body is already read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)


@dataclass
class Choice:
    filter: StreamFilter
    text: str = ""
    tokens: int = 0
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None  # echo with logprobs: the prompt's, from the first delta
    finish_reason: str | None = None
    started: bool = False

    def feed(self, d: SequenceDelta) -> str:
        text = self.filter.feed(d.text, final=d.finish_reason is not None)
        self.text += text
        self.tokens += len(d.token_ids)
        self.logprobs += d.logprobs
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if self.filter.refused:
            self.finish_reason = "content_filter"
        elif d.finish_reason is not None:
            self.finish_reason = d.finish_reason
        return text


class Serving:
    def __init__(self, state):
        self.s = state

    # ---- execution
    async def _events(self, job: Job) -> AsyncIterator[tuple[int, SequenceDelta]]:
        engine = self.s.engine
        if len(job.prompts) == 1:
            async for d in engine.generate(job.id, job.prompts[0], job.params):
                yield 0, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async for d in engine.generate(f"{job.id}-{i}", ids, job.params):
                    await queue.put((i, d))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(job.prompts)]
        remaining = len(job.prompts) * job.params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item[1].finish_reason is not None
                yield item
        finally:
            for t in tasks:
                t.cancel()

    def _choices(self, job: Job) -> list[Choice]:
        return [Choice(StreamFilter(self.s.hooks)) for _ in range(len(job.prompts) * job.params.n)]

    def _finish(self, job: Job, choices: list[Choice]) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(c.tokens for c in choices)
        self.s.limiter.refund(job.key_id, job.reserved - prompt - completion)
        reasons = sorted({r for c in choices for r in c.filter.reasons})
        if reasons:
            refused = any(c.finish_reason == "content_filter" for c in choices)
            self.s.audit.record("refused" if refused else "flagged", reason="moderation_output",
                                key_id=job.key_id, request_id=job.id, endpoint=job.endpoint, terms=reasons)
        return R.usage(prompt, completion)

    async def _consume(self, job: Job, choices: list[Choice]) -> AsyncIterator[tuple[int, str, list]]:
        """Feed engine deltas to the choices; yields (choice index, safe text, logprobs) per delta."""
        n = job.params.n
        async for pi, d in self._events(job):
            idx = pi * n + d.index
            ch = choices[idx]
            text = ch.feed(d)
            yield idx, text, d.logprobs
            if ch.finish_reason == "content_filter":
                for j in range(len(job.prompts)):
                    self.s.engine.abort(job.id if len(job.prompts) == 1 else f"{job.id}-{j}")
                for c in choices:
                    c.finish_reason = c.finish_reason or "content_filter"
                for j, c in enumerate(choices):
                    if j != idx:
                        yield j, "", []
                return

    async def respond(self, job: Job, request: Request | None = None):
        if job.stream:
            return StreamingResponse(self._sse(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if request is None:
            return JSONResponse(await self._complete(job))
        return await self._unless_disconnected(request, job)

    async def _unless_disconnected(self, request: Request, job: Job) -> Response:
        answer, gone = asyncio.ensure_future(self._complete(job)), asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            gone.cancel()
            return JSONResponse(answer.result())
        answer.cancel()  # unwinds engine.generate, which aborts the request's sequences
        await asyncio.gather(answer, return_exceptions=True)
        log.info("Client disconnected; request aborted request_id=%s", job.id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def _complete(self, job: Job) -> dict:
        choices = self._choices(job)
        try:
            async for _ in self._consume(job, choices):
                pass
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape
            raise api_error(exc) from None
        finally:
            usage = self._finish(job, choices)  # refunds the unused quota on failure and cancellation too
        fmt = R.LogprobFormatter(self.s.tokenizer)
        out = []
        for i, c in enumerate(choices):
            if job.chat:
                lp = fmt.chat(c.logprobs) if job.params.logprobs is not None else None
                out.append(R.chat_choice(i, c.text, lp, c.finish_reason))
            else:
                prefix = job.prompt_texts[i // job.params.n] if job.echo else ""
                lp = fmt.completion((c.prompt_logprobs or []) + c.logprobs, 0 if c.prompt_logprobs else len(prefix)) \
                    if job.params.logprobs is not None else None
                out.append(R.completion_choice(i, prefix + c.text, lp, c.finish_reason))
        return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion",
                "created": job.created, "model": job.model, "choices": out, "usage": usage}

    async def _sse(self, job: Job) -> AsyncIterator[str]:
        choices = self._choices(job)
        fmt = R.LogprobFormatter(self.s.tokenizer)
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        base = {"id": job.id, "object": obj, "created": job.created, "model": job.model}
        extra = {"usage": None} if job.include_usage else {}

        def chunk(choice: dict) -> str:
            return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

        def echo(i: int) -> str:
            lp = fmt.completion(choices[i].prompt_logprobs, 0) if choices[i].prompt_logprobs else None
            return chunk(R.completion_choice(i, job.prompt_texts[i // job.params.n], lp, None))

        # The echoed prompt goes first; when its logprobs are wanted, with the first delta that carries them.
        echo_pending = set(range(len(choices))) if not job.chat and job.echo else set()
        if job.params.prompt_logprobs is None:
            for i in sorted(echo_pending):
                yield echo(i)
            echo_pending.clear()
        try:
            async for idx, text, lps in self._consume(job, choices):
                c = choices[idx]
                if idx in echo_pending:
                    echo_pending.discard(idx)
                    yield echo(idx)
                want_lp = job.params.logprobs is not None and lps
                if job.chat:
                    lp = fmt.chat(lps) if want_lp else None
                    if text or lp or c.finish_reason or not c.started:
                        yield chunk(R.chat_chunk_choice(idx, text, lp, c.finish_reason, first=not c.started))
                        c.started = True
                elif text or want_lp or c.finish_reason:
                    echoed = len(job.prompt_texts[idx // job.params.n]) if job.echo else 0
                    lp = fmt.completion(lps, echoed + len(c.text) - len(text)) if want_lp else None
                    yield chunk(R.completion_choice(idx, text, lp, c.finish_reason))
        except Exception as exc:  # noqa: BLE001 - the stream has begun: the error is its last event
            err = api_error(exc)
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            usage = self._finish(job, choices)  # refunds the unused quota on failure and disconnects too
        if job.include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
