"""OpenAI request bodies as pydantic models: field ranges are OpenAI's, so bad input is a 400.

Every field is honoured or refused, never ignored: a field no model here declares is a
400 naming it ("Unrecognized request argument supplied", OpenAI's words), and fields that
are declared but not done by this server (`suffix`, `best_of` other than `n`, tools and
function calling, JSON response formats) are refused with a 400 by `serving`. vLLM's
sampling extensions (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids) are honoured. Strings must be valid Unicode: JSON can carry a lone
UTF-16 surrogate (`"\\ud800"`), which no tokenizer can encode, so it is a 400 naming the
field. Responses are built as dicts in `responses`, matching the OpenAI wire format.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_N = 16
MAX_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one batched completion request
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias map
MAX_STOP_TOKEN_IDS = 64
MAX_TOKENIZE_CHARS = 1_000_000  # /tokenize counts long documents, but not unbounded ones
MAX_DETOKENIZE_TOKENS = 100_000

# Python's json joins an escaped surrogate pair into one character, so any surrogate left is lone.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    m = _SURROGATE.search(text)
    if m:
        raise ValueError(f"contains a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) at character {m.start()}, "
                         "which is not valid Unicode")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0)]
Prompt = Text | list[TokenId] | list[Text] | list[list[TokenId]]


class Strict(BaseModel):
    """Unknown fields are refused (OpenAI answers 400 "Unrecognized request argument supplied")."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: StrictBool = False


class SamplingFields(Strict):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    # vLLM: drop tokens whose probability is below min_p times the most likely token's.
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    # vLLM: token ids that finish a choice like EOS (the token is part of the output).
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    # vLLM: EOS, stop_token_ids and stop strings cannot end a choice before this many tokens.
    min_tokens: int = Field(0, ge=0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: StrictBool = False
    user: Text | None = Field(None, max_length=256)  # OpenAI's end-user id: written to the audit log
    # OpenAI: token id (as a JSON object key) -> bias in [-100, 100], added to the logits.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS)

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, v):
        for key in v or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v):
        if isinstance(v, list) and any(s == "" for s in v) or v == "":
            raise ValueError("stop strings must not be empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt (see serving)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_nonempty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, (str, list)) and len(p) == 0 for p in v)):
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v


class TextPart(Strict):
    type: str
    text: Text

    @field_validator("type")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise ValueError(f"only text content parts are supported, got {v!r}")
        return v


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=256)
    # What the openai SDK sends back when a client appends a previous response's message:
    # accepted empty, refused otherwise (this server makes and reads no tool calls).
    refusal: Text | None = None
    tool_calls: list[dict] | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list[dict] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(Strict):
    type: str
    json_schema: dict | None = None  # refused with every type but "text" (see serving)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Asked of the model but not done by this server: refused with a 400 (see `serving`), never ignored.
    tools: list[dict] | None = None
    functions: list[dict] | None = None
    tool_choice: str | dict | None = None  # only "none" is accepted
    response_format: ResponseFormat | None = None


class DetectRequest(Strict):
    text: Text = Field(max_length=200_000)


class TokenizeCompletionRequest(Strict):
    """vLLM's /tokenize with a prompt."""

    model: Text | None = None
    prompt: Text = Field(max_length=MAX_TOKENIZE_CHARS)
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(Strict):
    """vLLM's /tokenize with chat messages: the tokens /v1/chat/completions would feed the model."""

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False


class DetokenizeRequest(Strict):
    model: Text | None = None
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE_TOKENS)
