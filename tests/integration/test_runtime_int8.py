"""int8 weights (`runtime_weights = "int8"`): a quarter of the Linear bytes, still the model.

int8 gives up bit-identical outputs (services/runtime/weights.py), so these tests check what
it keeps: the model still answers a factual question, still follows its greedy path for
the first tokens of most prompts, and its weights take far less memory. The speed-up is
measured by bench/runtime.py, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stacktools import DEFAULT_MODEL

from llmos.services.errors import InvalidArgument
from llmos.services.runtime.engine import Engine, LoadedModel, load_model
from llmos.services.runtime.models import converted_dir
from llmos.services.runtime.weights import check_weights
from llmos.services.validation import Sampling

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def int8(model_data_dir: Path) -> LoadedModel:
    return load_model(
        DEFAULT_MODEL, str(converted_dir(model_data_dir, DEFAULT_MODEL)), weights="int8"
    )


async def answer(loaded: LoadedModel, prompt: str, max_tokens: int = 24) -> str:
    engine = Engine(loaded)
    try:
        ids = loaded.encode_chat([{"role": "user", "content": prompt}])
        handle = engine.submit(ids, Sampling(temperature=0.0, max_tokens=max_tokens))
        tokens = [t async for event in handle.events() for t in event.token_ids]
    finally:
        engine.close()
    return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))


async def test_int8_weights_still_answer(int8: LoadedModel) -> None:
    assert "Paris" in await answer(int8, "What is the capital of France?")


def test_int8_weights_take_far_less_memory(int8: LoadedModel, loaded: LoadedModel) -> None:
    float32 = loaded
    assert int8.parameters == float32.parameters
    # Every Linear weight drops from 4 bytes to 1; the embedding stays float32, and the
    # output layer tied to it gets an int8 copy of its own.
    assert int8.weight_bytes < 0.6 * float32.weight_bytes
    assert float32.weight_bytes == float32.forward.packed_bytes + sum(
        p.numel() * p.element_size() for p in float32.model.parameters()
    )


@pytest.mark.parametrize("mode", ["int4", "", "FLOAT32"])
def test_an_unknown_weight_mode_is_refused_by_name(mode: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_weights(mode)
    assert caught.value.reason == "BAD_SETTING"
    assert "float32, int8" in caught.value.message
