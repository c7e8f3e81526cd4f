"""Score and Embed through the kernel, over real processes: a kernel and a runtime with the
real model, reached through `llmos score` / `llmos embed` and gRPC; and a kernel whose
calls cannot run (kernel_model_call_concurrency = 0) to see its admission refuse a full
queue with a retry-after hint and end a queued call at its deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kerneltools import Kernel, wait_for_runtime
from stacktools import DEFAULT_MODEL, free_port_block

from llmos.services.channels import TENANT_KEY
from llmos.services.errors import error_info
from llmos.services.runtime.models import resolve_model_dir
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc


def start(workdir: Path, env: dict[str, str], timeout_s: float) -> Kernel:
    """A kernel (SQLite store, no service stages) and its runtime, once it registered."""
    port = free_port_block(2)
    env = {
        **os.environ,
        "LLMOS_POLICY_STAGES": "",
        "LLMOS_POLICY_MANDATORY": "",
        "LLMOS_METRICS_PORT": "-1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    log = workdir / "stack.log"
    argv = [sys.executable, "-m", "llmos.kernel.cli", "serve"]
    common = ["--port", str(port), "--data-dir", str(workdir)]
    with log.open("ab") as out:
        kernel = subprocess.Popen(
            [*argv, "kernel", *common], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        runtime = subprocess.Popen(
            [*argv, "runtime", *common], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    started = Kernel(port, kernel, runtime, log, [*argv, "kernel", *common], env)
    try:
        wait_for_runtime(started, timeout_s)
    except BaseException:
        started.stop()
        raise
    return started


@pytest.fixture(scope="module")
def with_model(tmp_path_factory: pytest.TempPathFactory, model_data_dir: Path) -> Iterator[Kernel]:
    model = resolve_model_dir(DEFAULT_MODEL, model_data_dir, progress=lambda _: None)
    kernel = start(
        tmp_path_factory.mktemp("with-model"),
        {"LLMOS_RUNTIME_ENGINE": "model", "LLMOS_MODEL": str(model)},
        timeout_s=300,
    )
    yield kernel
    kernel.stop()


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    """Calls are admitted but never run; one may queue per class."""
    kernel = start(
        tmp_path_factory.mktemp("blocked"),
        {
            "LLMOS_RUNTIME_ENGINE": "echo",
            "LLMOS_KERNEL_MODEL_CALL_CONCURRENCY": "0",
            "LLMOS_KERNEL_MAX_QUEUED": "1",
        },
        timeout_s=60,
    )
    yield kernel
    kernel.stop()


def llmos(kernel: Kernel, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmos.kernel.cli", *args, "--port", str(kernel.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.model
def test_llmos_score_prints_each_tokens_logprob_as_json(with_model: Kernel) -> None:
    likely = llmos(with_model, "score", "The capital of France is", " Paris")
    assert likely.returncode == 0, likely.stderr
    scored = json.loads(likely.stdout)
    assert len(scored["tokens"]) >= 1
    assert all(t["logprob"] <= 0 for t in scored["tokens"])
    assert "".join(t["token"] for t in scored["tokens"]).strip() == "Paris"
    assert scored["total_logprob"] == pytest.approx(sum(t["logprob"] for t in scored["tokens"]))
    unlikely = json.loads(
        llmos(with_model, "score", "The capital of France is", " a banana").stdout
    )
    assert scored["total_logprob"] > unlikely["total_logprob"]


@pytest.mark.model
def test_llmos_embed_prints_one_unit_vector_per_text(with_model: Kernel) -> None:
    result = llmos(with_model, "embed", "How do I reset my password?", "Password reset help")
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)["embeddings"]
    assert len(first) == len(second) == 384
    assert sum(v * v for v in first) == pytest.approx(1.0, abs=1e-3)
    assert sum(a * b for a, b in zip(first, second, strict=True)) > 0.5


@pytest.mark.model
def test_bad_input_comes_back_with_the_runtimes_status_and_message(with_model: Kernel) -> None:
    with grpc.insecure_channel(with_model.address) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        for call, reason, words in [
            (
                lambda: stub.Embed(kernel_pb2.EmbedRequest(inputs=["ok", ""]), timeout=60),
                "EMPTY_INPUT",
                "input 1 is empty",
            ),
            (lambda: stub.Embed(kernel_pb2.EmbedRequest(), timeout=60), "EMPTY_INPUT", "no inputs"),
            (
                lambda: stub.Score(
                    kernel_pb2.ScoreRequest(context="Hello", continuation=""), timeout=60
                ),
                "EMPTY_CONTINUATION",
                "the continuation is empty",
            ),
            (
                lambda: stub.Score(
                    kernel_pb2.ScoreRequest(context="Hi", continuation=" x", priority=9), timeout=60
                ),
                "INVALID_PRIORITY",
                "priority 9",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value).reason == reason
            assert words in caught.value.details()
    # The CLI says the same, and exits 1.
    refused = llmos(with_model, "score", "Hello", "")
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT [EMPTY_CONTINUATION]" in refused.stderr


def test_a_full_queue_refuses_at_once_with_a_retry_after_hint(blocked: Kernel) -> None:
    with grpc.insecure_channel(blocked.address) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        tenant = ((TENANT_KEY, "acme"),)
        calls = [
            stub.Score.future(
                kernel_pb2.ScoreRequest(context="a", continuation=f" {word}"),
                timeout=3,
                metadata=tenant,
            )
            for word in ("b", "c")
        ]
        errors = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            errors.append(caught.value)
        # One took the normal class's one queue place and, never run, ended at its
        # deadline; the other was refused at once.
        refused = next(e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        info = error_info(refused)
        assert info.reason == "QUEUE_FULL"
        assert int(info.metadata["retry_after_ms"]) > 0
        assert "normal queue is full" in refused.details()
        assert sorted(e.code().name for e in errors) == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]
        # Another class has its own queue: an interactive call is queued, not refused.
        with pytest.raises(grpc.RpcError) as queued:
            stub.Score(
                kernel_pb2.ScoreRequest(
                    context="a", continuation=" b", priority=common_pb2.PRIORITY_INTERACTIVE
                ),
                timeout=1,
            )
        assert queued.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.model
def test_generate_tasks_of_every_class_reach_the_runtime_with_it(with_model: Kernel) -> None:
    """The kernel sends the class it dispatched a task at; the runtime accepts each."""
    with grpc.insecure_channel(with_model.address) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        for priority in (
            common_pb2.PRIORITY_INTERACTIVE,
            common_pb2.PRIORITY_NORMAL,
            common_pb2.PRIORITY_BATCH,
        ):
            request = kernel_pb2.GenerateRequest(
                prompt="Say hi.",
                sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2),
                priority=priority,
            )
            last = list(stub.Generate(request, timeout=300))[-1]
            assert last.finish_reason in (
                common_pb2.FINISH_REASON_STOP,
                common_pb2.FINISH_REASON_LENGTH,
            )
