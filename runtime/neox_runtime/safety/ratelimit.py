"""Per-key request and token quotas as token buckets; a refusal says when to retry.

A request is charged one request and prompt + max_tokens * n tokens up front (what it
may consume), and unused tokens are refunded when it finishes, so a burst of long
requests cannot overrun the token quota mid-flight.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    per_minute: float
    level: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.per_minute

    def _refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 = now); inf if it never fits."""
        self._refill(now)
        if amount > self.per_minute:
            return math.inf
        return max(0.0, (amount - self.level) * 60.0 / self.per_minute)

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.per_minute, self.level + amount)


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def acquire(self, key_id: str, tokens: int) -> None:
        """Charge a request and its token reservation, or raise RateLimited with Retry-After."""
        now = time.monotonic()
        req = self._requests.setdefault(key_id, TokenBucket(self.rpm)) if self.rpm else None
        tok = self._tokens.setdefault(key_id, TokenBucket(self.tpm)) if self.tpm else None
        if req is not None and (wait := req.wait_for(1, now)) > 0:
            raise RateLimited(f"Rate limit reached: {self.rpm:g} requests per minute", wait)
        if tok is not None:
            wait = tok.wait_for(tokens, now)
            if math.isinf(wait):
                raise RateLimited(f"Request needs {tokens} tokens; the quota is {self.tpm:g} per minute", 60.0)
            if wait > 0:
                raise RateLimited(f"Rate limit reached: {self.tpm:g} tokens per minute", wait)
        if req is not None:
            req.take(1)
        if tok is not None:
            tok.take(tokens)

    def refund(self, key_id: str, tokens: int) -> None:
        if self.tpm and tokens > 0 and key_id in self._tokens:
            self._tokens[key_id].give(tokens)
