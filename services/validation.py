"""Checks on a generation request that every hop applies alike, with messages saying what to fix.

Pure logic (no torch, no I/O): the kernel uses it to refuse bad input before anything is
scheduled, and the runtime applies it again because it is deployed on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from llmos.services.errors import InvalidArgument
from llmos.v1 import common_pb2

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one sequence. Unset request fields take these defaults."""

    # SmolLM2's model card recommends temperature 0.2 with top_p 0.9; a 135M model
    # wanders at higher temperatures.
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def chat_messages(
    prompt: str, messages: Sequence[common_pb2.ChatMessage], max_prompt_chars: int
) -> list[dict[str, str]]:
    """The conversation to template: `prompt` as one user turn, or `messages` as given."""
    if prompt and messages:
        raise InvalidArgument("set either prompt or messages, not both", reason="AMBIGUOUS_INPUT")
    if prompt:
        turns = [{"role": "user", "content": prompt}]
    else:
        turns = [{"role": m.role, "content": m.content} for m in messages]
    if not turns or not any(turn["content"].strip() for turn in turns):
        raise InvalidArgument(
            "the prompt is empty: send a non-empty prompt or at least one message with content",
            reason="EMPTY_PROMPT",
        )
    for index, turn in enumerate(turns):
        if turn["role"] not in ROLES:
            raise InvalidArgument(
                f"messages[{index}].role is {turn['role']!r}; use one of {', '.join(ROLES)}",
                reason="BAD_ROLE",
            )
    size = sum(len(turn["content"]) for turn in turns)
    if size > max_prompt_chars:
        raise InvalidArgument(
            f"the prompt has {size} characters, over the limit of {max_prompt_chars}; "
            "shorten it (the limit is the max_prompt_chars setting)",
            reason="PROMPT_TOO_LONG",
            metadata={"limit": str(max_prompt_chars), "size": str(size)},
        )
    return turns


def sampling_from(params: common_pb2.SamplingParams, default_max_tokens: int) -> Sampling:
    """Validate the request's sampling fields; unset ones take the defaults."""
    defaults = Sampling(max_tokens=default_max_tokens)
    max_tokens = params.max_tokens if params.HasField("max_tokens") else defaults.max_tokens
    if max_tokens <= 0:
        raise InvalidArgument(
            f"max_tokens is {max_tokens}; it must be at least 1", reason="BAD_MAX_TOKENS"
        )
    temperature = params.temperature if params.HasField("temperature") else defaults.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(
            f"temperature is {temperature}; use 0 for greedy decoding or a positive value",
            reason="BAD_TEMPERATURE",
        )
    top_p = params.top_p if params.HasField("top_p") else defaults.top_p
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p is {top_p}; it must be in (0, 1]", reason="BAD_TOP_P")
    top_k = params.top_k if params.HasField("top_k") else defaults.top_k
    if top_k < 0:
        raise InvalidArgument(f"top_k is {top_k}; use 0 (off) or more", reason="BAD_TOP_K")
    penalty = (
        params.repetition_penalty
        if params.HasField("repetition_penalty")
        else defaults.repetition_penalty
    )
    if not math.isfinite(penalty) or penalty <= 0:
        raise InvalidArgument(
            f"repetition_penalty is {penalty}; it must be > 0 (1 disables it)",
            reason="BAD_REPETITION_PENALTY",
        )
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=penalty,
        max_tokens=max_tokens,
        stop=tuple(s for s in params.stop if s),
        seed=params.seed if params.HasField("seed") else None,
    )
