"""The scheduler: which sequences compute which tokens this step, within the budgets.

Continuous batching: between any two steps finished sequences leave and waiting ones
join. Every running sequence past its prompt gets one decode row; the rest of the token
budget goes to prompts, in arrival order, chunked when a prompt does not fit (chunked
prefill), so a long prompt never stalls the decoders. A waiting sequence is admitted
only when a KV-cache slot is free (admission by memory: a slot holds a whole sequence).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from neox_runtime.serve.engine.kv_cache import SlotAllocator
from neox_runtime.serve.engine.runner import PrefillChunk, StepPlan
from neox_runtime.serve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    plan: StepPlan
    sampled: list[Sequence]  # aligned with the first len(sampled) of plan.sample_rows
    computed: list[tuple[Sequence, int]]  # (sequence, tokens whose K/V this step writes)
    # Prompt logprobs: (sequence, index of its first prompt token scored, rows) for rows of
    # plan.sample_rows after the sampled ones, in order; row j scores prompt token first + j.
    scored: list[tuple[Sequence, int, int]] = field(default_factory=list)
    # Sequences whose prompt is complete and that generate nothing (max_tokens=0, echo only).
    prompt_only: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, *, num_slots: int, max_len: int, max_num_batched_tokens: int):
        self.slots = SlotAllocator(num_slots, max_len)
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.slots.free(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> ScheduledStep | None:
        budget = self.max_tokens
        decoding = sorted((s for s in self.running if not s.in_prefill), key=lambda s: s.slot)
        budget -= len(decoding)
        chunks: list[tuple[Sequence, int, int]] = []
        for s in (s for s in self.running if s.in_prefill):
            if budget <= 0:
                break
            n = min(len(s.prompt_ids) - s.num_computed, budget)
            chunks.append((s, s.num_computed, n))
            budget -= n
        while self.waiting and self.slots.num_free and budget > 0:
            s = self.waiting.popleft()
            s.slot, s.status = self.slots.allocate(), SequenceStatus.RUNNING
            self.running.append(s)
            n = min(len(s.prompt_ids), budget)
            chunks.append((s, 0, n))
            budget -= n
        if not decoding and not chunks:
            return None
        return self._plan(decoding, chunks)

    def _plan(self, decoding: list[Sequence], chunks: list[tuple[Sequence, int, int]]) -> ScheduledStep:
        ids = [s.output_ids[-1] for s in decoding]
        pos = [s.length - 1 for s in decoding]
        slots = [s.slot for s in decoding]
        sample_rows = list(range(len(decoding)))
        sampled = list(decoding)
        computed = [(s, 1) for s in decoding]
        prefill, prompt_rows, scored, prompt_only = [], [], [], []
        for s, start, n in chunks:
            row = len(ids)
            ids += s.prompt_ids[start:start + n]
            pos += range(start, start + n)
            slots += [s.slot] * n
            prefill.append(PrefillChunk(row=row, slot=s.slot, start=start, length=n))
            computed.append((s, n))
            done = start + n == len(s.prompt_ids)
            if s.params.prompt_logprobs is not None:
                # The logits at position p score prompt token p + 1; the last position's
                # logits predict the first generated token and are sampled instead.
                count = n - 1 if done else n
                prompt_rows += range(row, row + count)
                scored.append((s, start + 1, count))
            if done and s.params.max_tokens == 0:
                prompt_only.append(s)
            elif done:
                sample_rows.append(row + n - 1)
                sampled.append(s)
        plan = StepPlan(token_ids=torch.tensor(ids, dtype=torch.long), positions=torch.tensor(pos, dtype=torch.long),
                        slots=torch.tensor(slots, dtype=torch.long), num_decode=len(decoding), prefill=prefill,
                        sample_rows=torch.tensor(sample_rows + prompt_rows, dtype=torch.long))
        return ScheduledStep(plan, sampled, computed, scored, prompt_only)

    def record_computed(self, step: ScheduledStep) -> None:
        for s, n in step.computed:
            s.num_computed += n
            self.slots.used_tokens[s.slot] = s.num_computed
