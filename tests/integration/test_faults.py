"""Faults injected into the real stack: a process dies and the system copes, visibly and fast."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from stacktools import Stack

from llmos.v1 import common_pb2, kernel_pb2

pytestmark = pytest.mark.model

# A long, sampled answer: it is still streaming when the runtime dies.
LONG = kernel_pb2.GenerateRequest(
    prompt="Write a long essay about the history of rivers and the cities built on them.",
    sampling=common_pb2.SamplingParams(temperature=0.7, max_tokens=400, seed=7),
)
SHORT = kernel_pb2.GenerateRequest(
    prompt="What is the capital of France?",
    sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=16),
)


def test_runtime_killed_mid_stream_gives_unavailable_at_once_and_comes_back(
    stack: Stack,
) -> None:
    runtime_pid = stack.services()["runtime"].pid
    received: list[kernel_pb2.GenerateResponse] = []
    with stack.channel() as channel:
        call = stack.kernel(channel).Generate(LONG, timeout=60)
        received.append(next(call))
        os.kill(runtime_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # If the error never came, a watchdog ends the call rather than hang the test.
        watchdog = threading.Timer(30, call.cancel)
        watchdog.start()
        try:
            with pytest.raises(grpc.RpcError) as caught:
                received.extend(call)
        finally:
            watchdog.cancel()
        noticed_in = time.monotonic() - killed_at

    assert received[0].task_id
    assert received[-1].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED, "not finished"
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert error.details(), "the message must say what failed"
    assert noticed_in < 2.0, f"the client learned of the dead runtime after {noticed_in:.2f}s"

    # The supervisor restarts the runtime; it registers again and the stack answers.
    stack.wait_healthy(timeout_s=60)
    assert stack.services()["runtime"].pid != runtime_pid
    with stack.channel() as channel:
        pieces = list(stack.kernel(channel).Generate(SHORT, timeout=60))
    assert "Paris" in "".join(p.text for p in pieces)
    assert pieces[-1].usage.completion_tokens > 0
