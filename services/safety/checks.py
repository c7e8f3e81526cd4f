"""What the safety service refuses before any work: said once, with what to fix.

Requests are decoded leniently (`lenient`): a message protobuf cannot parse - a string
field that is not valid UTF-8, sent through the raw gRPC API - arrives as `MALFORMED`
instead of failing inside gRPC with an opaque INTERNAL, so the servicer answers
INVALID_ARGUMENT through the project's error table like any other bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from google.protobuf.message import DecodeError

from llmos.services.errors import InvalidArgument
from llmos.v1 import safety_pb2

# 256 Ki characters: a long document or chat history passes, read in overlapping windows
# (judge.py, at most MAX_WINDOWS of them); a 1 MB paste is refused (split it).
MAX_TEXT_CHARS = 262_144
MAX_STREAM_CHARS = 1_048_576


class Malformed:
    """A request message that did not parse."""

    def __init__(self, why: str) -> None:
        self.why = why


MALFORMED: Final = Malformed


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError) as error:
            return Malformed(str(error))

    return deserialize


def parsed(request: object) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(
            f"the request is not a valid protobuf message ({request.why}); text fields must "
            "be valid UTF-8",
            reason="MALFORMED_REQUEST",
        )


def check_text(text: str, limit: int = MAX_TEXT_CHARS) -> None:
    if not text.strip():
        raise InvalidArgument("the text is empty: send the text to check", reason="EMPTY_TEXT")
    if len(text) > limit:
        raise InvalidArgument(
            f"the text is {len(text):,} characters; one check takes at most {limit:,}: "
            "split it over several checks",
            reason="TEXT_TOO_LONG",
            metadata={"max_chars": str(limit)},
        )


def check_direction(direction: int) -> safety_pb2.Direction.ValueType:
    if direction not in (safety_pb2.DIRECTION_INPUT, safety_pb2.DIRECTION_OUTPUT):
        raise InvalidArgument(
            "direction must be DIRECTION_INPUT (a prompt) or DIRECTION_OUTPUT (a model's text)",
            reason="BAD_DIRECTION",
        )
    return safety_pb2.Direction.ValueType(direction)
