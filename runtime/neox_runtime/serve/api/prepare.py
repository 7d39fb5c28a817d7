"""From a validated request body to an engine job: everything that can refuse a request, before the engine sees it.

Checks against the model and the server's caps, input moderation (text prompts, token-id
prompts decoded first, and each chat message), the chat format, sampling parameters,
and the rate limiter's reservation. Every refusal is an `APIError` naming the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

from neox_runtime.safety.moderation import moderate_input
from neox_runtime.safety.ratelimit import RateLimited
from neox_runtime.serve.api.errors import APIError
from neox_runtime.serve.api.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                                             SamplingFields)
from neox_runtime.serve.engine.sequence import SamplingParams


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


_MESSAGE_FIELDS_REFUSED = {
    "tool_calls": "tool calls are not supported by this server",
    "function_call": "function calls are not supported by this server",
    "audio": "audio is not supported by this server",
    "annotations": "annotations are not supported by this server",
    "refusal": "refusal messages are not supported as input; send the text as content",
}


def chat_messages(messages: list[ChatMessage], moderate=None) -> list[dict]:
    """Messages as the chat format takes them ({"role", "content", "name"}); `moderate(text, param)` may rewrite."""
    out = []
    for i, m in enumerate(messages):
        for name, why in _MESSAGE_FIELDS_REFUSED.items():
            if getattr(m, name):
                raise APIError(400, f"messages.{i}.{name}: {why}", param=f"messages.{i}.{name}", code="invalid_value")
        text = m.text()
        if moderate is not None:
            text = moderate(text, f"messages.{i}.content")
        out.append({"role": m.role, "content": text, **({"name": m.name} if m.name else {})})
    return out


class Preparer:
    """Turns one request of one key into a `Job` (or an `APIError`)."""

    def __init__(self, state, key_id: str, endpoint: str, user: str | None = None):
        self.s, self._key, self._endpoint, self._user = state, key_id, endpoint, user

    # ---- prompts and moderation
    def moderate(self, text: str, param: str) -> str:
        """Input hooks over `text`: a refusal is a 400 naming `param`; a redaction returns the cleaned text."""
        verdict = moderate_input(self.s.hooks, text)
        if verdict.action == "refuse":
            self._audit("refused", "moderation_input", terms=verdict.reasons)
            self.s.metrics.refused.labels(self.s.metrics.model_name, "moderation").inc()
            raise APIError(400, "The request was refused by the content policy.", param=param,
                           code="content_policy_violation")
        if verdict.action == "redact":
            self._audit("flagged", "moderation_input", terms=verdict.reasons)
        return verdict.text

    def _audit(self, event: str, reason: str, **detail) -> None:
        if self._user is not None:
            detail["user"] = self._user
        self.s.audit.record(event, reason=reason, key_id=self._key, endpoint=self._endpoint, **detail)

    def _check_length(self, tokens: int, param: str) -> None:
        cap = min(self.s.cfg.safety.max_prompt_tokens or self.s.max_len, self.s.max_len - 1)
        if tokens > cap:
            raise APIError(400, f"The prompt has {tokens} tokens; this server accepts at most {cap}.",
                           param=param, code="context_length_exceeded")

    def tokenize(self, prompt: str | list[int], param: str, moderated: bool = True,
                 add_special_tokens: bool = True) -> tuple[list[int], str]:
        """(token ids, text) of one prompt; token-id prompts are decoded and moderated like text."""
        tok, vocab = self.s.tokenizer, self.s.arch.vocab_size
        if isinstance(prompt, str):
            if len(prompt) > 32 * self.s.max_len:  # refuse before spending CPU on tokenizing it
                raise APIError(400, f"The prompt has {len(prompt)} characters, far more than a "
                               f"{self.s.max_len}-token context holds.", param=param, code="context_length_exceeded")
            text = self.moderate(prompt, param) if moderated and self.s.hooks else prompt
            ids = tok.encode(text, add_special_tokens=add_special_tokens).ids
            if not ids:  # OpenAI starts an empty prompt from <|endoftext|>
                if self.s.eos_token_id is None:
                    raise APIError(400, "prompt must not be empty", param=param, code="invalid_value")
                ids = [self.s.eos_token_id]
            self._check_length(len(ids), param)
            return ids, text
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary (size {vocab})", param=param,
                           code="invalid_value")
        self._check_length(len(prompt), param)
        text = tok.decode(prompt)
        if moderated and self.s.hooks:
            cleaned = self.moderate(text, param)
            if cleaned != text:  # redacted: the model gets the cleaned text, so its tokens
                return self.tokenize(cleaned, param, moderated=False)
        return list(prompt), text

    # ---- sampling parameters
    def params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None, stop: list[str],
               prompt_lens: list[int], param: str, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        cfg, max_len, vocab = self.s.cfg.safety, self.s.max_len, self.s.arch.vocab_size
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                           code="invalid_value")
        if len(stop) > cfg.max_stop_sequences:
            raise APIError(400, f"at most {cfg.max_stop_sequences} stop sequences are allowed", param="stop",
                           code="invalid_value")
        longest = max(prompt_lens)
        if max_tokens is not None and cfg.max_tokens_cap and max_tokens > cfg.max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_cap}.",
                           param="max_tokens", code="invalid_value")
        if max_tokens is None:
            max_tokens = self._default_max_tokens(longest)
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                           param="min_tokens", code="invalid_value")
        bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
        for token_id, _ in bias:
            if token_id >= vocab:
                raise APIError(400, f"logit_bias names token id {token_id}, outside the vocabulary "
                               f"(size {vocab})", param="logit_bias", code="invalid_value")
        for token_id in req.stop_token_ids or ():
            if token_id >= vocab:
                raise APIError(400, f"stop_token_ids names token id {token_id}, outside the vocabulary "
                               f"(size {vocab})", param="stop_token_ids", code="invalid_value")
        if longest + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                           f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
                           f"in the completion).", param="max_tokens", code="context_length_exceeded")
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, stop=tuple(stop),
            stop_token_ids=tuple(dict.fromkeys((*(req.stop_token_ids or ()), *stop_token_ids))),
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, n=req.n, logprobs=logprobs, logit_bias=bias,
            watermark=self.s.watermark is not None)

    def _default_max_tokens(self, prompt_len: int) -> int:
        if self._endpoint.endswith("chat/completions"):  # chat: until the context ends (OpenAI), within the cap
            room = self.s.max_len - prompt_len
            return min(room, self.s.cfg.safety.max_tokens_cap or room)
        return min(self.s.cfg.safety.default_max_tokens, self.s.max_len - prompt_len)

    # ---- the two generation endpoints
    def completion(self, req: CompletionRequest) -> Job:
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
        pairs = [self.tokenize(x, "prompt") for x in raw]
        params = self.params(req, req.max_tokens, req.logprobs, req.stop_list(), [len(i) for i, _ in pairs],
                             "prompt")
        if req.echo and req.logprobs is not None:  # OpenAI scores the echoed prompt too
            params = replace(params, prompt_logprobs=req.logprobs)
        return self._job(False, req, params, pairs, echo=req.echo)

    def chat(self, req: ChatCompletionRequest) -> Job:
        for unsupported in ("tools", "functions"):
            if getattr(req, unsupported):
                raise APIError(400, f"{unsupported}: tool and function calling is not supported by this server "
                               "(a base GPT-NeoX model has no tool-call format)", param=unsupported,
                               code="invalid_value")
        if req.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice: tool calling is not supported by this server; only 'none' is "
                           "accepted", param="tool_choice", code="invalid_value")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported; only 'text' is",
                           param="response_format", code="invalid_value")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                           code="invalid_value")
        rendered = self.render_chat(req.messages, moderated=True)
        pair = self.tokenize(rendered.text, "messages", moderated=False, add_special_tokens=False)
        lp = (req.top_logprobs or 0) if req.logprobs else None
        stop = req.stop_list()
        params = self.params(req, req.max_completion_tokens or req.max_tokens, lp, stop, [len(pair[0])],
                             "messages", stop_token_ids=rendered.stop_token_ids)
        params = replace(params, stop=tuple(stop) + rendered.stop)
        return self._job(True, req, params, [pair])

    def render_chat(self, messages: list[ChatMessage], *, moderated: bool, add_generation_prompt: bool = True,
                    continue_final_message: bool = False):
        msgs = chat_messages(messages, self.moderate if moderated and self.s.hooks else None)
        try:
            return self.s.chat_format.render(msgs, steering=self.s.cfg.safety.system_prompt,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None

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
            self._audit("refused", "rate_limit")
            raise APIError(429, str(exc), code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(exc.retry_after + 0.999)))}) from None
        return job
