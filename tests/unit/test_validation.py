"""Request checks shared by the kernel and the runtime: the conversation and sampling fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llmos.services.errors import InvalidArgument
from llmos.services.validation import Sampling, chat_messages, sampling_from
from llmos.v1.common_pb2 import ChatMessage, SamplingParams


def param_id(value: object) -> str:
    return str(value).strip().replace("\n", ",")


def reason_of(call: Callable[..., Any], *args: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        call(*args)
    return caught.value.reason


def test_prompt_becomes_one_user_turn() -> None:
    assert chat_messages("hello", [], 100) == [{"role": "user", "content": "hello"}]


def test_messages_are_kept_in_order() -> None:
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content="hello"),
        ChatMessage(role="user", content=""),
    ]

    assert chat_messages("", messages, 100) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": ""},
    ]


def test_prompt_and_messages_together_are_ambiguous() -> None:
    messages = [ChatMessage(role="user", content="hi")]

    assert reason_of(chat_messages, "hello", messages, 100) == "AMBIGUOUS_INPUT"


@pytest.mark.parametrize(
    ("prompt", "messages"),
    [
        ("", []),
        ("  \n\t", []),
        ("", [ChatMessage(role="user", content=" "), ChatMessage(role="system", content="")]),
    ],
)
def test_empty_or_blank_input_is_refused(prompt: str, messages: list[ChatMessage]) -> None:
    assert reason_of(chat_messages, prompt, messages, 100) == "EMPTY_PROMPT"


def test_bad_role_names_the_message() -> None:
    messages = [ChatMessage(role="user", content="hi"), ChatMessage(role="tool", content="x")]

    with pytest.raises(InvalidArgument) as caught:
        chat_messages("", messages, 100)

    assert caught.value.reason == "BAD_ROLE"
    assert "messages[1].role" in caught.value.message
    assert "'tool'" in caught.value.message


def test_prompt_at_the_limit_passes_and_one_more_character_is_refused() -> None:
    assert chat_messages("x" * 10, [], 10)

    with pytest.raises(InvalidArgument) as caught:
        chat_messages("x" * 11, [], 10)

    assert caught.value.reason == "PROMPT_TOO_LONG"
    assert caught.value.metadata == {"limit": "10", "size": "11"}


def test_prompt_length_counts_all_messages_together() -> None:
    messages = [
        ChatMessage(role="system", content="a" * 6),
        ChatMessage(role="user", content="b" * 6),
    ]

    with pytest.raises(InvalidArgument) as caught:
        chat_messages("", messages, 10)

    assert caught.value.metadata == {"limit": "10", "size": "12"}


def test_unset_sampling_fields_take_the_defaults() -> None:
    sampling = sampling_from(SamplingParams(), default_max_tokens=64)

    assert sampling == Sampling(max_tokens=64)
    assert sampling.temperature == pytest.approx(0.2)
    assert sampling.top_p == pytest.approx(0.9)
    assert not sampling.greedy
    assert sampling.seed is None


def test_explicit_zeros_are_distinguished_from_unset() -> None:
    sampling = sampling_from(SamplingParams(temperature=0.0, top_k=0, seed=0), 64)

    assert sampling.temperature == 0.0
    assert sampling.greedy
    assert sampling.seed == 0


def test_set_sampling_fields_are_used() -> None:
    params = SamplingParams(
        temperature=1.5,
        top_p=0.5,
        top_k=40,
        repetition_penalty=1.25,
        max_tokens=8,
        stop=["\n\n", "", "END"],
        seed=1234,
    )

    sampling = sampling_from(params, default_max_tokens=64)

    assert sampling == Sampling(
        temperature=1.5,
        top_p=0.5,
        top_k=40,
        repetition_penalty=1.25,
        max_tokens=8,
        stop=("\n\n", "END"),
        seed=1234,
    )


def test_top_p_of_one_is_allowed() -> None:
    assert sampling_from(SamplingParams(top_p=1.0), 64).top_p == 1.0


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        (SamplingParams(max_tokens=0), "BAD_MAX_TOKENS"),
        (SamplingParams(max_tokens=-3), "BAD_MAX_TOKENS"),
        (SamplingParams(temperature=-0.1), "BAD_TEMPERATURE"),
        (SamplingParams(top_p=0.0), "BAD_TOP_P"),
        (SamplingParams(top_p=1.01), "BAD_TOP_P"),
        (SamplingParams(top_p=-0.5), "BAD_TOP_P"),
        (SamplingParams(top_k=-1), "BAD_TOP_K"),
        (SamplingParams(repetition_penalty=0.0), "BAD_REPETITION_PENALTY"),
        (SamplingParams(repetition_penalty=-1.0), "BAD_REPETITION_PENALTY"),
    ],
    ids=param_id,
)
def test_out_of_range_sampling_is_refused(params: SamplingParams, reason: str) -> None:
    assert reason_of(sampling_from, params, 64) == reason


def test_default_max_tokens_of_zero_is_refused_too() -> None:
    assert reason_of(sampling_from, SamplingParams(), 0) == "BAD_MAX_TOKENS"


# `temperature < 0` and `penalty <= 0` are False for NaN; NaN must still be refused.
@pytest.mark.parametrize(
    ("params", "reason"),
    [
        (SamplingParams(temperature=float("nan")), "BAD_TEMPERATURE"),
        (SamplingParams(repetition_penalty=float("nan")), "BAD_REPETITION_PENALTY"),
    ],
    ids=param_id,
)
def test_nan_sampling_is_refused(params: SamplingParams, reason: str) -> None:
    assert reason_of(sampling_from, params, 64) == reason
