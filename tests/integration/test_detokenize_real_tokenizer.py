"""TextAssembler with the default model's real tokenizer: decoding token by token, with a
short context, gives exactly what decoding the whole sequence at once gives."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from stacktools import DEFAULT_MODEL
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmos.services.runtime.detokenize import TextAssembler
from llmos.services.runtime.models import converted_dir

TEXTS = [
    "The capital of France is Paris.\n\nIt has about 2.1 million inhabitants.",
    "Café, naïve, 東京タワー, emoji 😀🚀 and math: ∑ x² ≤ ∞ — done.",
    "def f(x):\n    return  x  *  2   # spaces   kept\n\t\ttabs too",
    "  leading spaces, trailing ones  ",
]


@pytest.fixture(scope="module")
def tokenizer(model_data_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(converted_dir(model_data_dir, DEFAULT_MODEL))


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_decoding_everything(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    ids = tokenizer(text)["input_ids"]
    # Special tokens in the middle are skipped by both ways of decoding.
    ids = [*ids[:5], *tokenizer.all_special_ids[:1], *ids[5:]]
    assembler = TextAssembler(decode)

    released = "".join(assembler.push(token) for token in ids) + assembler.flush()

    assert released == decode(ids)
    assert released == text  # byte-level BPE round-trips exactly
