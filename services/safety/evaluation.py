"""Quality figures for a labelled set: precision, recall, F1, FPR, recall at 1% FPR, and
recall per category. Pure logic, shared by the training script (the data card's figures)
and `llmos safety eval` (figures from the running service), so both count the same way.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Scored:
    unsafe: bool  # the label
    flagged: bool  # the verdict: blocked or flagged
    score: float  # the verdict's highest category score
    category: str = ""  # the label's category, for unsafe examples


@dataclasses.dataclass(frozen=True)
class Report:
    examples: int
    unsafe: int
    safe: int
    precision: float
    recall: float
    f1: float
    fpr: float
    recall_at_1pct_fpr: float
    threshold_at_1pct_fpr: float
    recall_by_category: dict[str, float]
    count_by_category: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def recall_at_fpr(rows: Sequence[Scored], max_fpr: float) -> tuple[float, float]:
    """The best recall with a score threshold whose false-positive rate is at most
    `max_fpr`, and that threshold (scores strictly above it count as positive)."""
    safe = sorted((r.score for r in rows if not r.unsafe), reverse=True)
    unsafe = [r.score for r in rows if r.unsafe]
    if not unsafe:
        return 0.0, 1.0
    allowed = int(max_fpr * len(safe))  # false positives we may keep
    threshold = safe[allowed] if allowed < len(safe) else -1.0
    return _ratio(sum(1 for s in unsafe if s > threshold), len(unsafe)), threshold


def report(rows: Sequence[Scored]) -> Report:
    tp = sum(1 for r in rows if r.unsafe and r.flagged)
    fp = sum(1 for r in rows if not r.unsafe and r.flagged)
    fn = sum(1 for r in rows if r.unsafe and not r.flagged)
    safe = sum(1 for r in rows if not r.unsafe)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(int(2 * precision * recall * 1e9), int((precision + recall) * 1e9))
    hits: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.unsafe:
            key = r.category or "unlabelled"
            counts[key] += 1
            hits[key] += r.flagged
    at_1pct, threshold = recall_at_fpr(rows, 0.01)
    return Report(
        examples=len(rows),
        unsafe=tp + fn,
        safe=safe,
        precision=precision,
        recall=recall,
        f1=f1,
        fpr=_ratio(fp, safe),
        recall_at_1pct_fpr=at_1pct,
        threshold_at_1pct_fpr=threshold,
        recall_by_category={k: _ratio(hits[k], counts[k]) for k in sorted(counts)},
        count_by_category=dict(sorted(counts.items())),
    )
