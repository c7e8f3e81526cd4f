"""The runtime's continuous-batching engine against Hugging Face `generate()`, on the real
default model: exact greedy tokens alone and in a batch, joining and leaving mid-batch,
cancellation, admission within the KV budget, and a storm of concurrent requests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos.services.errors import InvalidArgument, ResourceExhausted
from llmos.services.runtime.engine import Engine, EngineLimits, LoadedModel
from llmos.services.runtime.prefill_plan import shared_length
from llmos.services.validation import Sampling
from llmos.v1 import common_pb2

pytestmark = pytest.mark.model  # the real default model, converted once per session

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
]


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    running = Engine(loaded)
    yield running
    running.close()


async def run(engine: Engine, prompt_ids: list[int], sampling: Sampling):
    handle = engine.submit(prompt_ids, sampling)
    return [event async for event in handle.events()]


@pytest.fixture(scope="module")
def hf_greedy(loaded: LoadedModel) -> dict[str, list[int]]:
    """Hugging Face generate()'s greedy tokens for each test prompt (24 new tokens, EOS cut)."""
    reference = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32)
    tokens = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = loaded.encode_chat([{"role": "user", "content": prompt}])
            output = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
            new = output[0, len(ids) :].tolist()
            tokens[prompt] = [t for t in new if t not in loaded.eos_token_ids]
    return tokens


def tokens_of(events) -> list[int]:
    return [token for event in events for token in event.token_ids]


def chat_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    return loaded.encode_chat([{"role": "user", "content": prompt}])


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


async def test_a_batch_decodes_each_prompt_as_hf_does_alone(
    engine: Engine, loaded: LoadedModel, hf_greedy: dict[str, list[int]]
) -> None:
    greedy = Sampling(temperature=0.0, max_tokens=24)
    results = await asyncio.gather(
        *(run(engine, chat_ids(loaded, prompt), greedy) for prompt in PROMPTS)
    )
    for prompt, events in zip(PROMPTS, results, strict=True):
        assert tokens_of(events) == hf_greedy[prompt], prompt
    assert engine.stats().steps < 3 * 24, "the prompts were not decoded together"


async def test_sequences_join_and_leave_a_running_batch(
    engine: Engine, loaded: LoadedModel, hf_greedy: dict[str, list[int]]
) -> None:
    greedy = Sampling(temperature=0.0, max_tokens=24)
    long_running = engine.submit(
        chat_ids(loaded, "Write a long story about a lighthouse."),
        Sampling(temperature=0.0, max_tokens=60),
    )
    events = long_running.events()
    for _ in range(5):  # the first sequence is well under way
        await anext(events)
    late = await asyncio.gather(
        *(run(engine, chat_ids(loaded, prompt), greedy) for prompt in PROMPTS)
    )
    assert engine.stats().running == 1, "finished sequences must leave at once"
    rest = [event async for event in events]
    assert rest[-1].finish_reason in (
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    )
    for prompt, joined in zip(PROMPTS, late, strict=True):
        assert tokens_of(joined) == hf_greedy[prompt], prompt
    # They share the chat template's system prompt with the running one: copied, not run.
    system = shared_length([chat_ids(loaded, p) for p in [*PROMPTS, "Write a long story"]])
    assert engine.stats().reused_prompt_tokens >= len(PROMPTS) * system > 0


async def test_cancel_frees_the_slot_at_the_next_step(engine: Engine, loaded: LoadedModel) -> None:
    sampling = Sampling(temperature=0.7, max_tokens=300, seed=9)
    handles = [engine.submit(chat_ids(loaded, "Tell me about whales."), sampling) for _ in range(3)]
    streams = [handle.events() for handle in handles]
    for stream in streams:
        await anext(stream)
    assert engine.stats().running == 3
    handles[1].cancel()
    final = [event async for event in streams[1]][-1]
    assert final.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert engine.stats().running == 2
    for handle in (handles[0], handles[2]):
        handle.cancel()
    for stream in (streams[0], streams[2]):
        assert [event async for event in stream][-1].finish_reason == (
            common_pb2.FINISH_REASON_CANCELLED
        )
    assert engine.stats().running == 0 and engine.stats().reserved_positions == 0


