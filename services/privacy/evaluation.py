"""Scoring a detector against labelled messages (pure): span precision, recall and F2 per
entity type, and the leak rate of a redaction.

A predicted span matches a labelled one when the types agree and they overlap by at least
half of their union (IoU >= 0.5), one to one: a name found as "Zoë" for "Zoë Martin" does
not count, "Zoë Martin" for "Zoë Martin," does. F2 weighs recall twice as much as precision:
for PII, a miss leaks and a false alarm only hides a word. Predictions of types the set does
not label (presidio's DATE_TIME, URL, ...) are left out of both engines' scores.

The leak rate is the share of labelled values still present, verbatim, in the redacted text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmos.services.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class Span:
    type: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Labelled:
    text: str
    entities: tuple[Span, ...]


@dataclasses.dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def f(self, beta: float = 2.0) -> float:
        p, r = self.precision, self.recall
        return (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f2": round(self.f(), 4),
            "support": self.tp + self.fn,
        }


def load(path: Path) -> list[Labelled]:
    """A JSONL file of {"text", "entities": [{"type", "start", "end"}]}; errors name the line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = str(row["text"])
            spans = tuple(
                Span(str(e["type"]), int(e["start"]), int(e["end"])) for e in row["entities"]
            )
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidArgument(
                f"{path}:{number}: not {{'text': ..., 'entities': [{{'type', 'start', "
                f"'end'}}]}}: {error}",
                reason="BAD_EVAL_FILE",
            ) from error
        if any(not 0 <= s.start < s.end <= len(text) for s in spans):
            raise InvalidArgument(
                f"{path}:{number}: a span lies outside the text", reason="BAD_EVAL_FILE"
            )
        rows.append(Labelled(text, spans))
    return rows


def _iou(a: Span, b: Span) -> float:
    overlap = min(a.end, b.end) - max(a.start, b.start)
    if overlap <= 0:
        return 0.0
    return overlap / (max(a.end, b.end) - min(a.start, b.start))


def score(gold: Sequence[Labelled], predicted: Sequence[Iterable[Span]]) -> dict[str, Counts]:
    """Counts per labelled type (and "ALL"), matching spans one to one by IoU >= 0.5."""
    types = {span.type for row in gold for span in row.entities}
    counts = {kind: Counts() for kind in sorted(types)}
    for row, spans in zip(gold, predicted, strict=True):
        found = [span for span in spans if span.type in types]
        unmatched = list(found)
        for truth in row.entities:
            best = max(
                (p for p in unmatched if p.type == truth.type),
                key=lambda p: _iou(p, truth),
                default=None,
            )
            if best is not None and _iou(best, truth) >= 0.5:
                counts[truth.type].tp += 1
                unmatched.remove(best)
            else:
                counts[truth.type].fn += 1
        for extra in unmatched:
            counts[extra.type].fp += 1
    total = Counts()
    for kind in counts.values():
        total.tp, total.fp, total.fn = total.tp + kind.tp, total.fp + kind.fp, total.fn + kind.fn
    counts["ALL"] = total
    return counts


def leaks(gold: Sequence[Labelled], redacted: Sequence[str]) -> tuple[int, int]:
    """(labelled values still present verbatim after redaction, labelled values)."""
    leaked = total = 0
    for row, text in zip(gold, redacted, strict=True):
        for span in row.entities:
            total += 1
            leaked += row.text[span.start : span.end] in text
    return leaked, total


def report(counts: dict[str, Counts]) -> dict[str, Any]:
    return {kind: value.as_dict() for kind, value in counts.items()}
