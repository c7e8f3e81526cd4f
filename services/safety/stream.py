"""Windows of a streamed output: when to check, and what.

A stream arrives a token or two at a time; checking after every piece would cost a
classifier pass per token. So text accumulates and a window is checked once `STRIDE_CHARS`
new characters arrived (or a sentence ended after at least `MIN_NEW_CHARS`), and at the
end. The window is the last `WINDOW_CHARS` characters, so a harmful sentence that spans
two strides is read whole. 320 characters of prose are ~70 tokens, one encoder pass; the
judge cuts what it is given into windows of at most 256 tokens (judge.py), so a denser
window (up to a token a character) is read as two, never truncated. The kernel releases
text to the client only up to `checked_chars`, so no unchecked text reaches it; a block
stops the stream at most one stride after the harmful text began. Pure logic.
"""

from __future__ import annotations

import dataclasses

STRIDE_CHARS = 160
MIN_NEW_CHARS = 40
WINDOW_CHARS = 320
SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclasses.dataclass
class StreamWindows:
    text: str = ""
    checked: int = 0

    def add(self, chunk: str) -> None:
        self.text += chunk

    def due(self, final: bool = False) -> bool:
        new = len(self.text) - self.checked
        if new <= 0:
            return False
        if final or new >= STRIDE_CHARS:
            return True
        return new >= MIN_NEW_CHARS and self.text.rstrip(" ").endswith(SENTENCE_ENDS)

    def window(self) -> tuple[int, str]:
        """(offset of the window in the stream, its text); marks the stream checked."""
        start = max(0, len(self.text) - WINDOW_CHARS)
        self.checked = len(self.text)
        return start, self.text[start:]
