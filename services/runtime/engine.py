"""The decoding loop of one loaded model: a worker thread that streams tokens into asyncio.

Requests queue (bounded: a full queue refuses at once) and a single worker thread decodes
them one sequence at a time with a KV cache. Before every decoding step it checks whether
the sequence was cancelled — by the client, a deadline or the kernel — so a cancelled
request stops consuming compute at the next step. Continuous batching replaces the
one-at-a-time loop in the model-runtime work item; the interface (submit → events) stays.

Ownership: `submit` hands the caller a `SequenceHandle`; the caller must `cancel()` it when
it stops listening (the gRPC handler does so in a `finally`). The worker always ends a
sequence with exactly one final event, whatever happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import torch

from llmos.services.errors import InvalidArgument, ResourceExhausted
from llmos.services.runtime.detokenize import TextAssembler
from llmos.services.runtime.sampling import next_token
from llmos.services.validation import Sampling
from llmos.v1 import common_pb2

log = logging.getLogger(__name__)

FinishReason: TypeAlias = common_pb2.FinishReason.ValueType


@dataclasses.dataclass
class LoadedModel:
    """A model and tokenizer in memory, with the facts requests are checked against."""

    name: str
    model: Any
    tokenizer: Any
    context_length: int
    eos_token_ids: frozenset[int]
    parameters: int
    weight_bytes: int
    source: str

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the model's chat template and generation prompt."""
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            name=self.name,
            loaded=True,
            parameters=self.parameters,
            context_length=self.context_length,
            weight_bytes=self.weight_bytes,
            dtype="float32",
            source=self.source,
        )


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


class SequenceHandle:
    """The caller's side of one queued or running sequence."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling) -> None:
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.arrived = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to drop this sequence before its next decoding step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Called from the worker thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """The stream of events, ending after the final one."""
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason is not None:
                return


class Engine:
    """Owns one model and the worker thread that decodes its queued sequences."""

    def __init__(self, loaded: LoadedModel, max_queued: int = 64) -> None:
        self.loaded = loaded
        self.max_queued = max_queued
        self._queue: queue.Queue[SequenceHandle | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name=f"decode-{loaded.name}")
        self._worker.daemon = True
        self._worker.start()

    def submit(self, prompt_ids: list[int], sampling: Sampling) -> SequenceHandle:
        """Queue a sequence; refuse when it cannot fit the context or the queue is full."""
        needed = len(prompt_ids) + sampling.max_tokens
        if needed > self.loaded.context_length:
            raise InvalidArgument(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds {self.loaded.name}'s context of {self.loaded.context_length} tokens; "
                "lower max_tokens or shorten the prompt",
                reason="CONTEXT_EXCEEDED",
                metadata={"context_length": str(self.loaded.context_length)},
            )
        if self._queue.qsize() >= self.max_queued:
            raise ResourceExhausted(
                f"{self.loaded.name} has {self.max_queued} requests queued; retry shortly",
                reason="RUNTIME_QUEUE_FULL",
                metadata={"retry_after_ms": "500"},
            )
        handle = SequenceHandle(prompt_ids, sampling)
        self._queue.put(handle)
        return handle

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _work(self) -> None:
        while (handle := self._queue.get()) is not None:
            try:
                self._decode(handle)
            except Exception:
                log.exception("decoding failed")
                handle.emit(Event("", [], finish_reason=common_pb2.FINISH_REASON_ERROR))

    def _generator(self, sampling: Sampling) -> torch.Generator | None:
        if sampling.greedy:
            return None
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8))
        return torch.Generator().manual_seed(seed % (2**63))

    @torch.inference_mode()
    def _decode(self, handle: SequenceHandle) -> None:
        loaded, sampling = self.loaded, handle.sampling
        started = time.monotonic()
        final = Event(
            "", [], prompt_tokens=len(handle.prompt_ids), queue_time_s=started - handle.arrived
        )
        assembler = TextAssembler(loaded.decode, sampling.stop)
        generator = self._generator(sampling)
        seen = torch.tensor(handle.prompt_ids, dtype=torch.long)
        inputs = seen.unsqueeze(0)
        cache: Any = None
        reason: FinishReason = common_pb2.FINISH_REASON_LENGTH
        for _ in range(sampling.max_tokens):
            if handle.cancelled:
                reason = common_pb2.FINISH_REASON_CANCELLED
                break
            output = loaded.model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1)
            cache = output.cache
            token = next_token(output.logits[0, -1], seen, sampling, generator)
            if token in loaded.eos_token_ids:
                reason = common_pb2.FINISH_REASON_STOP
                break
            final.completion_tokens += 1
            if final.completion_tokens == 1:
                final.time_to_first_token_s = time.monotonic() - handle.arrived
            seen = torch.cat([seen, torch.tensor([token])])
            inputs = torch.tensor([[token]])
            handle.emit(Event(assembler.push(token), [token]))
            if assembler.stopped:
                reason = common_pb2.FINISH_REASON_STOP
                break
        final.text = assembler.flush()
        final.finish_reason = reason
        handle.emit(final)


def load_model(name: str, model_dir: str, torch_threads: int = 0) -> LoadedModel:
    """Load a Hugging Face model directory in float32 (these CPUs have no fast bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A raw progress bar would break the JSON-lines log.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    config = model.config
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else list(eos or []))
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        context_length=int(getattr(config, "max_position_embeddings", 2048)),
        eos_token_ids=eos_ids,
        parameters=parameters,
        weight_bytes=weight_bytes,
        source=model_dir,
    )
