"""The detection micro-batcher's logic (services/privacy/batching.py) with a stand-in for
`Detector.detect_many` that records the batches it was given: who gets which result, when
batches form, what a failure or a caller giving up does. The real detector through real
gRPC is in tests/integration/test_privacy_service.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from llmos.services.privacy.batching import DetectBatcher
from llmos.services.privacy.recognizers import Finding


class Recording:
    """detect_many that marks each text with one finding naming it, after an optional gate
    (so the test decides when the worker is busy)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: str | None = None

    def __call__(self, texts: list[str]) -> Sequence[list[Finding]]:
        self.gate.wait(10)
        self.batches.append(list(texts))
        if self.fail_on in texts:
            raise RuntimeError(f"cannot detect {self.fail_on!r}")
        return [[Finding("PERSON", 0, len(text), 0.85, "stub", text)] for text in texts]


async def test_concurrent_callers_each_get_their_own_findings_in_shared_batches() -> None:
    recording = Recording()
    batcher = DetectBatcher(recording, max_batch=8)
    recording.gate.clear()  # the first batch holds the worker while the rest queue
    first = asyncio.ensure_future(batcher.detect("text 0"))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.detect(f"text {i}")) for i in range(1, 40)]
    await asyncio.sleep(0.05)
    recording.gate.set()
    results = await asyncio.gather(first, *rest)
    batcher.close()

    assert [r[0].explanation for r in results] == [f"text {i}" for i in range(40)]
    assert recording.batches[0] == ["text 0"]  # a lone request did not wait for company
    assert [len(b) for b in recording.batches[1:]] == [8, 8, 8, 8, 7]  # the queue, batched
    assert sorted(t for b in recording.batches for t in b) == sorted(f"text {i}" for i in range(40))
    assert (batcher.batches, batcher.texts) == (6, 40)


async def test_a_caller_that_gives_up_leaves_the_others_their_results() -> None:
    recording = Recording()
    batcher = DetectBatcher(recording, max_batch=8)
    recording.gate.clear()
    busy = asyncio.ensure_future(batcher.detect("busy"))
    await asyncio.sleep(0.05)
    calls = [asyncio.ensure_future(batcher.detect(f"t{i}")) for i in range(5)]
    await asyncio.sleep(0)
    calls[2].cancel()  # a deadline passed while it waited
    recording.gate.set()
    done = await asyncio.gather(busy, *calls, return_exceptions=True)
    batcher.close()

    assert isinstance(done[3], asyncio.CancelledError)
    assert [r[0].explanation for r in done if isinstance(r, list)] == [
        "busy",
        "t0",
        "t1",
        "t3",
        "t4",
    ]
    assert "t2" not in recording.batches[1]  # not detected for nobody


async def test_a_failed_batch_fails_its_callers_and_the_next_batch_still_runs() -> None:
    recording = Recording()
    batcher = DetectBatcher(recording, max_batch=4)
    recording.fail_on = "bad"
    recording.gate.clear()
    busy = asyncio.ensure_future(batcher.detect("busy"))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(batcher.detect(t)) for t in ("a", "bad", "c", "d", "e")]
    recording.gate.set()
    done = await asyncio.gather(busy, *queued, return_exceptions=True)
    after = await batcher.detect("later")
    batcher.close()

    assert recording.batches[1] == ["a", "bad", "c", "d"]
    assert all(isinstance(r, RuntimeError) for r in done[1:5])
    assert done[5][0].explanation == "e"  # type: ignore[index]
    assert after[0].explanation == "later"


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        DetectBatcher(Recording(), max_batch=0)
