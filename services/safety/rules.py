"""Rules: deny and allow lists and prompt-injection / jailbreak markers, read on every view.

A rule is a regular expression over a normalised view (normalise.py), so one pattern
catches its full-width, Cyrillic, zero-width, leetspeak, base64 and rot13 disguises. Each
match is evidence: the rule id, the span in the original text, the category and a score.

- Built-in markers (`MARKERS`) are phrases whose only use is to override a model's
  instructions: they score 0.999 (rule scores are not calibrated, head.py), above the
  default policy's threshold of 0.5 so they block by default, and below the deny rules'
  1.0; a tenant can lower their action to flag with its own
  prompt_injection / jailbreak rules.
- Built-in deny rules (`DENY`) are narrow: requests no benign text makes. Score 1.0.
- A tenant's deny list adds phrases (category given per entry, score 1.0).
- A tenant's allow list names phrases whose presence lets a text through whatever the
  classifier says: the classifier's score is then reported but not acted on. A deny rule
  or marker still wins over an allow entry: allowing "kill a process" must not let
  "ignore previous instructions" through.

Pure logic.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from llmos.services.safety.normalise import View

MARKER_SCORE = 0.999
DENY_SCORE = 1.0


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    category: str
    pattern: re.Pattern[str]
    score: float


@dataclasses.dataclass(frozen=True)
class Match:
    rule_id: str
    category: str
    start: int
    end: int
    score: float
    view: str


def _rule(rule_id: str, category: str, pattern: str, score: float) -> Rule:
    return Rule(rule_id, category, re.compile(pattern), score)


MARKERS: tuple[Rule, ...] = (
    _rule(
        "injection.ignore_instructions",
        "prompt_injection",
        r"\b(ignore|disregard|forget|override)\b.{0,30}\b(all |any )?(the )?(previous|prior|above|earlier|preceding|your|system)\b.{0,20}\b(instructions?|prompts?|rules|directions|guidelines)\b",
        MARKER_SCORE,
    ),
    _rule(
        "injection.reveal_system_prompt",
        "prompt_injection",
        r"\b(reveal|print|repeat|show|output|leak|tell me)\b.{0,30}\b(your|the)\b.{0,15}\b(system prompt|initial instructions|hidden instructions|original instructions)\b",
        MARKER_SCORE,
    ),
    _rule(
        "injection.role_tokens",
        "prompt_injection",
        r"(<\|im_start\|>\s*system|<\|system\|>|\[/?inst\]|<<sys>>|^\s*#+\s*system\s*:|\bnew instructions\s*:)",
        MARKER_SCORE,
    ),
    _rule(
        "jailbreak.persona",
        "jailbreak",
        r"\b(do anything now|you are (now )?dan\b|developer mode (enabled|output)|jailbr(oken|eak) mode|\bdan mode\b|stay in character)",
        MARKER_SCORE,
    ),
    _rule(
        "jailbreak.no_restrictions",
        "jailbreak",
        r"\b(without|no|free of|free from|ignore (all )?(your )?)\b.{0,12}\b(any )?(ethical|moral|content|safety) (guidelines|restrictions|filters|policies|constraints|limitations)\b",
        MARKER_SCORE,
    ),
)

DENY: tuple[Rule, ...] = (
    _rule(
        "deny.csam",
        "S4",
        r"\b(child|children|minor|minors|underage|kid|kids|preteen)\b.{0,40}\b(porn|pornographic|sexual|sexually|nude|naked|erotic)\b|\b(porn|pornographic|sexual|sexually explicit|nude|naked|erotic)\b.{0,40}\b(child|children|minor|minors|underage|preteen)\b",
        DENY_SCORE,
    ),
    _rule(
        "deny.chemical_weapon_synthesis",
        "S9",
        r"\b(synthesi[sz]e|make|produce|manufacture|cook|brew)\b.{0,40}\b(sarin|tabun|soman|vx nerve|nerve agent|ricin|mustard gas|anthrax spores|weaponi[sz]ed anthrax)\b",
        DENY_SCORE,
    ),
)


# Small talk: a whole text made only of greeting, thanks and acknowledgement words ("Hi",
# "yes", "Hi there, how are you?"). The classifier, trained mostly on requests, read such
# short texts as fragments of harmful ones (NeMo Guardrails users report "Hi" and "yes"
# blocked, #552 #1299; "Hi there, how are you?" scored 0.993 as jailbreak here). An allow
# rule, like a tenant's allow phrase: the model's scores are reported, not acted on; any
# marker or deny rule still wins. At most 10 words from a closed list: no request can be
# phrased in it. Measured in docs/safety.md.
SMALL_TALK_WORDS = (
    "hi|hello|hey|heya|hiya|yo|howdy|greetings|good|morning|afternoon|evening|night|day|"
    "there|everyone|all|again|thanks|thank|you|very|much|so|cheers|ok|okay|k|sure|yes|yeah|"
    "yep|yup|no|nope|nah|cool|great|nice|perfect|awesome|fine|well|bye|goodbye|see|later|"
    "tomorrow|soon|please|lol|haha|hmm|how|are|is|it|going|what's|whats|up|doing|today|"
    "hope|you're|youre|i'm|im|am|too|to|meet|sorry|never|mind|exactly|got|sounds|and|"
    "welcome|have|a|pleasant|weekend|take|care|oh|ah|wow|right|true|indeed|agreed|of|course"
)
SMALL_TALK: Rule = _rule(
    "allow.small_talk",
    "",
    rf"^\W*(?:(?:{SMALL_TALK_WORDS})\b\W*){{1,10}}$",
    0.0,
)


def phrase_rule(rule_id: str, category: str, phrase: str, score: float = DENY_SCORE) -> Rule:
    """A tenant list entry: the phrase, normalised as texts are, matched as whole words."""
    from llmos.services.safety.normalise import plain

    words = plain(phrase).text.split()
    return _rule(rule_id, category, r"\b" + r"\s+".join(map(re.escape, words)) + r"\b", score)


def scan(views: Iterable[View], rules: Iterable[Rule]) -> list[Match]:
    """Every rule's first match on every view, spans mapped to the original; one match per
    rule (the first view that shows it: plain before leet before decoded)."""
    found: dict[str, Match] = {}
    rules = tuple(rules)
    for view in views:
        for rule in rules:
            if rule.id in found:
                continue
            hit = rule.pattern.search(view.text)
            if hit is None:
                continue
            start, end = view.span(hit.start(), hit.end())
            found[rule.id] = Match(rule.id, rule.category, start, end, rule.score, view.kind)
    return list(found.values())
