"""The verdict: rules and the classifier read a text, the tenant's policy decides.

1. The text's views (normalise.py) go through the built-in markers and deny rules and the
   tenant's deny and allow phrases (rules.py).
2. The classifier scores the plain view - and the leet and decoded views when there are
   any, so a disguised request is scored as what it says - in overlapping windows of
   `WINDOW_CHARS` (the model reads 256 tokens; a long text is read whole, window by
   window, at most `MAX_WINDOWS` a check: the plain view of the longest accepted text
   fits). A category's model score is its highest over views and windows: the worst
   window wins, and its span in the original text is the evidence.
3. A category's score is the higher of its rule and model scores. An allow phrase, when no
   deny rule or marker matched, keeps the model's scores from deciding (they are still
   reported). Jailbreak and prompt-injection categories apply to inputs only: an output
   that talks about "previous instructions" attacks nobody.
4. The policy maps each score to an action; the verdict's action is the strongest, and
   the text is allowed unless that is block. Evidence lists every rule match with its span
   in the original text, and the classifier's window with P(unsafe).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from llmos.services.safety.head import Array, Head
from llmos.services.safety.normalise import View, views
from llmos.services.safety.policy import Policy
from llmos.services.safety.rules import DENY, MARKERS, SMALL_TALK, scan
from llmos.services.safety.taxonomy import CATEGORIES
from llmos.v1 import safety_pb2

WINDOW_CHARS = 1000
WINDOW_OVERLAP = 200
# The classifier's budget per check: the plain view of the longest text the service takes
# (checks.MAX_TEXT_CHARS, 262,144 characters) is 328 windows; other views (leet, decoded
# payloads) get what is left. The rules read every view whole whatever its length.
MAX_WINDOWS = 400
# Windows encoded per encoder call: bounds the activations a long text holds at once.
ENCODE_BATCH = 32
MODEL_RULE = "model.minilm-int8"
INPUT_ONLY = frozenset({"jailbreak", "prompt_injection"})
# Categories below this score are left out of the verdict, to keep it short.
REPORT_FLOOR = 0.05


class Encodes(Protocol):
    def encode(self, texts: list[str]) -> Array: ...


@dataclasses.dataclass(frozen=True)
class Window:
    view: View
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.view.text[self.start : self.end]


def windows(view: View) -> list[Window]:
    if len(view.text) <= WINDOW_CHARS:
        return [Window(view, 0, len(view.text))]
    step = WINDOW_CHARS - WINDOW_OVERLAP
    return [
        Window(view, start, min(start + WINDOW_CHARS, len(view.text)))
        for start in range(0, max(1, len(view.text) - WINDOW_OVERLAP), step)
    ]


@dataclasses.dataclass
class Judge:
    encoder: Encodes
    head: Head

    def check(
        self, text: str, direction: safety_pb2.Direction.ValueType, policy: Policy
    ) -> safety_pb2.SafetyVerdict:
        seen = views(text)
        matches = scan(seen, (*MARKERS, *DENY, *policy.deny_rules()))
        allowed_by = scan(seen[:1], (SMALL_TALK,)) + scan(seen, policy.allow_rules())
        scores: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
        evidence: list[safety_pb2.SafetyEvidence] = []
        for match in matches:
            scores[match.category] = max(scores[match.category], match.score)
            evidence.append(
                safety_pb2.SafetyEvidence(
                    rule_id=match.rule_id,
                    start=match.start,
                    end=match.end,
                    model_score=match.score,
                    category=match.category,
                    view=match.view,
                )
            )
        model = self._model(
            seen, evidence, "output" if direction == safety_pb2.DIRECTION_OUTPUT else "input"
        )
        ignore_model = bool(allowed_by) and not matches
        for match in allowed_by:
            evidence.append(
                safety_pb2.SafetyEvidence(
                    rule_id=match.rule_id, start=match.start, end=match.end, view=match.view
                )
            )
        if not ignore_model:
            for category, score in model.items():
                scores[category] = max(scores[category], score)
        if direction == safety_pb2.DIRECTION_OUTPUT:
            for category in INPUT_ONLY:
                scores[category] = 0.0
        action = safety_pb2.SAFETY_ACTION_ALLOW
        reported: list[safety_pb2.CategoryScore] = []
        for category, score in sorted(scores.items(), key=lambda kv: -kv[1]):
            action = max(action, policy.decide(category, score))
            if score >= REPORT_FLOOR:
                reported.append(
                    safety_pb2.CategoryScore(
                        category=category,
                        score=score,
                        moderation_categories=CATEGORIES[category].moderation,
                    )
                )
        return safety_pb2.SafetyVerdict(
            allowed=action != safety_pb2.SAFETY_ACTION_BLOCK,
            action=action,
            categories=reported,
            evidence=evidence,
            policy_version=policy.version,
        )

    def _model(
        self, seen: list[View], evidence: list[safety_pb2.SafetyEvidence], direction: str
    ) -> dict[str, float]:
        """Each category's highest model score; the highest-scoring window's evidence."""
        chunks = [w for view in seen for w in windows(view) if w.text.strip()][:MAX_WINDOWS]
        if not chunks:
            return {}
        rows = [
            row
            for start in range(0, len(chunks), ENCODE_BATCH)
            for row in self.head.scores(
                self.encoder.encode([w.text for w in chunks[start : start + ENCODE_BATCH]]),
                direction,
            )
        ]
        best: dict[str, float] = {}
        for row in rows:
            for category, score in row.items():
                best[category] = max(best.get(category, 0.0), score)
        top = int(np.argmax([max(row.values()) for row in rows]))
        window, row = chunks[top], rows[top]
        category = max(row, key=lambda c: row[c])
        start, end = window.view.span(window.start, window.end)
        evidence.append(
            safety_pb2.SafetyEvidence(
                rule_id=MODEL_RULE,
                start=start,
                end=end,
                model_score=row[category],
                category=category,
                view=window.view.kind,
            )
        )
        return best
