"""Turning a growing list of token ids into text deltas, and cutting the text at stop strings.

Two problems of streaming that batch decoding hides: a token may end in the middle of a
multi-byte character (decode shows U+FFFD until the next token completes it), and a stop
string may arrive split across tokens. `TextAssembler` holds text back in both cases, so
what it releases is final and never contains (part of) a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class TextAssembler:
    """Accumulates generated token ids and releases text that can no longer change."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._released = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._decode(self._ids)[: self._released] if self._ids else ""

    def _holdback(self, text: str) -> int:
        """How many trailing characters could still become the start of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    longest = max(longest, size)
                    break
        return longest

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (possibly empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        hits = [
            at
            for stop in self._stop
            if (at := text.find(stop, max(0, self._released - len(stop) + 1))) != -1
        ]
        if hits:  # the earliest stop string wins, whichever is listed first
            at = min(hits)
            self.stopped = True
            delta = text[self._released : at]
            self._released = at
            return delta
        end = len(text)
        while end > self._released and text[end - 1] == REPLACEMENT:
            end -= 1
        end -= self._holdback(text[self._released : end])
        end = max(end, self._released)
        delta = text[self._released : end]
        self._released = end
        return delta

    def flush(self) -> str:
        """At the end of generation: release what was held back for a stop string."""
        if self.stopped or not self._ids:
            return ""
        text = self._decode(self._ids)
        delta = text[self._released :]
        self._released = len(text)
        return delta
