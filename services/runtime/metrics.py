"""The model runtime's Prometheus metrics: tokens, latencies, the batch and the KV cache.

Three sources, each where the fact is known:
- the Generate handler (`StreamMeter`) counts the tokens it streams and times them as it
  receives them from the engine: time to first token from the request's arrival, and
  the gap between tokens, as the caller's stream sees them;
- the engine observes the size of every decoding step's batch (`BATCH_SEQUENCES`);
- a collector reads each engine's `EngineStats` at scrape time (running and queued
  sequences, KV-cache bytes, steps), so the batch thread never does extra work for it.

Imported by every runtime process (`llmos.services.metrics.KIND_COLLECTORS`), the echo
runtime's too, so it imports no torch; the engine imports it as well, so the in-process
engine tests record without an endpoint.

The names, types and labels are listed in docs/operator-guide.md#metrics (a contract
test keeps that table equal to what is defined here).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmos.v1 import common_pb2

if TYPE_CHECKING:  # both import torch; this module must not (the echo runtime has none)
    from llmos.services.runtime.sequences import Event
    from llmos.services.runtime.shelf import Shelf

# Measured on these CPUs: TTFT 0.1-1 s alone to several seconds under a 32-stream storm.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
# A decoding step of the default model takes ~10-100 ms depending on the batch.
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
# Powers of two up to past the largest sensible runtime_max_batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

GENERATED_TOKENS = Counter(
    "llmos_runtime_generated_tokens_total",
    "Tokens streamed to Generate callers; rate() of it is the runtime's tokens per second.",
    ["model"],
)
PROMPT_TOKENS = Counter(
    "llmos_runtime_prompt_tokens_total",
    "Prompt tokens of the Generate requests the engine accepted (chat template applied).",
    ["model"],
)
REQUESTS = Counter(
    "llmos_runtime_requests_total",
    "Generate streams that ended, by finish reason (stop, length, cancelled, error), or "
    "abandoned when the caller left first (client cancel, deadline).",
    ["model", "finish_reason"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmos_runtime_time_to_first_token_seconds",
    "From a Generate request's arrival at the engine to its first token reaching the "
    "handler: queueing, prefill and the first sampling step.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "llmos_runtime_inter_token_latency_seconds",
    "Time between two consecutive tokens of one Generate stream, as the handler gets them.",
    ["model"],
    buckets=ITL_BUCKETS,
)
BATCH_SEQUENCES = Histogram(
    "llmos_runtime_batch_sequences",
    "Sequences decoded together in one decoding step (the continuous batch's size).",
    ["model"],
    buckets=BATCH_BUCKETS,
)

FINISH_LABELS = {
    value: name.removeprefix("FINISH_REASON_").lower()
    for name, value in common_pb2.FinishReason.items()
}
ABANDONED = "abandoned"


class StreamMeter:
    """Records one Generate stream: its tokens, time to first token, gaps between tokens.

    The handler feeds it every event it takes from the engine and closes it in its
    `finally`; a stream that ends before its final event counts as abandoned.
    """

    def __init__(self, model: str, arrived: float, prompt_tokens: int) -> None:
        self.model = model
        self.arrived = arrived
        self._last_token_at: float | None = None
        self._ended = False
        self._tokens = GENERATED_TOKENS.labels(model)
        PROMPT_TOKENS.labels(model).inc(prompt_tokens)

    def event(self, event: Event) -> None:
        now = time.monotonic()
        # The final event alone can carry a first token: an end-of-sequence token is
        # sampled (so the usage reports a time to first token) but never streamed.
        sampled = bool(event.token_ids) or event.time_to_first_token_s > 0
        if sampled and self._last_token_at is None:
            TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - self.arrived)
            self._last_token_at = now
        elif event.token_ids and self._last_token_at is not None:
            INTER_TOKEN_LATENCY.labels(self.model).observe(now - self._last_token_at)
            self._last_token_at = now
        if event.token_ids:
            self._tokens.inc(len(event.token_ids))
        if event.finish_reason is not None:
            self._ended = True
            REQUESTS.labels(self.model, FINISH_LABELS.get(event.finish_reason, "unknown")).inc()

    def close(self) -> None:
        if not self._ended:
            self._ended = True
            REQUESTS.labels(self.model, ABANDONED).inc()


class ShelfCollector(Collector):
    """Reads every loaded model's engine when Prometheus scrapes.

    `Engine.stats()` takes the engine's lock for a moment; the scrape runs on the metrics
    server's thread, never on the event loop or the batch thread.
    """

    def __init__(self) -> None:
        self.shelf: Shelf | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.shelf)

    @staticmethod
    def _families(shelf: Shelf | None) -> Iterator[Metric]:
        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["model"])

        running = gauge(
            "llmos_runtime_running_sequences",
            "Sequences in the model's continuous batch now (one cache row each).",
        )
        queued = gauge(
            "llmos_runtime_queued_sequences",
            "Requests waiting for a place in the batch (bounded by runtime_max_queued).",
        )
        parked = gauge(
            "llmos_runtime_parked_sequences",
            "Sequences out of the batch until their slow reader catches up (flow control; "
            "runtime_stream_buffer).",
        )
        limit = gauge(
            "llmos_runtime_batch_limit_sequences",
            "The most sequences decoded together (runtime_max_batch).",
        )
        allocated = gauge(
            "llmos_runtime_kv_cache_allocated_bytes",
            "Memory the KV cache holds now; released when the engine is idle.",
        )
        reserved = gauge(
            "llmos_runtime_kv_cache_reserved_bytes",
            "KV-cache memory promised to running sequences (prompt + max_tokens each).",
        )
        budget = gauge(
            "llmos_runtime_kv_cache_budget_bytes",
            "KV-cache memory the running sequences may reserve (runtime_kv_budget_mb).",
        )
        granted = gauge(
            "llmos_runtime_kv_cache_granted_bytes",
            "Host memory the hardware service holds for the model's KV cache, which the "
            "cache grows within; no series while no hardware service manages it.",
        )
        weights = gauge("llmos_runtime_model_weight_bytes", "Memory taken by the model's weights.")
        steps = CounterMetricFamily(
            "llmos_runtime_engine_steps",
            "Iterations of the batch loop (admit, prefill newcomers, decode one token each).",
            labels=["model"],
        )
        reused = CounterMetricFamily(
            "llmos_runtime_prompt_tokens_reused",
            "Prompt tokens whose keys and values were copied from a running sequence's cache "
            "(a shared prefix, such as the chat template's system prompt) instead of computed.",
            labels=["model"],
        )
        engines = list(shelf.engines.values()) if shelf is not None else []
        for engine in engines:
            model = [engine.loaded.name]
            stats = engine.stats()
            running.add_metric(model, stats.running)
            queued.add_metric(model, stats.waiting)
            parked.add_metric(model, stats.parked)
            limit.add_metric(model, engine.limits.max_batch_size)
            allocated.add_metric(model, stats.kv_allocated_bytes)
            reserved.add_metric(model, stats.reserved_positions * engine.cache.bytes_per_position)
            budget.add_metric(model, engine.limits.kv_budget_bytes)
            if engine.memory.granted is not None:
                granted.add_metric(model, engine.memory.granted)
            weights.add_metric(model, engine.loaded.weight_bytes)
            steps.add_metric(model, stats.steps)
            reused.add_metric(model, stats.reused_prompt_tokens)
        yield from (
            running,
            queued,
            parked,
            limit,
            allocated,
            reserved,
            budget,
            granted,
            weights,
            steps,
            reused,
        )


SHELF = ShelfCollector()
REGISTRY.register(SHELF)


def watch_shelf(shelf: Shelf) -> None:
    """Report the engines of `shelf` (one runtime per process: replaces any earlier one)."""
    SHELF.shelf = shelf
