"""One request's path: validate against the model and the caps, apply quotas and
moderation, run it on the engine, and answer as OpenAI does (JSON or an SSE stream).

Choices are numbered `prompt_index * n + i` (OpenAI's order for batched prompts). Output
moderation runs on every delta through a `StreamFilter`, so a stream never sends text a
hook would have refused or redacted; a refusal ends the choice with
finish_reason "content_filter".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, StreamingResponse

from neox_runtime.safety.moderation import StreamFilter, moderate_input
from neox_runtime.safety.ratelimit import RateLimited
from neox_runtime.serve.api import chat as chat_template
from neox_runtime.serve.api import responses as R
from neox_runtime.serve.api.errors import APIError
from neox_runtime.serve.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from neox_runtime.serve.engine.sequence import SamplingParams, SequenceDelta


@dataclass
class Job:
    chat: bool
    id: str
    model: str
    key_id: str
    endpoint: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    reserved: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


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

    # ---- preparation: everything that can refuse a request happens before the engine sees it
    def _tokenize(self, prompt, param: str) -> tuple[list[int], str]:
        tok, vocab = self.s.tokenizer, self.s.arch.vocab_size
        if isinstance(prompt, str):
            if len(prompt) > 32 * self.s.max_len:  # refuse before spending CPU on tokenizing it
                raise APIError(400, f"The prompt has {len(prompt)} characters, far more than a "
                               f"{self.s.max_len}-token context holds.", param=param, code="context_length_exceeded")
            verdict = moderate_input(self.s.hooks, prompt)
            if verdict.action == "refuse":
                raise self._refuse_input(verdict.reasons, param)
            if verdict.action == "redact":
                self._flag(verdict.reasons, "input")
            ids = tok.encode(verdict.text).ids
            if not ids:  # OpenAI starts an empty prompt from <|endoftext|>
                if self.s.eos_token_id is None:
                    raise APIError(400, "prompt must not be empty", param=param, code="invalid_value")
                ids = [self.s.eos_token_id]
            return ids, verdict.text
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary (size {vocab})", param=param,
                           code="invalid_value")
        return list(prompt), tok.decode(prompt)

    def _refuse_input(self, reasons: list[str], param: str) -> APIError:
        self.s.audit.record("refused", reason="moderation_input", key_id=self._key, endpoint=self._endpoint,
                            terms=reasons)
        self.s.metrics.refused.labels(self.s.metrics.model_name, "moderation").inc()
        return APIError(400, "The request was refused by the content policy.", param=param,
                        code="content_policy_violation")

    def _flag(self, reasons: list[str], where: str, request_id: str | None = None) -> None:
        self.s.audit.record("flagged", reason=f"moderation_{where}", key_id=self._key, endpoint=self._endpoint,
                            request_id=request_id, terms=reasons)

    def _params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None, stop: list[str],
                prompt_lens: list[int], param: str) -> SamplingParams:
        cfg, max_len = self.s.cfg.safety, self.s.max_len
        if len(stop) > cfg.max_stop_sequences:
            raise APIError(400, f"at most {cfg.max_stop_sequences} stop sequences are allowed", param="stop",
                           code="invalid_value")
        longest = max(prompt_lens)
        cap_prompt = min(cfg.max_prompt_tokens or max_len, max_len - 1)
        if longest > cap_prompt:
            raise APIError(400, f"The prompt has {longest} tokens; this server accepts at most {cap_prompt}.",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and cfg.max_tokens_cap and max_tokens > cfg.max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_cap}.",
                           param="max_tokens", code="invalid_value")
        if max_tokens is None:
            max_tokens = self._default_max_tokens(longest)
        bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
        for token_id, _ in bias:
            if token_id >= self.s.arch.vocab_size:
                raise APIError(400, f"logit_bias names token id {token_id}, outside the vocabulary "
                               f"(size {self.s.arch.vocab_size})", param="logit_bias", code="invalid_value")
        if longest + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                           f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
                           f"in the completion).", param="max_tokens", code="context_length_exceeded")
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, stop=tuple(stop), ignore_eos=req.ignore_eos, n=req.n,
            logprobs=logprobs, logit_bias=bias, watermark=self.s.watermark is not None)

    def _default_max_tokens(self, prompt_len: int) -> int:
        if self._chat:  # chat: until the context ends (OpenAI), within the cap
            room = self.s.max_len - prompt_len
            return min(room, self.s.cfg.safety.max_tokens_cap or room)
        return min(self.s.cfg.safety.default_max_tokens, self.s.max_len - prompt_len)

    def _begin(self, chat: bool, key_id: str, endpoint: str) -> None:
        self._chat, self._key, self._endpoint = chat, key_id, endpoint

    def prepare_completion(self, req: CompletionRequest, key_id: str) -> Job:
        self._begin(False, key_id, "/v1/completions")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this model", param="suffix",
                           code="invalid_value")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 asks for no completion; it is only accepted with echo=true (to "
                           "score the prompt with logprobs)", param="max_tokens", code="invalid_value")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of={req.best_of} is not supported; only best_of equal to n "
                           f"({req.n}) is accepted. Ask for n choices and rank them by logprobs.",
                           param="best_of", code="invalid_value")
        p = req.prompt
        raw = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        pairs = [self._tokenize(x, "prompt") for x in raw]
        params = self._params(req, req.max_tokens, req.logprobs, req.stop_list(), [len(i) for i, _ in pairs],
                              "prompt")
        if req.echo and req.logprobs is not None:  # OpenAI scores the echoed prompt too
            params = SamplingParams(**{**params.__dict__, "prompt_logprobs": req.logprobs})
        return self._job(False, req, params, pairs, echo=req.echo)

    def prepare_chat(self, req: ChatCompletionRequest, key_id: str) -> Job:
        self._begin(True, key_id, "/v1/chat/completions")
        for unsupported in ("tools", "functions"):
            if getattr(req, unsupported):
                raise APIError(400, f"{unsupported}: tool and function calling is not supported by this server "
                               "(a base GPT-NeoX model has no tool-call format)", param=unsupported,
                               code="invalid_value")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported; only 'text' is",
                           param="response_format", code="invalid_value")
        try:
            text = chat_template.render(req.messages, self.s.cfg.safety.system_prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        pair = self._tokenize(text, "messages")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        stop = req.stop_list()
        params = self._params(req, req.max_completion_tokens or req.max_tokens, lp, stop, [len(pair[0])],
                              "messages")
        params = SamplingParams(**{**params.__dict__, "stop": tuple(stop) + (chat_template.TURN_STOP,)})
        return self._job(True, req, params, [pair])

    def _job(self, chat: bool, req: SamplingFields, params: SamplingParams, pairs, echo: bool = False) -> Job:
        job = Job(chat=chat, id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, model=self.s.model_name,
                  key_id=self._key, endpoint=self._endpoint, prompts=[i for i, _ in pairs],
                  prompt_texts=[t for _, t in pairs], params=params, stream=req.stream,
                  include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
                  echo=echo)
        job.reserved = sum(len(i) for i in job.prompts) + params.max_tokens * params.n * len(job.prompts)
        try:
            self.s.limiter.acquire(self._key, job.reserved)
        except RateLimited as exc:
            self.s.metrics.refused.labels(self.s.metrics.model_name, "rate_limit").inc()
            self.s.audit.record("refused", reason="rate_limit", key_id=self._key, endpoint=self._endpoint)
            raise APIError(429, str(exc), code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(exc.retry_after + 0.999)))}) from None
        return job

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

    async def respond(self, job: Job):
        return StreamingResponse(self._sse(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"}) if job.stream \
            else JSONResponse(await self._complete(job))

    async def _complete(self, job: Job) -> dict:
        choices = self._choices(job)
        async for _ in self._consume(job, choices):
            pass
        usage = self._finish(job, choices)
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
        usage = self._finish(job, choices)
        if job.include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
