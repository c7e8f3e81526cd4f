"""The NER recognizer's speed measures keep its answers: without spaCy's shared tok2vec it
finds the entities the model's full pipeline finds, and a batch through `nlp.pipe` finds
what one call per text finds. The real model on every message of the labelled set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import spacy

from llmos.services.privacy.recognizers import SPACY_MODEL, Detector, NerRecognizer

DATA = Path(__file__).resolve().parents[2] / "bench/data"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    lines = [
        line
        for name in ("privacy-dev.jsonl", "privacy-test.jsonl")
        for line in (DATA / name).read_text(encoding="utf-8").splitlines()
    ]
    extra = [
        "Hi, I'm Zoë Martin 🙂 from Cenate di Sotto; Jean-Luc Picard met O'Brien in New York.",
        "angela merkel visited paris",
        "",
    ]
    # Every third message of both splits (every template, 430 messages) keeps this quick.
    return [json.loads(line)["text"] for line in lines[::3] if line.strip()] + extra


@pytest.fixture(scope="module")
def ner() -> NerRecognizer:
    return NerRecognizer()


def test_ner_without_the_shared_tok2vec_finds_what_the_full_pipeline_finds(
    ner: NerRecognizer, texts: list[str]
) -> None:
    full = spacy.load(SPACY_MODEL)
    assert "tok2vec" in full.pipe_names and "tok2vec" not in ner._nlp.pipe_names
    for text in texts:
        expected = [(e.start_char, e.end_char, e.label_) for e in full(text).ents]
        found = [(e.start_char, e.end_char, e.label_) for e in ner._nlp(text).ents]
        assert found == expected, text


def test_a_batch_finds_what_one_call_per_text_finds(ner: NerRecognizer, texts: list[str]) -> None:
    detector = Detector(ner)
    one_by_one = [detector.detect(text) for text in texts]
    for size in (2, 5, 32):
        batched = [
            found
            for at in range(0, len(texts), size)
            for found in detector.detect_many(texts[at : at + size])
        ]
        assert batched == one_by_one
    assert detector.detect_many([]) == []
