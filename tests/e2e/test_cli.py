"""The `llmos` command line against the real stack, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from stacktools import Stack, free_port_block

pytestmark = pytest.mark.model  # the real default model, converted once per session


def test_generate_prints_a_sensible_answer(stack: Stack) -> None:
    result = stack.llmos(
        "generate", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24"
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_streams_before_the_answer_is_complete(stack: Stack) -> None:
    command = [
        sys.executable, "-m", "llmos.kernel.cli", "generate", "Write a long story about a fox.",
        "--max-tokens", "200", "--temperature", "0.7", "--seed", "5", "--port", str(stack.port),
    ]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        first = process.stdout.read(1)
        still_running = process.poll() is None
        process.terminate()
    assert first, "no output at all"
    assert still_running, "the first character arrived only after the whole answer"


def test_generate_reports_bad_input_and_exits_non_zero(stack: Stack) -> None:
    result = stack.llmos("generate", "", "--max-tokens", "5")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "EMPTY_PROMPT" in result.stderr
    assert "prompt is empty" in result.stderr


def test_generate_usage_flag_reports_tokens(stack: Stack) -> None:
    result = stack.llmos("generate", "Hi", "--max-tokens", "4", "--temperature", "0", "--usage")
    assert result.returncode == 0, result.stderr
    assert "completion tokens" in result.stderr


def test_chat_keeps_the_conversation(stack: Stack) -> None:
    result = stack.llmos(
        "chat", "--temperature", "0", "--max-tokens", "30",
        stdin="Remember the number 42.\nWhat number did I ask you to remember?\n/exit\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Each answer follows an "assistant> " prompt; without the history, the model could
    # not know the number in the second one. (A number, not a name: the default privacy
    # policy hides names from the model.)
    answers = [part.split("\n")[0] for part in result.stdout.split("assistant> ")[1:]]
    assert len(answers) == 2, result.stdout
    assert "42" in answers[1]


def test_status_lists_every_service_healthy(stack: Stack) -> None:
    result = stack.llmos("status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    names = {service["name"] for service in report["services"]}
    assert names == {"kernel", "runtime", "safety", "privacy", "explain", "hardware"}
    assert all(service["health"] == "SERVING" for service in report["services"])
    table = stack.llmos("status")
    assert table.returncode == 0 and "runtime" in table.stdout


def test_status_fails_when_no_kernel_answers() -> None:
    port = free_port_block(1)
    result = subprocess.run(
        [sys.executable, "-m", "llmos.kernel.cli", "status", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "not reachable" in result.stderr


def test_probe_checks_grpc_health(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmos.kernel.cli", "probe", stack.kernel_address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and "SERVING" in result.stdout
