"""The runtime's waiting queue and flow control over real gRPC, with the real model: a
runtime process whose batch holds one sequence, so who gets the next place is visible.

- priority: with the batch full and batch requests waiting, an interactive request that
  arrives later takes the next free place;
- flow control: a reader that stops reading (a client whose HTTP/2 window is one byte)
  gets its sequence parked out of the batch after runtime_stream_buffer unread tokens,
  while another stream runs to its end; when it reads again its sequence comes back and
  finishes with exactly the tokens it would have had alone; one that never reads ends at
  its deadline and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stacktools import runtime_alone

from llmos.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

# The real default model, converted once per session; slow on a loaded 2-core machine.
pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

STREAM_BUFFER = 4
# A client that reads nothing it has not asked for: its window is one byte, so the server's
# writes wait for each read (no BDP probing to grow it).
SLOW_READER = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
COUNTING = "Count from 1 to 1000, separated by commas."
DEADLINE_S = 20


class Runtime:
    def __init__(self, address: str, metrics_port: int) -> None:
        self.address = address
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def metric(self, name: str) -> float:
        """The default model's sample of `name`, from the runtime's /metrics."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
        raise AssertionError(f"{name} is not exported")


@pytest.fixture(scope="module")
def runtime(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    env = {
        "LLMOS_RUNTIME_MAX_BATCH": "1",
        "LLMOS_RUNTIME_STREAM_BUFFER": str(STREAM_BUFFER),
        "LLMOS_RUNTIME_AGING_S": "600",  # no aging within a test: the order is the classes'
    }
    log_path = tmp_path_factory.mktemp("runtime") / "runtime.log"
    with runtime_alone(model_data_dir, log_path, env) as (_, address, metrics_port):
        yield Runtime(address, metrics_port)


def request(
    prompt: str, max_tokens: int, priority: int = common_pb2.PRIORITY_UNSPECIFIED
) -> runtime_pb2.RuntimeServiceGenerateRequest:
    return runtime_pb2.RuntimeServiceGenerateRequest(
        prompt=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
        priority=common_pb2.Priority.ValueType(priority),
    )


async def until(check: Callable[[], bool], what: str, within_s: float = 120.0) -> None:
    """Poll `check` until it holds; fail naming `what` if it never does."""
    give_up = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < give_up, f"never: {what}"
        await asyncio.sleep(0.05)


async def read_rest(
    call: grpc.aio.UnaryStreamCall,
) -> list[runtime_pb2.RuntimeServiceGenerateResponse]:
    """The rest of a stream already read from with `read()` (the two styles do not mix)."""
    pieces = []
    while (piece := await call.read()) is not grpc.aio.EOF:
        pieces.append(piece)
    return pieces


async def test_an_interactive_request_takes_the_next_place_ahead_of_earlier_batch_work(
    runtime: Runtime,
) -> None:
    order: list[str] = []

    async with grpc.aio.insecure_channel(runtime.address) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)

        async def run(name: str, call: grpc.aio.UnaryStreamCall) -> None:
            async for _ in call:
                if name not in order:  # the first message: it has its place in the batch
                    order.append(name)

        blocker = stub.Generate(request(COUNTING, 400, common_pb2.PRIORITY_BATCH), timeout=800)
        blocking = asyncio.create_task(run("blocker", blocker))
        await until(lambda: order == ["blocker"], "the blocker started")
        queued: list[asyncio.Task[None]] = []
        for index, (name, priority) in enumerate(
            [
                ("batch-0", common_pb2.PRIORITY_BATCH),
                ("batch-1", common_pb2.PRIORITY_BATCH),
                ("normal", common_pb2.PRIORITY_UNSPECIFIED),
                ("interactive", common_pb2.PRIORITY_INTERACTIVE),
            ]
        ):
            call = stub.Generate(request("Say hi.", 2, priority), timeout=800)
            queued.append(asyncio.create_task(run(name, call)))
            await until(
                lambda n=index + 1: runtime.metric("llmos_runtime_queued_sequences") == n,
                f"{name} queued behind the running blocker",
            )
        # Every request is queued in that order while the blocker holds the one place.
        assert runtime.metric("llmos_runtime_running_sequences") == 1
        assert order == ["blocker"]
        blocker.cancel()  # its place frees at the next step
        await asyncio.gather(*queued)
        await asyncio.gather(blocking, return_exceptions=True)

    assert order == ["blocker", "interactive", "normal", "batch-0", "batch-1"]


