"""Plain data passed between the engine's layers: sampling parameters, sequences, outputs.

A request with `n` choices becomes `n` sequences; each owns a KV-cache slot while it
runs and a private `torch.Generator`, so a seeded sequence samples the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """What a request asks of the sampler; validated at the API edge."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; else drop tokens below min_p x the top token's probability (vLLM)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # finish like EOS (the token is kept in the output)
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot finish a choice before this many
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None = off; k >= 0 top alternatives per token
    prompt_logprobs: int | None = None  # None = off; else logprobs of the prompt's tokens, k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    watermark: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1  # as vLLM: tiny temperatures are greedy

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: list[tuple[int, float]] | None  # (token id, logprob), best first


@dataclass(eq=False)
class Sequence:
    """One choice of one request, from admission until it frees its slot."""

    seq_id: int
    request_id: str
    index: int  # choice index within the request
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class SequenceDelta:
    """What one engine step added to one sequence (streamed to the API layer)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # on a sequence's first delta, when asked for
    error: str | None = None  # set on the last delta of a request the engine failed (finish_reason "error")
