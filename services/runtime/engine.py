"""Continuous batching for one loaded model: a worker thread that decodes all running
sequences together, one token per step, and streams each token into asyncio.

Iteration-level scheduling, as in vLLM: at every step boundary the worker
1. admits waiting requests, by priority class with aging (`admission.py`: the class the
   kernel dispatched them at, rising one level per `aging_s` waited; then arrival), while
   the batch has a free slot and
   the KV budget allows (the cache is rows x the longest row's prompt + max_tokens, so
   that rectangle is what is budgeted) and so does the host memory reserved for the cache
   at the hardware service (`kv_memory.py`: a request waits for the reservation to grow,
   or is refused when the hardware service refuses and nothing runs); queued requests
   whose caller gave up leave first;
2. drops running sequences that were cancelled (client cancel, deadline, kernel) — a
   cancelled request consumes no compute after the step in flight;
3. prefills the newcomers, shortest prompts first within a class, in forward passes of
   at most `max_prefill_tokens` tokens made as even as they can be (prompts padded to the
   longest, masked), each streaming its sequences' first tokens when it ends; the prefix
   they share with a running row (a chat template's system prompt) is copied from that
   row's cache, not run again (`prefill_plan.py`);
4. runs one decoding step for every running sequence, each at its own length
   (`SlotKVCache`), and samples each row with its own parameters; except that when
   requests arrived during this iteration's prefill, the step waits one iteration for
   them to be admitted and prefilled too (16 streams opened together reach the engine
   over some milliseconds, and the first one's prefill starts at once);
5. removes finished sequences at once, freeing their slot and reservation.
The waiting queue is bounded: a full queue refuses at once with RESOURCE_EXHAUSTED.
A running sequence is never preempted for a higher class: it keeps its place until it
finishes (docs/architecture.md says why).

Flow control: a sequence whose reader has not taken `stream_buffer` of its events is
*parked*: it leaves the batch (freeing its row, its KV cache and its reservation, so the
others decode on at full speed), keeps its decoding state (tokens so far, sampler, text
assembler), and waits, buffering nothing more. Once its reader has taken half of the
buffer it joins the waiting queue again, with its first arrival time (so aging puts it
ahead), and its prefill recomputes the prompt plus the tokens generated so far, as vLLM's
recompute preemption does. A parked sequence whose caller cancels (or whose deadline
passes) ends at once. So a stream buffers at most `stream_buffer` events in the runtime.

A lone sequence runs without any mask and copies no prefix (nothing runs to copy from),
exactly as Hugging Face's own forward pass does, so greedy decoding of a request alone
reproduces `generate()` token for token.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from llmos.services.errors import InvalidArgument, ResourceExhausted
from llmos.services.runtime.admission import NORMAL, WaitingQueue, effective_class
from llmos.services.runtime.kv_cache import SlotKVCache
from llmos.services.runtime.kv_memory import WAIT_POLL_S, KvMemory
from llmos.services.runtime.llama_forward import Forward, HfForward, lean_forward_for
from llmos.services.runtime.metrics import BATCH_SEQUENCES
from llmos.services.runtime.prefill_plan import common_prompt, plan_chunks, shared_length
from llmos.services.runtime.sampling import next_token
from llmos.services.runtime.sequences import FinishReason, Running, SequenceHandle
from llmos.services.runtime.weights import hold_weights, weight_bytes
from llmos.services.validation import Sampling
from llmos.v1 import common_pb2

log = logging.getLogger(__name__)


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
    # The forward pass the engine runs: the lean Llama pass (llama_forward.py) for a
    # float32 Llama model, Hugging Face's own otherwise.
    forward: Forward

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the model's chat template and generation prompt."""
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def release(self) -> None:
        """Free the weights now, even if something (a finished call's frame, a traceback)
        still holds this object: unloading must return the memory, not hope for it."""
        for module in self.model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        torch.empty(0), requires_grad=False
                    )
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = torch.empty(0)
        self.forward = HfForward(self.model)  # drops the lean pass's stacked weights

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


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """What one engine may take on at once."""

    # Sequences decoded together in one step.
    max_batch_size: int = 32
    # Requests waiting for a place in the batch; one more is refused at once.
    max_queued: int = 64
    # KV-cache memory the running sequences may reserve (prompt + max_tokens each).
    kv_budget_bytes: int = 1024 * 1024 * 1024
    # Prompt tokens run (padded, past a prefix copied from a running row) in one prefill
    # forward pass. Smaller passes let the first newcomers start streaming sooner for the
    # same total work; below ~128 tokens a pass loses efficiency (docs/performance.md).
    max_prefill_tokens: int = 256
    # Seconds a waiting sequence waits before rising one priority class (admission.py).
    aging_s: float = 5.0
    # Events a stream may hold unread before its sequence is parked (flow control).
    stream_buffer: int = 64

    def __post_init__(self) -> None:
        if not self.aging_s > 0:
            raise InvalidArgument(
                f"the runtime's aging_s is {self.aging_s}; it must be above 0",
                reason="BAD_SETTING",
            )
        for name in (
            "max_batch_size",
            "max_queued",
            "kv_budget_bytes",
            "max_prefill_tokens",
            "stream_buffer",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgument(
                    f"the runtime's {name} is {getattr(self, name)}; it must be at least 1",
                    reason="BAD_SETTING",
                )


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, for tests, logs and metrics (runtime/metrics.py)."""

    running: int
    waiting: int
    reserved_positions: int
    kv_allocated_bytes: int
    steps: int
    # Sequences out of the batch until their slow reader catches up (flow control).
    parked: int = 0
    # Prompt tokens whose keys and values were copied from a running row's cache (a shared
    # prefix, such as the chat template's system prompt) instead of computed.
    reused_prompt_tokens: int = 0


class Engine:
    """Owns one model and the thread that runs its continuous batch."""

    def __init__(self, loaded: LoadedModel, limits: EngineLimits | None = None) -> None:
        self.loaded = loaded
        self.limits = limits or EngineLimits()
        config = loaded.model.config
        self.cache = SlotKVCache(
            layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
            max_positions=loaded.context_length,
            dtype=torch.float32,
        )
        self.position_budget = self.limits.kv_budget_bytes // self.cache.bytes_per_position
        self._lock = threading.Condition()
        # The cache's host-memory grant (kv_memory.py); unmanaged, within the budget alone,
        # until the shelf's reservations manage it through the hardware service.
        self.memory = KvMemory(
            self._lock, self.cache.bytes_per_position, self.limits.kv_budget_bytes, loaded.name
        )
        self.cache.limit = self.memory.limit
        self._waiting: WaitingQueue[SequenceHandle] = WaitingQueue(self.limits.aging_s)
        self._parked: dict[SequenceHandle, Running] = {}
        self._running: list[Running] = []  # index == cache row
        self._reserved = 0  # positions promised to running sequences
        self._steps = 0
        self._decode_deferred = False  # the last iteration skipped its decoding step
        self._reused_prompt_tokens = 0
        self._closing = False
        self._batch_sizes = BATCH_SEQUENCES.labels(loaded.name)
        self._worker = threading.Thread(target=self._work, name=f"batch-{loaded.name}")
        self._worker.daemon = True
        self._worker.start()

    # -- the caller's side ------------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], sampling: Sampling, priority: int = NORMAL
    ) -> SequenceHandle:
        """Queue a sequence in `priority`'s class; refuse at once what can never fit or when
        the queue is full."""
        handle = SequenceHandle(prompt_ids, sampling, priority)
        handle.waker = self._wake
        handle.low_water = self.limits.stream_buffer // 2
        if handle.footprint > self.loaded.context_length:
            raise InvalidArgument(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds {self.loaded.name}'s context of {self.loaded.context_length} tokens; "
                "lower max_tokens or shorten the prompt",
                reason="CONTEXT_EXCEEDED",
                metadata={"context_length": str(self.loaded.context_length)},
            )
        if handle.footprint > self.position_budget:
            raise ResourceExhausted(
                f"the prompt plus max_tokens needs {handle.footprint} cache positions; this "
                f"runtime's KV budget holds {self.position_budget}; lower max_tokens",
                reason="KV_BUDGET_EXCEEDED",
            )
        with self._lock:
            self._purge_cancelled_waiting()
            if len(self._waiting) >= self.limits.max_queued:
                raise ResourceExhausted(
                    f"{self.loaded.name} has {len(self._waiting)} requests waiting; retry shortly",
                    reason="RUNTIME_QUEUE_FULL",
                    metadata={"retry_after_ms": "500"},
                )
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running),
                waiting=len(self._waiting),
                reserved_positions=self._reserved,
                kv_allocated_bytes=self.cache.allocated_bytes,
                steps=self._steps,
                parked=len(self._parked),
                reused_prompt_tokens=self._reused_prompt_tokens,
            )

    def close(self) -> None:
        """Stop the worker; sequences still queued or running end as CANCELLED."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._worker.join(timeout=30)

    # -- the worker -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._closing):
                    self.cache.release()  # an idle engine holds no cache memory
                    self.memory.boundary(0, 0)
                    self._lock.wait()
                if self._closing:
                    self._abandon_all()
                    return
                widest = max((r.handle.footprint for r in self._running), default=0)
                self.memory.boundary(
                    self.cache.allocated_bytes, len(self._running) * widest, bool(self._waiting)
                )
                admitted = self._admit()
                if not admitted and not self._running:  # the first in line waits for memory
                    self.cache.release()
                    self._lock.wait(WAIT_POLL_S)
                    continue
            try:
                self._iterate(admitted)
            except Exception:
                log.exception("decoding step failed; ending the batch's sequences")
                with self._lock:
                    # Newcomers whose prefill failed are not in the batch yet: end them too.
                    for running in {id(r): r for r in [*self._running, *admitted]}.values():
                        if not running.finished:
                            running.finish(common_pb2.FINISH_REASON_ERROR)
                    self._running.clear()
                    self._reserved = 0

    def _admit(self) -> list[Running]:
        """Move waiting sequences into the batch, by priority with aging, while slots and
        the KV budget allow."""
        self._purge_cancelled_waiting()
        self._waiting.order(time.monotonic())
        admitted: list[Running] = []
        widest = max((r.handle.footprint for r in self._running), default=0)
        while self._waiting and len(self._running) + len(admitted) < self.limits.max_batch_size:
            handle = self._waiting[0]
            rows = len(self._running) + len(admitted) + 1
            # The cache is a rectangle, rows x the longest row: budget that, not the sum.
            if rows * max(widest, handle.footprint) > self.position_budget:
                break  # wait for running sequences to finish and free their room
            if not self.memory.fits(rows * max(widest, handle.footprint)):
                refusal = self.memory.short(
                    self._waiting,
                    rows - 1,
                    widest,
                    max_rows=self.limits.max_batch_size,
                    position_budget=self.position_budget,
                )
                if refusal is None:
                    break  # it waits for the hardware service to reserve more
                self._running_state(self._waiting.popleft()).refuse(refusal)
                continue
            widest = max(widest, handle.footprint)
            self._waiting.popleft()
            self._reserved += handle.footprint
            running = self._running_state(handle)
            running.final.kv = self.memory.admitted(handle, rows * widest)
            admitted.append(running)
        return admitted

    def _running_state(self, handle: SequenceHandle) -> Running:
        """A new sequence's state, or a parked one's, to be prefilled with what it has."""
        running = handle.resume
        if running is None:
            return Running(handle, self.loaded.decode, self.loaded.eos_token_ids)
        handle.resume = None
        running.length = len(running.prefill_ids)
        return running

    def _purge_cancelled_waiting(self) -> None:
        """End queued requests whose caller gave up; they free their queue place at once."""
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            self._running_state(handle).finish(common_pb2.FINISH_REASON_CANCELLED)

    @torch.inference_mode()
    def _iterate(self, admitted: list[Running]) -> None:
        """One iteration: drop cancelled rows, prefill newcomers, decode one token for all
        (unless newcomers arrived during this prefill: see `_defer_decode`)."""
        self._drop_cancelled()
        for chunk in self._prefill_chunks(admitted):
            self._prefill(chunk)
        if self._running and not self._defer_decode(bool(admitted)):
            self._decode_step()
        self._steps += 1

    def _defer_decode(self, prefilled: bool) -> bool:
        """Whether to skip this iteration's decoding step so that requests that arrived
        during its prefill are admitted and prefilled at once: a request arriving a moment
        after another (16 streams opened together reach the engine over some milliseconds)
        would otherwise wait for the first one's prefill and a decoding step too. Deferred
        once at most, so the running rows never wait more than two iterations' prefills."""
        with self._lock:
            defer = (
                prefilled
                and not self._decode_deferred
                and bool(self._waiting)
                and len(self._running) < self.limits.max_batch_size
            )
        self._decode_deferred = defer
        return defer

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].handle.cancelled:
                self._remove(row, common_pb2.FINISH_REASON_CANCELLED)

    def _prefill_chunks(self, admitted: list[Running]) -> list[list[Running]]:
        """The newcomers in prefill order, cut into forward passes. Within a priority class
        the shortest prompts go first: each chunk's sequences stream their first token when
        it ends, so short ones first lower the time to first token of most without delaying
        the last, and neighbours of similar length waste little on padding. The cut into
        forward passes is `prefill_plan.plan_chunks`'s."""
        if not admitted:
            return []
        now = time.monotonic()
        aging_s = self.limits.aging_s
        ordered = sorted(
            admitted,
            key=lambda r: (
                effective_class(r.handle.priority, now - r.handle.arrived, aging_s),
                len(r.prefill_ids),
            ),
        )
        _, held = self._held_prefix(common_prompt(ordered))
        return plan_chunks(ordered, held, self.limits.max_prefill_tokens)

    def _prefill(self, chunk: list[Running]) -> None:
        """Run the prompts of newcomers (padded to the longest) and take their first token.
        What a running row already holds is not computed again: the longest prefix every
        prompt of the chunk shares with a running row (the chat template's system prompt,
        for one) is copied from that row's cache, and only the rest is run."""
        first_row = len(self._running)
        donor, shared = self._held_prefix(common_prompt(chunk))
        prompts = [r.prefill_ids[shared:] for r in chunk]
        lengths = [len(ids) for ids in prompts]
        longest = max(lengths)
        self.cache.reserve(
            first_row + len(chunk), max(shared + longest, self._longest_running() + 1)
        )
        if shared:
            self.cache.copy_prefix(donor, first_row, len(chunk), shared)
            self._reused_prompt_tokens += shared * len(chunk)
        queries = shared + torch.arange(longest)
        positions = queries.expand(len(chunk), longest)
        inputs = torch.tensor([ids + [0] * (longest - len(ids)) for ids in prompts])
        mask = None
        if len(chunk) > 1 or shared:  # causal, and nothing past each prompt's own end
            keys = torch.arange(shared + longest)
            causal = keys[None, :] <= queries[:, None]
            valid = keys[None, :] < shared + torch.tensor(lengths)[:, None]
            mask = (causal[None] & valid[:, None, :])[:, None]
        self.cache.prepare(first_row, positions)
        hidden = self._forward(inputs, positions, mask)
        last = hidden[torch.arange(len(chunk)), torch.tensor(lengths) - 1]
        logits = self.loaded.forward.logits(last)
        with self._lock:
            self._running.extend(chunk)
        self._sample_and_emit(list(range(first_row, first_row + len(chunk))), logits)

    def _held_prefix(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(row, length): the running row whose cache holds the longest prefix of `tokens`,
        and that length (0 when no row shares any)."""
        best_row, best = 0, 0
        for row, running in enumerate(self._running):
            # A row has written the keys and values of its first `length` tokens.
            shared = shared_length([tokens, running.prefill_ids[: running.length]])
            if shared > best:
                best_row, best = row, shared
        return best_row, best

    def _decode_step(self) -> None:
        """Feed every running row its last token at its own position; take the next token."""
        batch = len(self._running)
        self._batch_sizes.observe(batch)
        positions = torch.tensor([[r.length] for r in self._running])
        self.cache.reserve(batch, int(positions.max()) + 1)
        inputs = torch.tensor([[r.last_token] for r in self._running])
        mask = None
        lengths = positions[:, 0]
        if batch > 1:  # each row sees only what it wrote, up to its own position
            kv_length = int(lengths.max()) + 1
            mask = (torch.arange(kv_length)[None, :] <= lengths[:, None])[:, None, None, :]
        self.cache.prepare(0, positions)
        hidden = self._forward(inputs, positions, mask)
        for running in self._running:
            running.length += 1
        logits = self.loaded.forward.logits(hidden[:, -1])
        self._sample_and_emit(list(range(batch)), logits)

    def _forward(
        self, inputs: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.loaded.forward.hidden(inputs, positions, mask, self.cache)

    def _sample_and_emit(self, rows: list[int], logits: torch.Tensor) -> None:
        leaving: list[tuple[int, FinishReason | None]] = []  # None: parked
        for index, row in enumerate(rows):
            running = self._running[row]
            token = next_token(logits[index], running.seen(), running.sampling, running.generator)
            reason = running.accept(token)
            if reason is not None:
                leaving.append((row, reason))
            elif running.handle.backlog >= self.limits.stream_buffer:
                leaving.append((row, None))  # its reader is behind
        for row, finish in sorted(leaving, key=lambda entry: entry[0], reverse=True):
            if finish is None:
                self._park(row)
            else:
                self._remove(row, finish)

    def _remove(self, row: int, reason: FinishReason) -> None:
        """End the sequence in `row`."""
        self._leave(row).finish(reason)

    def _leave(self, row: int) -> Running:
        """Take the sequence in `row` out of the batch, freeing its reservation; keep rows
        compact by moving the last one in."""
        with self._lock:
            running = self._running[row]
            last = self._running.pop()
            if last is not running:
                self.cache.move_row(len(self._running), row, last.length)
                self._running[row] = last
            self._reserved -= running.handle.footprint
        return running

    def _park(self, row: int) -> None:
        """Take the sequence in `row` out of the batch until its reader catches up."""
        with self._lock:
            running = self._leave(row)
            handle = running.handle
            handle.resume = running
            handle.parked = True
            self._parked[handle] = running
        # The reader may have caught up (or left) before `parked` was set: look again.
        if handle.backlog <= handle.low_water or handle.cancelled:
            self._wake(handle)

    def _wake(self, handle: SequenceHandle) -> None:
        """A parked sequence's reader caught up (back to the waiting queue) or its caller
        left (it ends now). Called from the event loop by the handle, or by `_park`."""
        with self._lock:
            running = self._parked.pop(handle, None)
            if running is None:
                return
            handle.parked = False
            if handle.cancelled:
                handle.resume = None
                running.finish(common_pb2.FINISH_REASON_CANCELLED)
                return
            self._waiting.append(handle)
            self._lock.notify()

    def _longest_running(self) -> int:
        return max((r.length for r in self._running), default=0)

    def _abandon_all(self) -> None:
        for running in self._running:
            running.finish(common_pb2.FINISH_REASON_CANCELLED)
        for handle in self._waiting:
            self._running_state(handle).finish(common_pb2.FINISH_REASON_CANCELLED)
        for parked in self._parked.values():
            parked.finish(common_pb2.FINISH_REASON_CANCELLED)
        self._running.clear()
        self._waiting.clear()
        self._parked.clear()
        self._reserved = 0


def load_model(
    name: str,
    model_dir: str,
    torch_threads: int = 0,
    weights: str = "float32",
    *,
    batched: bool = True,
) -> LoadedModel:
    """Load a Hugging Face model directory in float32 (these CPUs have no fast bf16), its
    weights then held as `weights` (services/runtime/weights.py: float32 or int8), for an
    engine that decodes several sequences at once (`batched`) or one at a time."""
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
    hold_weights(model, weights)
    forward: Forward = lean_forward_for(model, batched=batched) or HfForward(model)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        context_length=int(getattr(config, "max_position_embeddings", 2048)),
        eos_token_ids=eos_ids,
        parameters=parameters,
        # The lean pass's oneDNN copies are weights held too (llama_forward.py).
        weight_bytes=weight_bytes(model) + forward.packed_bytes,
        source=model_dir,
        forward=forward,
    )