async def test_same_seed_same_output_and_stop_strings_inside_a_batch(
    engine: Engine, loaded: LoadedModel
) -> None:
    seeded = Sampling(temperature=1.0, max_tokens=20, seed=42)
    stopping = Sampling(temperature=0.0, max_tokens=40, stop=("Paris",))
    ids = chat_ids(loaded, "Tell me a story.")
    first, second, stopped = await asyncio.gather(
        run(engine, ids, seeded),
        run(engine, ids, seeded),
        run(engine, chat_ids(loaded, "What is the capital of France?"), stopping),
    )
    assert tokens_of(first) == tokens_of(second)
    assert "Paris" not in "".join(event.text for event in stopped)
    assert stopped[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_admission_waits_for_the_kv_budget(loaded: LoadedModel) -> None:
    ids = chat_ids(loaded, "Count to ten.")
    per_request = len(ids) + 30
    # Room for one request's prompt + max_tokens, not two.
    engine = Engine(loaded, EngineLimits(kv_budget_bytes=int(1.5 * per_request) * 46080))
    try:
        sampling = Sampling(temperature=0.0, max_tokens=30)
        first, second = engine.submit(ids, sampling), engine.submit(ids, sampling)
        stream = first.events()
        await anext(stream)
        assert engine.stats().running == 1 and engine.stats().waiting == 1
        [event async for event in stream]
        assert [e async for e in second.events()][-1].finish_reason is not None
        with pytest.raises(ResourceExhausted) as caught:
            engine.submit(ids, Sampling(max_tokens=2 * per_request))
        assert caught.value.reason == "KV_BUDGET_EXCEEDED"
    finally:
        engine.close()


async def test_a_full_queue_refuses_at_once(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineLimits(max_batch_size=1, max_queued=2))
    ids = chat_ids(loaded, "Hi")
    try:
        handles = [engine.submit(ids, Sampling(temperature=0.0, max_tokens=50))]
        await anext(handles[0].events())  # running; the queue is empty again
        handles += [engine.submit(ids, Sampling(max_tokens=5)) for _ in range(2)]
        with pytest.raises(ResourceExhausted) as caught:
            engine.submit(ids, Sampling(max_tokens=5))
        assert caught.value.reason == "RUNTIME_QUEUE_FULL"
    finally:
        for handle in handles:
            handle.cancel()
        engine.close()


async def test_a_storm_of_requests_with_random_cancels_leaks_nothing(
    engine: Engine, loaded: LoadedModel
) -> None:
    rng = random.Random(7)
    prompts = ["Hi", "Tell me a joke.", "Describe the sea.", "Name three colours."]

    async def client(index: int) -> str:
        try:
            handle = engine.submit(
                chat_ids(loaded, prompts[index % len(prompts)]),
                Sampling(temperature=0.8, max_tokens=rng.randint(2, 24), seed=index),
            )
        except ResourceExhausted:
            return "REFUSED"  # 100 at once exceed the batch (32) plus the queue (64)
        cancel_after = rng.choice([None, 0, 1, 3])
        received = 0
        async for event in handle.events():
            if event.finish_reason is not None:
                return common_pb2.FinishReason.Name(event.finish_reason)
            received += 1
            if received == cancel_after:
                handle.cancel()
        return "no final event"

    outcomes = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(100))), 300)
    assert "no final event" not in outcomes
    assert outcomes.count("REFUSED") <= 100 - 64 - 1, "the queue bound refused too many"
    assert "FINISH_REASON_CANCELLED" in outcomes
    assert {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP"} & set(outcomes)
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.reserved_positions) == (0, 0, 0)
