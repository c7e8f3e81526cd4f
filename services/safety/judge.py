"""The verdict: rules and the classifier read a text, the tenant's policy decides.

1. The text's views (normalise.py) go through the built-in markers and deny rules and the
   tenant's deny and allow phrases (rules.py).
2. The classifier scores the plain view - and the leet and decoded views when there are
   any, so a disguised request is scored as what it says - in windows sized in tokens:
   each view is tokenized once with the model's own tokenizer and cut, between words,
   into windows of at most `WINDOW_TOKENS` (the model's 256 with [CLS] and [SEP]),
   overlapping by `OVERLAP_TOKENS`. A text of up to 254 tokens is one encoder pass, and
   no window is truncated, so a long text is read whole, window by window, at most
   `MAX_WINDOWS` a check (the plain view of the longest accepted prose text fits). A
   window whose tokens another window already has (a leet view that differs from the plain
   one only elsewhere, a repeated passage) is not encoded again. A category's model score
   is its highest over views and windows: the worst window wins, and its span in the
   original text (through the tokens' character offsets) is the evidence.
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
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llmos.services.errors import InvalidArgument
from llmos.services.safety.encoder import MAX_TOKENS, Tokens
from llmos.services.safety.head import Array, Head
from llmos.services.safety.normalise import View, views
from llmos.services.safety.policy import Policy
from llmos.services.safety.rules import DENY, MARKERS, SMALL_TALK, scan
from llmos.services.safety.taxonomy import CATEGORIES
from llmos.v1 import safety_pb2

# Tokens a window holds, [CLS] and [SEP] included: the model's limit (encoder.MAX_TOKENS).
WINDOW_TOKENS = MAX_TOKENS
# Tokens shared by neighbouring windows: a harmful sentence or two (~300 characters of
# prose) cut by one window's end is read whole by the next.
OVERLAP_TOKENS = 64
# The classifier's budget per check, in windows of WINDOW_TOKENS - 2 - OVERLAP_TOKENS = 190
# new tokens: 400 windows read ~76,000 tokens, so the plain view of the longest text the
# service takes (checks.MAX_TEXT_CHARS, 262,144 characters) fits at 3.5 characters a token
# or more (English prose is ~4.5-5: the bench's numbered long text is 52,398 tokens, 276
# windows). Denser text (digits, code, scripts read a token a character), or views that add
# more windows than the budget holds, is refused with INVALID_ARGUMENT (TEXT_TOO_LONG):
# never a verdict on a text the classifier read only in part. The rules read every view
# whole whatever its length.
MAX_WINDOWS = 400
# Windows encoded per encoder call: bounds the activations a long text holds at once.
ENCODE_BATCH = 32
# Windows share a call only when their lengths differ by at most this many tokens: a call
# pads every row to its longest, and a padded token costs as much as a real one (a short
# last window padded to 254 tokens would cost a full pass).
PAD_SLACK = 16
MODEL_RULE = "model.minilm-int8"
INPUT_ONLY = frozenset({"jailbreak", "prompt_injection"})
# Categories below this score are left out of the verdict, to keep it short.
REPORT_FLOOR = 0.05


class Encodes(Protocol):
    def tokenize(self, text: str) -> Tokens: ...

    def encode_ids(self, rows: Sequence[Sequence[int]]) -> Array: ...


def too_many_windows(chars: int) -> InvalidArgument:
    new_tokens = WINDOW_TOKENS - 2 - OVERLAP_TOKENS
    return InvalidArgument(
        f"the text ({chars:,} characters) makes more than {MAX_WINDOWS} classifier windows "
        f"(about {MAX_WINDOWS * new_tokens:,} tokens over all its readings: plain, leet, "
        "decoded payloads); one check reads at most that much, and a verdict on part of a "
        "text would not be one: split it over several checks",
        reason="TEXT_TOO_LONG",
        metadata={"max_windows": str(MAX_WINDOWS)},
    )


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens `ids` of `view`, from its character `start` to `end`."""

    view: View
    start: int
    end: int
    ids: tuple[int, ...]


def windows(view: View, tokens: Tokens) -> list[Window]:
    """`view` cut into windows of at most WINDOW_TOKENS - 2 tokens (room for [CLS] and
    [SEP]), each ending and starting between words where a word allows, the next one
    starting OVERLAP_TOKENS before the previous one ended."""
    size, count, words = WINDOW_TOKENS - 2, len(tokens.ids), tokens.words

    def word_start(index: int, floor: int) -> int:
        """The first token of the word that holds token `index` when it lies after `floor`,
        else `index` (a word longer than a window is cut inside)."""
        first = index
        while first > floor and words[first] is not None and words[first - 1] == words[first]:
            first -= 1
        return first if first > floor else index

    found: list[Window] = []
    start = 0
    while start < count:
        end = min(start + size, count)
        if end < count:
            end = word_start(end, start)
        first, last = tokens.offsets[start], tokens.offsets[end - 1]
        found.append(Window(view, first[0], last[1], tokens.ids[start:end]))
        if end == count:
            break
        start = word_start(max(end - OVERLAP_TOKENS, start + 1), start)
    return found


def batches(chunks: list[Window]) -> list[list[int]]:
    """Indices of `chunks` grouped into encoder calls: by length, at most ENCODE_BATCH
    windows a call, lengths within PAD_SLACK tokens of each other."""
    groups: list[list[int]] = []
    for i in sorted(range(len(chunks)), key=lambda i: len(chunks[i].ids)):
        shortest = len(chunks[groups[-1][0]].ids) if groups else 0
        if groups and len(groups[-1]) < ENCODE_BATCH and len(chunks[i].ids) - shortest <= PAD_SLACK:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


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

    def _windows(self, seen: list[View]) -> list[Window]:
        """Every view's windows (more than MAX_WINDOWS: TEXT_TOO_LONG), each distinct token
        sequence once, and a later view's window only where its text differs from the plain
        view's at the same place (a leet view's windows away from its leetspeak are the
        plain text again, already read)."""
        chunks: dict[tuple[int, ...], Window] = {}
        plain = seen[0].text
        for view in seen:
            for window in windows(view, self.encoder.tokenize(view.text)):
                text = view.text[window.start : window.end]
                if view is not seen[0] and text == plain[window.start : window.end]:
                    continue
                chunks.setdefault(window.ids, window)
                if len(chunks) > MAX_WINDOWS:
                    raise too_many_windows(len(seen[0].text))
        return list(chunks.values())

    def _model(
        self, seen: list[View], evidence: list[safety_pb2.SafetyEvidence], direction: str
    ) -> dict[str, float]:
        """Each category's highest model score; the highest-scoring window's evidence."""
        chunks = self._windows(seen)
        if not chunks:
            return {}
        rows: list[dict[str, float]] = [{} for _ in chunks]
        for batch in batches(chunks):
            vectors = self.encoder.encode_ids([chunks[i].ids for i in batch])
            for i, row in zip(batch, self.head.scores(vectors, direction), strict=True):
                rows[i] = row
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
