"""The echo engine (services/runtime/echo.py): the prompt back word by word, no model."""

from __future__ import annotations

import pytest

from llmos.services.config import Settings, load_settings
from llmos.services.errors import InvalidArgument, NotFound, Unimplemented
from llmos.services.runtime.echo import EchoServicer, uses_echo, words
from llmos.v1 import common_pb2, runtime_pb2

Request = runtime_pb2.RuntimeServiceGenerateRequest


async def generate(request: Request) -> list[runtime_pb2.RuntimeServiceGenerateResponse]:
    servicer = EchoServicer(Settings())
    return [piece async for piece in servicer.Generate(request, None)]  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["hello", "  two  words ", "a\nb\tc", "x " * 5])
def test_words_join_back_to_the_text(text: str) -> None:
    assert "".join(words(text)) == text
    assert len(words(text)) == len(text.split())


async def test_generate_streams_the_prompt_one_word_a_message() -> None:
    pieces = await generate(Request(prompt="the quick brown fox"))

    assert [p.text for p in pieces] == ["the ", "quick ", "brown ", "fox"]
    assert [list(p.token_ids) for p in pieces] == [[0], [1], [2], [3]]
    assert [p.model for p in pieces] == ["echo", "", "", ""]
    assert [p.finish_reason for p in pieces[:-1]] == [common_pb2.FINISH_REASON_UNSPECIFIED] * 3
    last = pieces[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 4)


async def test_max_tokens_counts_words_and_ends_with_length() -> None:
    sampling = common_pb2.SamplingParams(max_tokens=2)
    pieces = await generate(Request(prompt="one two three", sampling=sampling))

    assert "".join(p.text for p in pieces) == "one two "
    assert pieces[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert pieces[-1].usage.completion_tokens == 2


async def test_messages_are_echoed_joined_by_newlines() -> None:
    messages = [
        common_pb2.ChatMessage(role="system", content="be brief"),
        common_pb2.ChatMessage(role="user", content="hi"),
    ]
    pieces = await generate(Request(messages=messages))

    assert "".join(p.text for p in pieces) == "be brief\nhi"


async def test_requests_are_validated_as_the_model_runtime_does() -> None:
    with pytest.raises(InvalidArgument) as empty:
        await generate(Request(prompt="   "))
    assert empty.value.reason == "EMPTY_PROMPT"
    with pytest.raises(NotFound) as unknown:
        await generate(Request(prompt="hi", model="SmolLM2-135M-Instruct"))
    assert unknown.value.reason == "MODEL_NOT_FOUND"


async def test_list_models_reports_echo_and_model_calls_are_refused() -> None:
    servicer = EchoServicer(Settings())
    reply = await servicer.ListModels(runtime_pb2.RuntimeServiceListModelsRequest(), None)  # type: ignore[arg-type]
    assert [m.name for m in reply.models] == ["echo"]
    with pytest.raises(Unimplemented) as refused:
        await servicer.Score(runtime_pb2.RuntimeServiceScoreRequest(), None)  # type: ignore[arg-type]
    assert refused.value.reason == "ECHO_ENGINE"


def test_runtime_engine_setting_selects_echo_and_refuses_unknown_engines() -> None:
    assert uses_echo(load_settings(env={"LLMOS_RUNTIME_ENGINE": "echo", "LLMOS_DATA_DIR": "/x"}))
    assert not uses_echo(Settings())
    with pytest.raises(InvalidArgument) as bad:
        uses_echo(Settings(runtime_engine="vllm"))
    assert bad.value.reason == "BAD_SETTING"
