"""Batched sampling: penalties, logit bias, watermark, min_tokens, temperature, min-p, top-k, top-p, greedy, logprobs.

All rows are processed with whole-batch tensor ops; the only per-row Python work is one
uniform draw from the sequence's own generator, which makes a seeded sequence
reproducible regardless of its batch (inverse-CDF sampling on that uniform).
Reported logprobs are the model's raw distribution (before penalties, logit bias and
watermark), as vLLM reports them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from neox_runtime.serve.engine.sequence import Sequence, TokenLogprob


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor: ...


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; HF repetition penalty on all tokens."""
    M, V = logits.shape
    dev = logits.device
    presence = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)[:, None]
    repetition = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev)[:, None]
    counts = torch.zeros(M, V, device=dev)
    seen = torch.zeros(M, V, dtype=torch.bool, device=dev)
    for r, s in enumerate(seqs):
        if s.output_ids:
            counts[r].index_add_(0, torch.tensor(s.output_ids, device=dev), torch.ones(len(s.output_ids), device=dev))
        seen[r, torch.tensor(s.all_ids, device=dev)] = True
    logits = logits - presence * (counts > 0) - frequency * counts
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    return torch.where(seen, penalized, logits)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI logit_bias: add each row's bias to the named tokens' logits (-100 bans, +100 forces)."""
    rows, cols, vals = [], [], []
    for r, s in enumerate(seqs):
        for token_id, bias in s.params.logit_bias:
            rows.append(r)
            cols.append(token_id)
            vals.append(bias)
    logits = logits.clone()
    dev = logits.device
    logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                      torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return logits


def suppress_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_id: int | None) -> torch.Tensor:
    """min_tokens (vLLM): a row with fewer outputs than that cannot pick EOS (unless ignored) or a stop token id."""
    rows, cols = [], []
    for r, s in enumerate(seqs):
        p = s.params
        if len(s.output_ids) < p.min_tokens:
            ids = p.stop_token_ids + ((eos_token_id,) if eos_token_id is not None and not p.ignore_eos else ())
            rows += [r] * len(ids)
            cols += ids
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return logits


def apply_min_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """min_p (vLLM): drop tokens less likely than min_p times the row's most likely token (after temperature)."""
    min_p = torch.tensor([s.params.min_p for s in seqs], device=logits.device)[:, None]  # (M, 1)
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row argmax; numpy's vectorised kernel is several times faster than torch's on CPU."""
    if logits.device.type == "cpu":
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.argmax(dim=-1)


def _uniforms(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(device)


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    dev = logits.device
    temps = torch.tensor([s.params.temperature for s in seqs], device=dev)[:, None]
    logits = logits / temps
    if any(s.params.min_p > 0 for s in seqs):
        logits = apply_min_p(logits, seqs)
    u = _uniforms(seqs, dev)
    if all(s.params.top_k <= 0 and s.params.top_p >= 1.0 for s in seqs):
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)  # (M, V)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=logits.shape[1] - 1)
        return idx[:, 0]
    V = logits.shape[1]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else V for s in seqs], device=dev)[:, None]
    top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)[:, None]
    values, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=dev)[None, :]
    values = values.masked_fill(ranks >= top_k, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    probs = probs.masked_fill((before >= top_p) & (ranks > 0), 0.0)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=V - 1)
    return order.gather(1, idx)[:, 0]


class Sampler:
    def __init__(self, processors: list[LogitsProcessor] | None = None):
        self.processors = processors or []

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 eos_token_id: int | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (M, V) float32 aligned with `seqs` -> next token ids and logprob records."""
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if any(s.params.has_penalties for s in seqs):
            logits = apply_penalties(logits, seqs)
        if any(s.params.logit_bias for s in seqs):
            logits = apply_logit_bias(logits, seqs)
        for proc in self.processors:
            logits = proc(logits, seqs)
        if any(len(s.output_ids) < s.params.min_tokens for s in seqs):
            logits = suppress_stop_tokens(logits, seqs, eos_token_id)
        greedy = torch.tensor([s.params.greedy for s in seqs])
        tokens = argmax(logits)
        if not bool(greedy.all()):
            rows = (~greedy).nonzero()[:, 0]
            sampled = _sample_rows(logits[rows.to(logits.device)], [seqs[r] for r in rows.tolist()])
            tokens[rows.to(logits.device)] = sampled
        token_list = tokens.tolist()
        if raw_lp is None:
            return token_list, [None] * len(seqs)
        return token_list, token_logprobs(raw_lp, token_list, [s.params.logprobs for s in seqs])


def token_logprobs(lp: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Row r's log-probability of tokens[r] with its ks[r] best alternatives (None where ks[r] is None).

    lp: (M, V) log-softmax, M >= 0. Used for generated tokens and for scored prompt tokens alike.
    """
    if not tokens:
        return []
    k = max((x or 0) for x in ks)
    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    out: list[TokenLogprob | None] = []
    for r, (token, kk) in enumerate(zip(tokens, ks)):
        if kk is None:
            out.append(None)
            continue
        top = list(zip(top_i[r, :kk].tolist(), top_v[r, :kk].tolist())) if kk else []
        out.append(TokenLogprob(token, chosen[r], top))
    return out