async def test_an_unknown_priority_is_refused(runtime: Runtime) -> None:
    async with grpc.aio.insecure_channel(runtime.address) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(request("Hi", 2, 7), timeout=60):
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority 7" in (caught.value.details() or "")


async def test_a_slow_reader_is_parked_while_another_stream_runs_and_resumes_exactly(
    runtime: Runtime,
) -> None:
    slow_request = request(COUNTING, 16)
    async with (
        grpc.aio.insecure_channel(runtime.address) as channel,
        grpc.aio.insecure_channel(runtime.address, options=SLOW_READER) as slow_channel,
    ):
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        alone = [p async for p in stub.Generate(slow_request, timeout=800)]
        expected = [t for p in alone for t in p.token_ids]
        assert len(expected) == 16  # long enough to be parked on the way

        slow = runtime_pb2_grpc.RuntimeServiceStub(slow_channel).Generate(slow_request, timeout=800)
        first = await slow.read()  # then it stops reading
        assert isinstance(first, runtime_pb2.RuntimeServiceGenerateResponse)
        await until(
            lambda: runtime.metric("llmos_runtime_parked_sequences") == 1,
            "the slow reader's sequence was parked",
        )
        assert runtime.metric("llmos_runtime_running_sequences") == 0  # out of the batch

        # Another stream takes the one place and runs to its end meanwhile.
        fast = [p async for p in stub.Generate(request(COUNTING, 8), timeout=800)]
        assert fast[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert sum(len(p.token_ids) for p in fast) == 8
        assert runtime.metric("llmos_runtime_parked_sequences") == 1
        # Parked, it costs no compute: the batch loop is idle.
        steps = runtime.metric("llmos_runtime_engine_steps_total")
        await asyncio.sleep(1.0)
        assert runtime.metric("llmos_runtime_engine_steps_total") == steps

        # Reading again brings it back; it finishes with the tokens it had alone.
        rest = await read_rest(slow)
        tokens = list(first.token_ids) + [t for p in rest for t in p.token_ids]
        assert tokens == expected
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 16
        assert runtime.metric("llmos_runtime_parked_sequences") == 0


async def test_a_reader_that_never_reads_ends_at_its_deadline_and_frees_everything(
    runtime: Runtime,
) -> None:
    async with grpc.aio.insecure_channel(runtime.address, options=SLOW_READER) as slow_channel:
        # Long enough to reach its first tokens and be parked on a loaded machine (a prefill
        # and STREAM_BUFFER steps at batch 1, a few seconds at a load of 10); the test then
        # waits it out, so every second here is a second of the suite.
        deadline = time.monotonic() + DEADLINE_S
        slow = runtime_pb2_grpc.RuntimeServiceStub(slow_channel).Generate(
            request(COUNTING, 200), timeout=DEADLINE_S
        )
        await slow.read()
        await until(
            lambda: runtime.metric("llmos_runtime_parked_sequences") == 1,
            "the silent reader's sequence was parked",
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.sleep(deadline - time.monotonic() + 1)  # reading nothing
            await read_rest(slow)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(
        lambda: runtime.metric("llmos_runtime_parked_sequences") == 0,
        "the expired sequence left the parked set",
    )
    assert runtime.metric("llmos_runtime_running_sequences") == 0
    assert runtime.metric("llmos_runtime_queued_sequences") == 0
    async with grpc.aio.insecure_channel(runtime.address) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        after = [p async for p in stub.Generate(request("Say hi.", 4), timeout=800)]
    assert after[-1].finish_reason in (
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    )
