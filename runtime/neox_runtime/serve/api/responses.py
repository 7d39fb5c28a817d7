"""OpenAI response bodies and stream chunks as plain dicts (the wire format, nothing else)."""

from __future__ import annotations

from neox_runtime.serve.engine.sequence import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """Token strings for logprobs: each token decoded alone, as OpenAI reports them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, lps: list[TokenLogprob], offset: int) -> dict:
        tokens = [self.token(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [None if lp.top is None else {self.token(t): v for t, v in lp.top} for lp in lps],
                "text_offset": offsets}

    def chat(self, lps: list[TokenLogprob]) -> dict:
        def entry(t: int, v: float) -> dict:
            s = self.token(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}
        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_chunk_choice(index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
                      first: bool) -> dict:
    delta: dict = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
