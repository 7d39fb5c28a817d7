"""The engine's step loop: schedule -> execute -> update, with plain data between layers.

`LLMEngine` is synchronous and single-threaded; `async_engine` drives it from a thread
for the HTTP server. The executor is the model runner itself at TP 1, or the tensor-
parallel executor that broadcasts each plan to the other ranks first.
"""

from __future__ import annotations

import itertools
import time
from typing import Protocol

import torch
from tokenizers import Tokenizer

from neox_runtime.serve.engine.detokenizer import Detokenizer, DetokState
from neox_runtime.serve.engine.runner import StepPlan
from neox_runtime.serve.engine.sampler import LogitsProcessor, Sampler, token_logprobs
from neox_runtime.serve.engine.scheduler import Scheduler
from neox_runtime.serve.engine.sequence import SamplingParams, Sequence, SequenceDelta, TokenLogprob
from neox_runtime.serve.metrics import ServerMetrics


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> torch.Tensor | None: ...


class LLMEngine:
    def __init__(self, *, executor: Executor, tokenizer: Tokenizer, num_slots: int, max_len: int,
                 max_num_batched_tokens: int, eos_token_id: int | None,
                 processors: list[LogitsProcessor] | None = None, metrics: ServerMetrics | None = None):
        self.executor = executor
        self.scheduler = Scheduler(num_slots=num_slots, max_len=max_len,
                                   max_num_batched_tokens=max_num_batched_tokens)
        self.sampler = Sampler(processors)
        self.detok = Detokenizer(tokenizer)
        self.max_len = max_len
        self.eos_token_id = eos_token_id
        self.metrics = metrics
        self._ids = itertools.count()
        self._detok: dict[Sequence, DetokState] = {}
        self._by_request: dict[str, list[Sequence]] = {}
        self.last_progress = time.monotonic()
        self.tokens_generated = 0

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids or len(prompt_ids) + 1 > self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a {self.max_len}-token slot")
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = torch.Generator()
            gen.manual_seed(params.seed + i if params.seed is not None else torch.seed())
            seq = Sequence(seq_id=next(self._ids), request_id=request_id, index=i,
                           prompt_ids=list(prompt_ids), params=params, generator=gen, arrival=now)
            self._detok[seq] = DetokState(stop=params.stop)
            self.scheduler.add(seq)
            seqs.append(seq)
        self._by_request[request_id] = seqs

    def abort(self, request_id: str) -> None:
        for seq in self._by_request.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
            self._detok.pop(seq, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def request_ids(self) -> list[str]:
        return list(self._by_request)

    def step(self) -> list[SequenceDelta]:
        step = self.scheduler.schedule()
        if step is None:
            return []
        logits = self.executor.execute(step.plan)
        self.scheduler.record_computed(step)
        if step.scored:
            self._score_prompts(step.scored, logits[len(step.sampled):])
        deltas = self._update(step.sampled, logits[:len(step.sampled)]) if step.sampled else []
        deltas += [self._finish_prompt_only(seq) for seq in step.prompt_only]
        self._observe_state()
        return deltas

    def _score_prompts(self, scored: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> None:
        """Prompt logprobs (echo with logprobs): each scored row's log-probability of the next prompt token."""
        targets = [t for seq, first, count in scored for t in seq.prompt_ids[first:first + count]]
        ks = [seq.params.prompt_logprobs for seq, _, count in scored for _ in range(count)]
        records = iter(token_logprobs(torch.log_softmax(logits.float(), dim=-1), targets, ks))
        for seq, first, count in scored:
            if first == 1:  # nothing predicts the first prompt token
                seq.prompt_logprobs.append(TokenLogprob(seq.prompt_ids[0], None, None))
            seq.prompt_logprobs.extend(next(records) for _ in range(count))

    def _finish_prompt_only(self, seq: Sequence) -> SequenceDelta:
        """A sequence asked for no new tokens (echo with max_tokens=0): done once its prompt is scored."""
        now = time.monotonic()
        self.scheduler.finish(seq, "length")
        self._on_finish(seq, now)
        return SequenceDelta(seq.request_id, seq.index, [], "", [], "length", len(seq.prompt_ids), 0,
                             prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None)

    def _update(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SequenceDelta]:
        tokens, logprobs = self.sampler(logits, seqs)
        now = time.monotonic()
        self.last_progress = now
        self.tokens_generated += len(tokens)
        if self.metrics:
            self.metrics.generated(len(tokens))
        deltas = []
        for seq, tok, lp in zip(seqs, tokens, logprobs):
            self._observe_token(seq, now)
            seq.output_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            reason = self._finish_reason(seq, tok)
            st = self._detok[seq]
            text = self.detok.add(st, tok, final=reason is not None)
            if st.stopped:
                reason = "stop"
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._on_finish(seq, now)
            first = len(seq.output_ids) == 1 and seq.params.prompt_logprobs is not None
            deltas.append(SequenceDelta(seq.request_id, seq.index, [tok], text, [lp] if lp else [],
                                        reason, len(seq.prompt_ids), len(seq.output_ids),
                                        prompt_logprobs=seq.prompt_logprobs if first else None))
        return deltas

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (tok == self.eos_token_id and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.length >= self.max_len:
            return "length"
        return None

    def _on_finish(self, seq: Sequence, now: float) -> None:
        self._detok.pop(seq, None)
        seqs = self._by_request.get(seq.request_id, [])
        if all(s.finished for s in seqs):
            self._by_request.pop(seq.request_id, None)
        if self.metrics:
            self.metrics.finished(now - seq.arrival, seq.finish_reason)

    def _observe_token(self, seq: Sequence, now: float) -> None:
        if self.metrics:
            if seq.first_token_time is None:
                self.metrics.first_token(now - seq.arrival, len(seq.prompt_ids))
            else:
                self.metrics.next_token(now - seq.last_token_time)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now

    def _observe_state(self) -> None:
        if self.metrics:
            s = self.scheduler
            self.metrics.engine_state(len(s.running), len(s.waiting), s.slots.usage())
