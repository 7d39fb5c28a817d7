"""Moderation hooks before and after generation, including over a token stream.

A hook sees text and returns a `Verdict`: allow, refuse (the request is refused, or the
generation stops with finish_reason "content_filter"), or redact (matches replaced).
Hooks are pluggable (`ModerationHook` protocol, any callable object); the default is a
case-insensitive word blocklist. `StreamFilter` lets a hook judge a stream: it holds
back the last `hook.lookback` characters, so a term split across tokens is still
caught before any of it is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

Action = Literal["allow", "refuse", "redact"]


@dataclass
class Verdict:
    action: Action
    text: str
    reasons: list[str] = field(default_factory=list)


class ModerationHook(Protocol):
    lookback: int  # characters a stream must hold back for this hook to judge safely

    def check_input(self, text: str) -> Verdict: ...

    def check_output(self, text: str, final: bool) -> Verdict: ...


class BlocklistHook:
    """Refuse or redact whole-word, case-insensitive matches of blocked terms."""

    def __init__(self, terms: list[str] | tuple[str, ...], action: Literal["refuse", "redact"] = "refuse",
                 replacement: str = "[redacted]"):
        if action not in ("refuse", "redact"):
            raise ValueError("blocklist action must be refuse or redact")
        terms = [t.strip() for t in terms if t.strip()]
        self.action, self.replacement = action, replacement
        self.pattern = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE) \
            if terms else None
        self.lookback = max((len(t) for t in terms), default=0) + 1

    def _judge(self, text: str, final: bool) -> Verdict:
        if self.pattern is None:
            return Verdict("allow", text)
        # A match touching the end of a partial stream may still grow into a longer word.
        hits = [m for m in self.pattern.finditer(text) if final or m.end() < len(text)]
        if not hits:
            return Verdict("allow", text)
        reasons = sorted({m.group(0).lower() for m in hits})
        if self.action == "refuse":
            return Verdict("refuse", text, reasons)
        out, last = [], 0
        for m in hits:
            out += [text[last:m.start()], self.replacement]
            last = m.end()
        return Verdict("redact", "".join(out) + text[last:], reasons)

    def check_input(self, text: str) -> Verdict:
        return self._judge(text, final=True)

    def check_output(self, text: str, final: bool) -> Verdict:
        return self._judge(text, final)


class StreamFilter:
    """Feed deltas, get safe text back; `refused` set once a hook refuses."""

    def __init__(self, hooks: list[ModerationHook]):
        self.hooks = hooks
        self.hold = max((h.lookback for h in hooks), default=0)
        self.pending = ""
        self.refused = False
        self.reasons: list[str] = []

    def feed(self, delta: str, final: bool = False) -> str:
        if not self.hooks:
            return delta
        if self.refused:
            return ""
        self.pending += delta
        for hook in self.hooks:
            v = hook.check_output(self.pending, final)
            if v.action == "refuse":
                self.refused, self.reasons = True, self.reasons + v.reasons
                self.pending = ""
                return ""
            if v.action == "redact":
                self.reasons += v.reasons
                self.pending = v.text
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def moderate_input(hooks: list[ModerationHook], text: str) -> Verdict:
    """Run every hook over a prompt; the first refusal wins, redactions compose."""
    reasons: list[str] = []
    action: Action = "allow"
    for hook in hooks:
        v = hook.check_input(text)
        if v.action == "refuse":
            return Verdict("refuse", text, reasons + v.reasons)
        if v.action == "redact":
            text, action, reasons = v.text, "redact", reasons + v.reasons
    return Verdict(action, text, reasons)
