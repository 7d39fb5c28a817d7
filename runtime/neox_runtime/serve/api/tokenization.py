"""vLLM's `/tokenize` and `/detokenize`: what a prompt or a chat becomes in tokens here, and tokens' text.

`/tokenize` takes `{"prompt", "add_special_tokens" (default true)}` or `{"messages",
"add_generation_prompt" (true), "continue_final_message" (false), "add_special_tokens"
(false)}`, plus `return_token_strs`, and answers `{"count", "max_model_len", "tokens"}`
(and `"token_strs"`, the tokenizer's own token strings, when asked). Messages are
rendered by the same chat format as /v1/chat/completions (template or transcript, with
the steering prompt), so `count` is that endpoint's `usage.prompt_tokens` (before input
moderation, which may redact). `/detokenize` takes `{"tokens"}` and answers `{"prompt"}`,
special tokens included, as transformers decodes.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from neox_runtime.serve.api.errors import APIError
from neox_runtime.serve.api.prepare import Preparer
from neox_runtime.serve.api.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest


def parse_tokenize(body) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body is a prompt request or a chat request, told apart by `messages` (so errors name the field)."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_value")
    model = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


class Tokenization:
    def __init__(self, state, key_id: str):
        self.s, self.key_id = state, key_id

    def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
        tok = self.s.tokenizer
        if isinstance(req, TokenizeChatRequest):
            rendered = Preparer(self.s, self.key_id, "/tokenize").render_chat(
                req.messages, moderated=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message)
            text = rendered.text
        else:
            text = req.prompt
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens).ids
        out = {"count": len(ids), "max_model_len": self.s.max_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [tok.id_to_token(i) for i in ids]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        vocab = self.s.arch.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of the vocabulary (size {vocab})", param="tokens",
                           code="invalid_value")
        return {"prompt": self.s.tokenizer.decode(req.tokens, skip_special_tokens=False)}
