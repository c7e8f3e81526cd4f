"""One request's life in the runtime: the caller's handle, the events it receives, and the
decoding state the engine keeps while it runs.

Ownership: `Engine.submit` hands the caller a `SequenceHandle`; the caller must `cancel()`
it when it stops listening (the gRPC handler does so in a `finally`). The engine ends
every sequence with exactly one final event (one with a finish reason), whatever happened.

Flow control: a handle counts the events the engine emitted and the caller took; their
difference is the stream's backlog, the events buffered for a reader that has not taken
them (the gRPC handler takes the next only once the transport accepted the previous one,
so a slow reader shows here). The engine parks a sequence whose backlog reaches its
`stream_buffer` (it leaves the batch, see engine.py) and the caller's side wakes it when
the reader has taken half of it, or cancels. Each counter is written by one thread only
(emitted by the engine's, taken by the event loop's), so no lock is needed to read both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import torch

from llmos.services.errors import LlmosError
from llmos.services.runtime.admission import NORMAL
from llmos.services.runtime.detokenize import Decode, TextAssembler
from llmos.services.runtime.kv_memory import Admission
from llmos.services.validation import Sampling
from llmos.v1 import common_pb2

FinishReason: TypeAlias = common_pb2.FinishReason.ValueType


@dataclasses.dataclass
class Event:
    """A piece of a stream; the last one has `finish_reason` and the usage figures."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    # The memory decision that let it into the batch (final event; kv_memory.py).
    kv: Admission | None = None
    # Why it ended with FINISH_REASON_ERROR without running, when it was refused.
    error: LlmosError | None = None


class SequenceHandle:
    """The caller's side of one queued or running sequence."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, priority: int = NORMAL) -> None:
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        # Class in the engine's waiting queue (admission.py): 1 interactive .. 3 batch.
        self.priority = priority
        self.arrived = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        # Flow control (see the module's docstring).
        self.emitted = 0
        self.taken = 0
        self.parked = False  # set and cleared under the engine's lock
        # The decoding state of a parked sequence, kept for its return to the batch.
        self.resume: Running | None = None
        # The engine's wake-up for a parked sequence: called when it drained or cancelled.
        self.waker: Callable[[SequenceHandle], None] | None = None
        self.low_water = 0

    @property
    def backlog(self) -> int:
        """Events emitted that the caller has not taken yet."""
        return self.emitted - self.taken

    @property
    def footprint(self) -> int:
        """Positions of KV cache this sequence may need: prompt plus every new token."""
        return len(self.prompt_ids) + self.sampling.max_tokens

    def cancel(self) -> None:
        """Ask the engine to drop this sequence before its next decoding step (a parked one
        at once)."""
        self._cancelled.set()
        if self.parked and self.waker is not None:
            self.waker(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Called from the engine's thread."""
        self.emitted += 1
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """The stream of events, ending after the final one. A parked sequence is woken
        once its backlog is down to `low_water`."""
        while True:
            event = await self._events.get()
            self.taken += 1
            if self.parked and self.backlog <= self.low_water and self.waker is not None:
                self.waker(self)
            yield event
            if event.finish_reason is not None:
                return


class Running:
    """The engine's state for a sequence in the batch."""

    def __init__(
        self, handle: SequenceHandle, decode: Decode, eos_token_ids: frozenset[int]
    ) -> None:
        self.handle = handle
        self.sampling = handle.sampling
        self.eos_token_ids = eos_token_ids
        self.started = time.monotonic()
        self.length = len(handle.prompt_ids)  # positions written to the cache (or to be)
        self.last_token = handle.prompt_ids[-1]
        self.generated: list[int] = []
        self.finished = False
        self.assembler = TextAssembler(decode, self.sampling.stop)
        self.generator = self._generator()
        self.final = Event(
            "",
            [],
            prompt_tokens=len(handle.prompt_ids),
            queue_time_s=self.started - handle.arrived,
        )

    def _generator(self) -> torch.Generator | None:
        if self.sampling.greedy:
            return None
        seed = self.sampling.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8))
        return torch.Generator().manual_seed(seed % (2**63))

    @property
    def prefill_ids(self) -> list[int]:
        """What a prefill feeds: the prompt, and for a sequence back from being parked (its
        cache was freed) every token generated so far, recomputed."""
        return self.handle.prompt_ids + self.generated

    def seen(self) -> torch.Tensor:
        """Prompt and generated ids, for the repetition penalty (empty when it is off)."""
        if self.sampling.repetition_penalty == 1.0:
            return torch.empty(0, dtype=torch.long)
        return torch.tensor(self.handle.prompt_ids + self.generated, dtype=torch.long)

    def accept(self, token: int) -> FinishReason | None:
        """Take the token chosen for this sequence; say whether that finishes it."""
        if not self.generated and not self.final.time_to_first_token_s:
            self.final.time_to_first_token_s = time.monotonic() - self.handle.arrived
        if token in self.eos_token_ids:
            return common_pb2.FINISH_REASON_STOP
        self.generated.append(token)
        self.last_token = token
        self.handle.emit(Event(self.assembler.push(token), [token]))
        if self.assembler.stopped:
            return common_pb2.FINISH_REASON_STOP
        if len(self.generated) >= self.sampling.max_tokens:
            return common_pb2.FINISH_REASON_LENGTH
        return None

    def refuse(self, error: LlmosError) -> None:
        """End it before it ran, with `error` for the caller (its memory was refused)."""
        self.final.error = error
        self.finish(common_pb2.FINISH_REASON_ERROR)

    def finish(self, reason: FinishReason) -> None:
        self.finished = True
        self.final.text = self.assembler.flush() if reason != common_pb2.FINISH_REASON_ERROR else ""
        self.final.completion_tokens = len(self.generated)
        self.final.finish_reason = reason
        self.handle.emit(self.final)
