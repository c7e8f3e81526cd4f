"""The synthetic labelled set: chat messages from templates, PII filled in by Faker, every
entity's type and character span known.

Templates are split between a *dev* set (for tuning the recognizers) and a *test* set (for
the figures we report), so a figure never comes from a sentence shape the recognizers were
tuned on; values come from several Faker locales, so names and places are not all American.
Some templates hold no PII at all: they measure false positives. Deterministic for a seed.

    python -m llmos.services.privacy.dataset OUT_DIR [--per-template N] [--seed S]

writes OUT_DIR/privacy-dev.jsonl and OUT_DIR/privacy-test.jsonl, one message a line:
{"text": ..., "entities": [{"type": ..., "start": ..., "end": ...}], "template": N}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faker import Faker

# {TYPE} slots; a template's index decides its split (see `split_of`).
TEMPLATES = (
    "My name is {PERSON} and my email is {EMAIL_ADDRESS}.",
    "Please call {PERSON} at {PHONE_NUMBER} tomorrow morning.",
    "Can you charge my card {CREDIT_CARD} for the renewal?",
    "I moved to {LOCATION} last year and I love it.",
    "The server at {IP_ADDRESS} keeps timing out, can you check the logs?",
    "Wire the deposit to {IBAN_CODE}, account holder {PERSON}.",
    "For the background check my SSN is {US_SSN}.",
    "{PERSON} from {LOCATION} wrote to {EMAIL_ADDRESS} about the refund.",
    "Hi, this is {PERSON}. You can reach me on {PHONE_NUMBER} or {EMAIL_ADDRESS}.",
    "Write a short thank-you note to {PERSON} for hosting us in {LOCATION}.",
    "Block {IP_ADDRESS} and {IP_ADDRESS} on the firewall please.",
    "Our office in {LOCATION} needs a new printer.",
    "Send the contract to {EMAIL_ADDRESS} before Friday.",
    "Summarise this: {PERSON} met {PERSON} in {LOCATION} to discuss the merger.",
    "The payment from card {CREDIT_CARD} failed twice.",
    "Update my IBAN to {IBAN_CODE}.",
    "Social security number {US_SSN}, date of birth in the file.",
    "Ask {PERSON} whether the flight to {LOCATION} is confirmed.",
    "Text me at {PHONE_NUMBER} when you land.",
    "Login attempts from {IP_ADDRESS} look suspicious.",
    "Dear {PERSON}, your order ships from {LOCATION} today.",
    "Forward the invoice to {PERSON} ({EMAIL_ADDRESS}).",
    "We are hiring in {LOCATION} and {LOCATION}.",
    "My colleague {PERSON} lost her badge.",
    "Please draft an email to {PERSON} declining the offer politely.",
    "Reimburse {PERSON} via IBAN {IBAN_CODE} and confirm by phone at {PHONE_NUMBER}.",
    "What is the boiling point of water at sea level?",
    "Summarise the meeting notes in three bullet points.",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "The quarterly report is due on the 15th.",
)
NO_PII = "none"


# Held out for testing (a third of them, chosen so every entity type is among them); the
# rest tune the recognizers.
TEST_TEMPLATES = frozenset({2, 5, 8, 10, 11, 14, 16, 17, 20, 23, 26, 29})


def split_of(template: int) -> str:
    return "test" if template in TEST_TEMPLATES else "dev"


class Values:
    """Faker values for each slot type, from several locales."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers = {
            locale: Faker(locale)
            for locale in ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT")
        }
        for index, faker in enumerate(self.fakers.values()):
            faker.seed_instance(seed + index)
        self.us = self.fakers["en_US"]

    def _any(self) -> Faker:
        return self.rng.choice(list(self.fakers.values()))

    def person(self) -> str:
        faker = self._any()
        return f"{faker.first_name()} {faker.last_name()}"

    def location(self) -> str:
        pick = self.rng.random()
        if pick < 0.4:
            return str(self._any().city())
        if pick < 0.7:
            return str(self.us.country())
        return str(self.us.state())

    def phone(self) -> str:
        if self.rng.random() < 0.75:
            return str(self.us.phone_number())
        number = str(self._any().phone_number())
        return number if number.startswith("+") else str(self.us.phone_number())

    def card(self) -> str:
        number = str(self.us.credit_card_number())
        if len(number) == 16 and self.rng.random() < 0.5:
            return " ".join(number[i : i + 4] for i in range(0, 16, 4))
        return number

    def iban(self) -> str:
        return str(self._any().iban())

    def ip(self) -> str:
        return str(self.us.ipv4() if self.rng.random() < 0.7 else self.us.ipv6())

    def generators(self) -> dict[str, Callable[[], str]]:
        return {
            "PERSON": self.person,
            "LOCATION": self.location,
            "EMAIL_ADDRESS": lambda: str(self._any().email()),
            "PHONE_NUMBER": self.phone,
            "CREDIT_CARD": self.card,
            "IBAN_CODE": self.iban,
            "IP_ADDRESS": self.ip,
            "US_SSN": lambda: str(self.us.ssn()),
        }


_SLOT = re.compile(r"\{([A-Z_]+)\}")


def fill(template: str, values: dict[str, Callable[[], str]]) -> dict[str, Any]:
    """One labelled message from `template`."""
    text, entities, at = "", [], 0
    for match in _SLOT.finditer(template):
        text += template[at : match.start()]
        value = values[match.group(1)]()
        entities.append({"type": match.group(1), "start": len(text), "end": len(text) + len(value)})
        text += value
        at = match.end()
    return {"text": text + template[at:], "entities": entities}


def generate(per_template: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    values = Values(seed).generators()
    sets: dict[str, list[dict[str, Any]]] = {"dev": [], "test": []}
    for index, template in enumerate(TEMPLATES):
        for _ in range(per_template):
            sets[split_of(index)].append({**fill(template, values), "template": index})
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-template", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in generate(args.per_template, args.seed).items():
        path = args.out_dir / f"privacy-{name}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path}: {len(rows)} messages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
