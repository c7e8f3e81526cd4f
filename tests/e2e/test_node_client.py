"""A Node.js client (@grpc/grpc-js + proto-loader) streams from the real stack: the contract
works from another language, with the same status codes and the same cancel semantics."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from stacktools import DEFAULT_MODEL, REPO, Stack

pytestmark = [pytest.mark.node, pytest.mark.model]

NODE_DIR = REPO / "tests" / "e2e" / "node"
CLIENT = NODE_DIR / "generate.mjs"
QUESTION = "What is the capital of France?"
INVALID_ARGUMENT = 3  # grpc.status.INVALID_ARGUMENT in every language


def node_client(stack: Stack, *args: str, timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    """Run generate.mjs against the stack: (exit status, its JSON line, its stderr)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (>= 20) is not installed: the cross-language tests need `node`")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (NODE_DIR / "node_modules" / package).is_dir():
            pytest.fail(f"{package} is missing: run `npm ci` in {NODE_DIR.relative_to(REPO)}")
    done = subprocess.run(
        [node, str(CLIENT), stack.kernel_address, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no JSON from the Node client (status {done.returncode}): {done.stderr}"
    return done.returncode, json.loads(lines[-1]), done.stderr


def assert_answers_paris(stack: Stack) -> None:
    status, reply, streamed = node_client(stack, QUESTION, "24")
    assert status == 0, reply
    assert "error" not in reply, reply
    assert reply["text"].strip() and "Paris" in reply["text"], reply
    assert reply["taskId"], reply
    assert reply["model"] == DEFAULT_MODEL
    assert reply["messages"] >= 3, "the answer should arrive as a stream, not one message"
    assert reply["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH"), reply
    assert 0 < reply["completionTokens"] <= 24, reply
    # The deltas went to stderr as they arrived, and add up to the text.
    assert reply["text"] in streamed


def test_node_client_streams_a_real_answer(stack: Stack) -> None:
    assert_answers_paris(stack)


def test_node_client_sees_invalid_argument_for_an_empty_prompt(stack: Stack) -> None:
    status, reply, _ = node_client(stack, "")
    assert status == 1, reply
    assert reply["error"]["code"] == INVALID_ARGUMENT, reply
    assert "prompt" in reply["error"]["details"], reply


def test_node_client_cancel_then_the_stack_still_answers(stack: Stack) -> None:
    status, reply, _ = node_client(
        stack, "Write a long essay about trees.", "400", "--cancel-after", "2"
    )
    assert status == 0, reply
    assert reply["cancelled"] is True and reply["messages"] == 2, reply
    assert_answers_paris(stack)
