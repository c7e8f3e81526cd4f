"""The runtime's decoding loop against Hugging Face `generate()` on the real default model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from stacktools import DEFAULT_MODEL
from transformers import AutoModelForCausalLM

from llmos.services.errors import InvalidArgument
from llmos.services.runtime.engine import Engine, LoadedModel, load_model
from llmos.services.runtime.models import converted_dir
from llmos.services.validation import Sampling
from llmos.v1 import common_pb2

pytestmark = pytest.mark.model  # the real default model, converted once per session

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
]


@pytest.fixture(scope="module")
def loaded(model_data_dir: Path) -> LoadedModel:
    return load_model(DEFAULT_MODEL, str(converted_dir(model_data_dir, DEFAULT_MODEL)))


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    running = Engine(loaded)
    yield running
    running.close()


async def run(engine: Engine, prompt_ids: list[int], sampling: Sampling):
    handle = engine.submit(prompt_ids, sampling)
    return [event async for event in handle.events()]


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_decoding_matches_hf_generate(
    engine: Engine, loaded: LoadedModel, prompt: str
) -> None:
    prompt_ids = loaded.encode_chat([{"role": "user", "content": prompt}])
    events = await run(engine, prompt_ids, Sampling(temperature=0.0, max_tokens=24))
    ours = [token for event in events for token in event.token_ids]

    reference = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32)
    with torch.inference_mode():
        output = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)
    theirs = [t for t in output[0, len(prompt_ids) :].tolist() if t not in loaded.eos_token_ids]
    assert ours == theirs
    assert "".join(event.text for event in events) == loaded.decode(theirs)


async def test_cancel_stops_at_the_next_step(engine: Engine, loaded: LoadedModel) -> None:
    prompt_ids = loaded.encode_chat([{"role": "user", "content": "Write a long story."}])
    handle = engine.submit(prompt_ids, Sampling(temperature=0.7, max_tokens=300, seed=3))
    seen = 0
    async for event in handle.events():
        seen += 1
        if seen == 3:
            handle.cancel()
        if event.finish_reason is not None:
            final = event
            break
    assert final.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    # At most one step can be in flight when the cancel lands.
    assert final.completion_tokens <= 4


async def test_a_prompt_beyond_the_context_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidArgument) as caught:
        engine.submit([1] * 8000, Sampling(max_tokens=500))
    assert caught.value.reason == "CONTEXT_EXCEEDED"
    assert "8192" in caught.value.message
