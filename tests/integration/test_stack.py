"""The whole stack as separate processes (`llmos up`), with the real model, over real gRPC."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from stacktools import Stack

from llmos.kernel.stack import STACK
from llmos.services.errors import error_info
from llmos.v1 import common_pb2, kernel_pb2

pytestmark = pytest.mark.model  # the real default model, converted once per session

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=24)


def generate(stack: Stack, request: kernel_pb2.GenerateRequest, timeout: float = 60):
    with stack.channel() as channel:
        return list(stack.kernel(channel).Generate(request, timeout=timeout))


def test_every_process_registers_and_reports_serving(stack: Stack) -> None:
    services = stack.services()
    assert sorted(services) == sorted(spec.name for spec in STACK if spec.name != "kernel")
    for spec in STACK:
        address = stack.kernel_address if spec.name == "kernel" else services[spec.name].address
        assert address == f"127.0.0.1:{stack.port + spec.port_offset}"
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, spec.name
    assert all(s.health == common_pb2.SERVICE_HEALTH_SERVING for s in services.values())


def test_reflection_lists_the_kernel_service(stack: Stack) -> None:
    with stack.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "llmos.v1.KernelService" in names
    assert "grpc.health.v1.Health" in names


def test_generate_streams_a_real_answer(stack: Stack) -> None:
    request = kernel_pb2.GenerateRequest(prompt="What is the capital of France?", sampling=GREEDY)
    pieces = generate(stack, request)
    assert len(pieces) >= 3, "the answer should arrive as a stream, not one message"
    assert pieces[0].task_id, "the first message carries the task id"
    assert {p.model for p in pieces} - {""} == {"SmolLM2-135M-Instruct"}
    text = "".join(p.text for p in pieces)
    assert "Paris" in text
    last = pieces[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert last.usage.completion_tokens == sum(len(p.token_ids) for p in pieces)
    assert last.usage.prompt_tokens > 5


def test_chat_messages_keep_the_conversation(stack: Stack) -> None:
    request = kernel_pb2.GenerateRequest(
        messages=[
            # Not a name: the default privacy policy would hide a name from the model.
            common_pb2.ChatMessage(role="user", content="Remember the number 42."),
            common_pb2.ChatMessage(role="assistant", content="Got it: 42."),
            common_pb2.ChatMessage(role="user", content="What number did I ask you to remember?"),
        ],
        sampling=GREEDY,
    )
    text = "".join(p.text for p in generate(stack, request))
    assert "42" in text


def test_same_seed_same_sample(stack: Stack) -> None:
    sampling = common_pb2.SamplingParams(temperature=1.0, max_tokens=12, seed=1234)
    request = kernel_pb2.GenerateRequest(prompt="Tell me a story.", sampling=sampling)
    first = [t for p in generate(stack, request) for t in p.token_ids]
    second = [t for p in generate(stack, request) for t in p.token_ids]
    assert first == second


def test_max_tokens_bounds_the_answer(stack: Stack) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=3)
    request = kernel_pb2.GenerateRequest(prompt="Count from one to twenty.", sampling=sampling)
    last = generate(stack, request)[-1]
    assert last.usage.completion_tokens == 3
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_stop_sequence_ends_the_stream(stack: Stack) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=40, stop=["Paris"])
    request = kernel_pb2.GenerateRequest(prompt="What is the capital of France?", sampling=sampling)
    pieces = generate(stack, request)
    assert "Paris" not in "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == common_pb2.FINISH_REASON_STOP


BAD_REQUESTS = [
    (kernel_pb2.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_PROMPT"),
    (kernel_pb2.GenerateRequest(prompt="   "), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_PROMPT"),
    (
        kernel_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_MAX_TOKENS",
    ),
    (
        kernel_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=-5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_MAX_TOKENS",
    ),
    (
        kernel_pb2.GenerateRequest(
            prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=100_000)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CONTEXT_EXCEEDED",
    ),
    (
        kernel_pb2.GenerateRequest(prompt="hi", model="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    ),
    (
        kernel_pb2.GenerateRequest(prompt="x" * 40_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PROMPT_TOO_LONG",
    ),
    (
        kernel_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_TEMPERATURE",
    ),
    (
        kernel_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="wizard", content="hi")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_ROLE",
    ),
]


@pytest.mark.parametrize(("request_", "code", "reason"), BAD_REQUESTS)
def test_bad_input_is_refused_with_a_reason_and_the_stack_keeps_serving(
    stack: Stack, request_: kernel_pb2.GenerateRequest, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack, request_, timeout=30)
    error = caught.value
    assert error.code() == code, error.details()
    assert error.details(), "the message must say what to fix"
    info = error_info(error)
    assert info is not None and info.reason == reason and info.domain == "llmos.dev"
    ok = generate(stack, kernel_pb2.GenerateRequest(prompt="Say hi.", sampling=GREEDY))
    assert ok[-1].usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("address_offset", "call", "says"),
    [
        (
            4,
            lambda ch: ch.unary_unary("/llmos.v1.ExplainService/Attribute")(b""),
            "not implemented yet",
        ),
    ],
)
def test_unbuilt_rpcs_answer_unimplemented_naming_the_method(
    stack: Stack, address_offset: int, call, says: str
) -> None:
    address = f"127.0.0.1:{stack.port + address_offset}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert says in caught.value.details()


def test_client_deadline_bounds_the_downstream_call(stack: Stack) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.7, max_tokens=400, seed=1)
    request = kernel_pb2.GenerateRequest(
        prompt="Write a long essay about rivers.", sampling=sampling
    )
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        generate(stack, request, timeout=1.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    # The deadline reached the runtime: the sequence left its batch (400 tokens take ~20 s).
    stack.wait_runtime_idle(timeout_s=3)


def test_client_cancel_reaches_the_runtime(stack: Stack) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.7, max_tokens=400, seed=2)
    request = kernel_pb2.GenerateRequest(
        prompt="Write a long essay about trees.", sampling=sampling
    )
    with stack.channel() as channel:
        call = stack.kernel(channel).Generate(request, timeout=60)
        received = [next(call), next(call), next(call)]
        assert stack.runtime_batch() >= 1
        call.cancel()
    assert received[0].task_id
    # The cancel reached the runtime: the sequence left its batch at once.
    stack.wait_runtime_idle(timeout_s=3)


def test_list_models_reports_the_loaded_model(stack: Stack) -> None:
    with stack.channel() as channel:
        reply = stack.kernel(channel).ListModels(kernel_pb2.ListModelsRequest(), timeout=10)
    (model,) = reply.models
    assert model.name == "SmolLM2-135M-Instruct" and model.loaded
    assert 100_000_000 < model.parameters < 200_000_000
    assert model.context_length == 8192
    # Float32, plus the lean pass's oneDNN copy of every matmul weight (not the norms).
    assert model.parameters * 4 * 1.9 < model.weight_bytes < model.parameters * 4 * 2
