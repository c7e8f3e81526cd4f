"""Turning a growing list of token ids into text deltas, and cutting the text at stop strings.

Two problems of streaming that batch decoding hides: a token may end in the middle of a
multi-byte character (decode shows U+FFFD until the next token completes it), and a stop
string may arrive split across tokens. `TextAssembler` holds text back in both cases, so
what it releases is final and never contains (part of) a stop string.

Decoding is incremental, as vLLM's and TGI's detokenizers are: each new token is decoded
with a few tokens of context before it (a SentencePiece tokenizer drops a word's leading
space at the start of a decode, so the context's text is decoded too and cut off), not the
whole sequence again. Decoding everything at every token cost O(n) per token, about 1 ms
per push at 2,000 tokens with SmolLM2's tokenizer, on the engine's decoding thread.
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
        # The text of ids[:_read] is settled in _settled; ids[_context:_read] is the
        # context the next tokens are decoded with, and _context_text its own decoding.
        self._settled = ""
        self._context = 0
        self._read = 0
        self._context_text = ""
        self._full = ""  # decode(ids), kept up to date by push

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._full[: self._released]

    def _holdback(self, text: str) -> int:
        """How many trailing characters could still become the start of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    longest = max(longest, size)
                    break
        return longest

    def _decode_incrementally(self) -> str:
        """decode(ids) from the settled text and a decode of the last few tokens only."""
        window = self._decode(self._ids[self._context :])
        if not window.startswith(self._context_text):  # context decoded differently alone:
            self._settled, self._context, self._read = "", 0, 0  # start over from the top
            self._context_text = ""
            window = self._decode(self._ids)
        full = self._settled + window[len(self._context_text) :]
        if not window.endswith(REPLACEMENT):  # the new text is whole characters: settle it
            self._settled = full
            self._context, self._read = self._read, len(self._ids)
            self._context_text = self._decode(self._ids[self._context : self._read])
        return full

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (possibly empty)."""
        self._ids.append(token_id)
        text = self._full = self._decode_incrementally()
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
        delta = self._full[self._released :]
        self._released = len(self._full)
        return delta
