"""Normalisation: the views of a text that rules and the classifier read, each mapped back
to the original characters so evidence points at what the client sent.

Obfuscation defeats a filter that reads the raw string: "ｂｏｍｂ" (full-width), "bоmb"
(Cyrillic о), "b\u200bomb" (zero-width space), "b0mb" (leetspeak), or the request wrapped
in base64 or rot13. So a text is read through several views:

- `plain`: NFKC, zero-width and other format characters dropped, combining marks dropped,
  confusable letters folded to Latin, lower case;
- `leet`: `plain` with digits and symbols inside words read as letters (only in words that
  also hold letters, so "2024" and "3.14" stay numbers);
- `base64`: each run of 16+ base64 characters that decodes to printable UTF-8 text;
- `rot13`: the text rot13-decoded, only when that reads more like English than the text.

Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import re
import unicodedata

# Format characters that render as nothing; category Cf catches the rest.
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u200e\u200f")

# Letters from other scripts that look like Latin ones (Unicode's confusables.txt, the
# Cyrillic and Greek lower- and upper-case letters attackers actually use).
CONFUSABLES = {
    **dict(zip("аеорсухіјѕԁɡһӏԛԝԜ", "aeopcyxijsdghlqww", strict=True)),
    **dict(zip("АВЕКМНОРСТХІЈЅ", "abekmhopctxijs", strict=True)),
    **dict(zip("αβεικνορτυχ", "abeiknoptux", strict=True)),
    **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "abezhikmnoptyx", strict=True)),
}

LEET = {
    "0": "o",
    "1": "i",
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "@": "a",
    "$": "s",
    "!": "i",
    "|": "l",
}
_LEET_WORD = re.compile(r"[a-z0-9@$!|]+")
_NO_LETTER = re.compile(r"[0-9@$!|]+")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_WORD = re.compile(r"[a-z]+")
# Frequent English words: rot13 is decoded only when it makes more of them appear.
COMMON_WORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "to",
        "of",
        "in",
        "on",
        "for",
        "with",
        "how",
        "what",
        "why",
        "who",
        "is",
        "are",
        "be",
        "can",
        "you",
        "i",
        "me",
        "my",
        "it",
        "this",
        "that",
        "do",
        "does",
        "make",
        "give",
        "tell",
        "write",
        "explain",
        "step",
        "steps",
        "instructions",
        "from",
        "at",
        "by",
        "not",
        "your",
    ]
)


@dataclasses.dataclass(frozen=True)
class View:
    """A rendering of the text; `starts[i]`..`ends[i]` is where its character i came from."""

    kind: str
    text: str
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span behind this view's [start, end)."""
        if not self.text or end <= start:
            return (0, 0)
        return (self.starts[start], self.ends[min(end, len(self.text)) - 1])


def plain(text: str, offset: int = 0, width: int | None = None) -> View:
    """The `plain` view. `offset` and `width` map every character to one original span
    (used for decoded payloads, whose characters all come from the encoded run).

    ASCII text has no format characters, combining marks or confusables, and NFKC leaves
    it as it is, so its view is its lower case, character for character: the common case
    costs one `str.lower` instead of a loop over every character."""
    if text.isascii():
        if width is None:
            at = range(offset, offset + len(text))
            return View("plain", text.lower(), tuple(at), tuple(i + 1 for i in at))
        return View("plain", text.lower(), (offset,) * len(text), (offset + width,) * len(text))
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for index, char in enumerate(text):
        if char in ZERO_WIDTH or unicodedata.category(char) == "Cf":
            continue
        for folded in unicodedata.normalize("NFKC", char):
            for part in unicodedata.normalize("NFKD", folded):
                if unicodedata.category(part) == "Mn":  # combining marks: "bómb" is "bomb"
                    continue
                for out in CONFUSABLES.get(part, part).lower():
                    chars.append(out)
                    if width is None:
                        starts.append(offset + index)
                        ends.append(offset + index + 1)
                    else:
                        starts.append(offset)
                        ends.append(offset + width)
    return View("plain", "".join(chars), tuple(starts), tuple(ends))


def leet(view: View) -> View | None:
    """`view` with leetspeak read as letters; None when no word holds any."""
    out = list(view.text)
    changed = False
    for match in _LEET_WORD.finditer(view.text):
        word = match.group()
        if word.isalpha() or _NO_LETTER.fullmatch(word):  # only letters, or no letter
            continue
        for i, char in enumerate(word):
            if char in LEET:
                out[match.start() + i] = LEET[char]
                changed = True
    if not changed:
        return None
    return View("leet", "".join(out), view.starts, view.ends)


def _english(text: str) -> int:
    return sum(1 for word in _WORD.findall(text.lower()) if word in COMMON_WORDS)


def decoded(text: str) -> list[View]:
    """Views of base64 payloads and of a rot13 reading, when there are any."""
    views: list[View] = []
    for match in _BASE64.finditer(text):
        run = match.group()
        try:
            raw = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
            payload = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        printable = sum(1 for c in payload if c.isprintable() or c.isspace())
        if len(payload) < 4 or printable < 0.9 * len(payload) or _english(payload) == 0:
            continue
        view = plain(payload, offset=match.start(), width=len(run))
        views.append(dataclasses.replace(view, kind="base64"))
    rot = codecs.decode(text, "rot13")
    if _english(rot) >= 2 and _english(rot) > 2 * _english(text):
        views.append(dataclasses.replace(plain(rot), kind="rot13"))
    return views


def views(text: str) -> list[View]:
    """Every view of `text`: plain first, then leet, then decoded payloads."""
    first = plain(text)
    found = [first]
    leeted = leet(first)
    if leeted is not None:
        found.append(leeted)
    found.extend(decoded(text))
    return found
