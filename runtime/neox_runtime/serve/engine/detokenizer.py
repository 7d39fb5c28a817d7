"""Incremental detokenization and stop strings, so streams never emit text they must retract.

Text is decoded over a short sliding window of ids (vLLM's prefix/read offsets), so the
cost per token is constant. A delta is held back while it ends in an incomplete UTF-8
character or while its tail could still become a stop string; when a stop string
appears, the text is cut before it and the sequence finishes with reason "stop". Before a
request's `min_tokens` are out (`check_stops=False`) stop strings are neither held back
nor searched for, and text sent then is never searched later (as vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer


@dataclass
class DetokState:
    stop: tuple[str, ...]
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all decoded text so far (including held-back tail)
    emitted: int = 0  # characters of `text` already sent
    stopped: bool = False
    stop_from: int = 0  # stop strings are searched for from here on (text before it was sent under min_tokens)
    ids: list[int] = field(default_factory=list)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, st: DetokState, token_id: int, final: bool, check_stops: bool = True) -> str:
        """Append one token; return the text that may now be sent (sets st.stopped on a stop string)."""
        st.ids.append(token_id)
        prefix = self._decode(st.ids[st.prefix_offset:st.read_offset])
        full = self._decode(st.ids[st.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            st.text += full[len(prefix):]
            st.prefix_offset, st.read_offset = st.read_offset, len(st.ids)
        elif final and len(full) > len(prefix):
            st.text += full[len(prefix):]
        stops = st.stop if check_stops else ()
        if not check_stops:
            st.stop_from = len(st.text)
        if stops:
            start = max(st.stop_from, st.emitted - max(len(s) for s in stops))
            hits = [i for i in (st.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                st.text = st.text[:min(hits)]
                st.stopped = True
                final = True
        limit = len(st.text) if final else len(st.text) - _held_back(st.text[st.stop_from:], stops)
        delta = st.text[st.emitted:limit] if limit > st.emitted else ""
        st.emitted += len(delta)
        return delta
