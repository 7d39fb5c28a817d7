"""The engine's step loop: schedule -> execute -> update, with plain data between layers.

`LLMEngine` is synchronous and single-threaded; `async_engine` drives it from a thread
for the HTTP server. The executor is the model runner itself at TP 1, or the tensor-
parallel executor that broadcasts each plan to the other ranks first.

A step never fails as a whole because of one request: work after the forward pass
(prompt scoring, sampling, detokenizing) is guarded per sequence, and a raise while
scheduling or executing is narrowed down to its culprits by `isolation`. A failed
request gets an error delta (finish_reason "error"); the others run on.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Protocol

import torch
from tokenizers import Tokenizer

from neox_runtime.serve.engine.detokenizer import Detokenizer, DetokState
from neox_runtime.serve.engine.isolation import isolate, scheduling_only
from neox_runtime.serve.engine.runner import StepPlan
from neox_runtime.serve.engine.sampler import LogitsProcessor, Sampler, token_logprobs
from neox_runtime.serve.engine.scheduler import Scheduler
from neox_runtime.serve.engine.sequence import SamplingParams, Sequence, SequenceDelta, TokenLogprob
from neox_runtime.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


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

    def sequences(self, request_id: str) -> list[Sequence]:
        return list(self._by_request.get(request_id, []))

    def step(self) -> list[SequenceDelta]:
        """One step; if scheduling or executing raises, only the requests that cause it fail (see isolation)."""
        try:
            deltas = self.step_only(None)
        except Exception as exc:  # noqa: BLE001 - narrowed down to its culprits
            log.exception("Engine step failed; stepping its sequences apart to find the cause")
            live = [s for seqs in self._by_request.values() for s in seqs if not s.finished]
            deltas = isolate(self, live, exc)
        self._observe_state()
        return deltas

    def step_only(self, group: list[Sequence] | None) -> list[SequenceDelta]:
        """A step that schedules only `group` (None: everyone). Raises only before any sequence advanced."""
        with scheduling_only(self.scheduler, group):
            step = self.scheduler.schedule()
        if step is None:
            return []
        logits = self.executor.execute(step.plan)
        self.scheduler.record_computed(step)
        deltas = self._score_prompts(step.scored, logits[len(step.sampled):]) if step.scored else []
        deltas += self._update(step.sampled, logits[:len(step.sampled)]) if step.sampled else []
        for seq in step.prompt_only:
            if not seq.finished:
                deltas += self._guarded(seq, lambda seq=seq: self._finish_prompt_only(seq))
        return deltas

    def _guarded(self, seq: Sequence, work) -> list[SequenceDelta]:
        """[work()], the delta of `seq`; if it raises, `seq`'s request fails and the step goes on."""
        try:
            return [work()]
        except Exception as exc:  # noqa: BLE001 - this request fails, the others run on
            log.exception("A sequence failed request_id=%s", seq.request_id)
            return self.fail_request(seq, exc)

    def fail_request(self, seq: Sequence, exc: BaseException) -> list[SequenceDelta]:
        """Fail the request of `seq` alone: an error delta for each of its unfinished choices, then abort it."""
        message = f"{type(exc).__name__}: {exc}"
        deltas = [SequenceDelta(s.request_id, s.index, [], "", [], "error", len(s.prompt_ids), len(s.output_ids),
                                error=message)
                  for s in self._by_request.get(seq.request_id, [seq]) if not s.finished]
        self.abort(seq.request_id)
        return deltas

    def _score_prompts(self, scored: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> list[SequenceDelta]:
        """Prompt logprobs (echo with logprobs): each scored row's log-probability of the next prompt token.

        A chunk may score no row: a one-token prompt, or a final chunk of one token (its one
        row predicts the first generated token). The batch is scored at once; if that raises,
        chunk by chunk, and a chunk that raises alone fails its request.
        """
        try:
            targets = [t for seq, first, count in scored for t in seq.prompt_ids[first:first + count]]
            ks = [seq.params.prompt_logprobs for seq, _, count in scored for _ in range(count)]
            records = token_logprobs(torch.log_softmax(logits.float(), dim=-1), targets, ks)
        except Exception:  # noqa: BLE001 - retried chunk by chunk below
            log.exception("Scoring a batch of prompts failed; scoring chunk by chunk")
            records = None
        deltas, end = [], 0
        for seq, first, count in scored:
            start, end = end, end + count
            try:
                chunk = records[start:end] if records is not None else token_logprobs(
                    torch.log_softmax(logits[start:end].float(), dim=-1), seq.prompt_ids[first:first + count],
                    [seq.params.prompt_logprobs] * count)
                if first == 1:  # nothing predicts the first prompt token
                    seq.prompt_logprobs.append(TokenLogprob(seq.prompt_ids[0], None, None))
                seq.prompt_logprobs.extend(chunk)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others run on
                log.exception("Scoring a prompt failed request_id=%s", seq.request_id)
                deltas += self.fail_request(seq, exc)
        return deltas

    def _finish_prompt_only(self, seq: Sequence) -> SequenceDelta:
        """A sequence asked for no new tokens (echo with max_tokens=0): done once its prompt is scored."""
        now = time.monotonic()
        self.scheduler.finish(seq, "length")
        self._on_finish(seq, now)
        return SequenceDelta(seq.request_id, seq.index, [], "", [], "length", len(seq.prompt_ids), 0,
                             prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None)

    def _update(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SequenceDelta]:
        tokens, logprobs = self._sample(seqs, logits)
        now = time.monotonic()
        self.last_progress = now
        deltas = []
        for seq, tok, lp in zip(seqs, tokens, logprobs):
            if seq.finished:  # another choice of its request failed earlier in this loop
                continue
            if isinstance(tok, BaseException):
                deltas += self.fail_request(seq, tok)
            else:
                deltas += self._guarded(seq, lambda seq=seq, tok=tok, lp=lp: self._advance(seq, tok, lp, now))
        generated = sum(len(d.token_ids) for d in deltas)
        self.tokens_generated += generated
        if self.metrics:
            self.metrics.generated(generated)
        return deltas

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list, list]:
        """The batch sampled at once; if that raises, row by row, a row's exception standing for its token.

        (A seeded row sampled again after its batch raised may draw another uniform than it would have.)
        """
        try:
            return self.sampler(logits, seqs, eos_token_id=self.eos_token_id)
        except Exception:  # noqa: BLE001 - retried row by row below
            log.exception("Sampling a batch failed; sampling row by row")
        tokens, logprobs = [], []
        for r, seq in enumerate(seqs):
            try:
                tok, lp = self.sampler(logits[r:r + 1], [seq], eos_token_id=self.eos_token_id)
                tokens.append(tok[0])
                logprobs.append(lp[0])
            except Exception as exc:  # noqa: BLE001 - this row's failure, reported by _update
                log.exception("Sampling a row failed request_id=%s", seq.request_id)
                tokens.append(exc)
                logprobs.append(None)
        return tokens, logprobs

    def _advance(self, seq: Sequence, tok: int, lp: TokenLogprob | None, now: float) -> SequenceDelta:
        self._observe_token(seq, now)
        seq.output_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        reason = self._finish_reason(seq, tok)
        st = self._detok[seq]
        text = self.detok.add(st, tok, final=reason is not None,
                              check_stops=len(seq.output_ids) >= seq.params.min_tokens)
        if st.stopped:
            reason = "stop"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._on_finish(seq, now)
        first = len(seq.output_ids) == 1 and seq.params.prompt_logprobs is not None
        return SequenceDelta(seq.request_id, seq.index, [tok], text, [lp] if lp else [], reason,
                             len(seq.prompt_ids), len(seq.output_ids),
                             prompt_logprobs=seq.prompt_logprobs if first else None)

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        """EOS and stop token ids count only once min_tokens are out (the sampler bans them before)."""
        p = seq.params
        may_stop = len(seq.output_ids) >= p.min_tokens
        if may_stop and ((tok == self.eos_token_id and not p.ignore_eos) or tok in p.stop_token_ids):
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
