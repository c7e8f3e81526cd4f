"""The NER recognizer's speed measures keep its answers: without spaCy's shared tok2vec and
with its embedding network fused into one numpy forward (services/privacy/fastner.py) it
finds the entities the model's full stock pipeline finds, and a batch through `nlp.pipe`
finds what one call per text finds. The real model on a third of the labelled set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import spacy

from llmos.services.privacy import fastner
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


def test_the_lean_fused_ner_finds_what_the_full_stock_pipeline_finds(
    ner: NerRecognizer, texts: list[str]
) -> None:
    full = spacy.load(SPACY_MODEL)
    assert "tok2vec" in full.pipe_names and "tok2vec" not in ner._nlp.pipe_names
    assert ner.fused
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


def test_the_fused_network_makes_the_stock_token_vectors(texts: list[str]) -> None:
    """The same arithmetic through another BLAS: equal to float rounding, for one doc and
    for a batch with an empty doc in it (the padding between docs is the stock one)."""
    stock = NerRecognizer(fused=False)
    fused = NerRecognizer()
    assert not stock.fused and fused.fused
    batch = [stock._nlp.make_doc(text) for text in texts[:40]]
    for docs in ([batch[0]], [batch[1], stock._nlp.make_doc(""), *batch[2:]]):
        expected = stock._nlp.get_pipe("ner").model.layers[0].predict(docs)
        found = fused._nlp.get_pipe("ner").model.layers[0].predict(docs)
        assert found.shape == expected.shape == (sum(map(len, docs)), 64)
        np.testing.assert_allclose(found, expected, atol=1e-4)


def test_a_pipeline_laid_out_otherwise_is_left_stock() -> None:
    """Another embedding network (here without the subword features) is not fused: NER
    runs the stock way rather than wrongly."""
    nlp = spacy.blank("en")
    tok2vec = {
        "@architectures": "spacy.HashEmbedCNN.v2",
        "pretrained_vectors": None,
        "width": 96,
        "depth": 4,
        "embed_size": 2000,
        "window_size": 1,
        "maxout_pieces": 3,
        "subword_features": False,
    }
    ner = nlp.add_pipe("ner", config={"model": {"tok2vec": tok2vec}})
    ner.add_label("PERSON")
    nlp.initialize()
    before = ner.model.layers[0]
    assert fastner.fuse(nlp) is False
    assert ner.model.layers[0] is before
    assert nlp("Ann met Bob").text == "Ann met Bob"
