"""`llmos top` against the real stack, as a user runs it: one frame for scripts, and the
live view refreshing in place on a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from stacktools import Stack, free_port_block

pytestmark = pytest.mark.model  # the real default model, converted once per session

SERVICES = ("runtime", "safety", "privacy", "explain", "hardware")


# The hardware service reads the kernel's service list at most once a second
# (services/hardware/registered.py), so a service registered a moment ago may have no RSS
# in the first frames: a frame with every service's RSS must come within this.
SNAPSHOT_CATCH_UP_S = 5.0


def service_row(frame: str, name: str) -> str:
    return next((line for line in frame.splitlines() if f" {name} " in line), "")


def has_rss(row: str) -> bool:
    return re.search(r"\d(\.\d)? [MG]iB", row) is not None


def test_top_once_prints_one_frame_of_services_tasks_cpu_memory_and_gpus(stack: Stack) -> None:
    give_up = time.monotonic() + SNAPSHOT_CATCH_UP_S
    while True:
        result = stack.llmos("top", "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        frame = result.stdout
        if all(has_rss(service_row(frame, name)) for name in SERVICES):
            break
        if time.monotonic() > give_up:
            break  # the asserts below say which row lacks it
        time.sleep(0.5)
    assert f"llmos top — kernel 127.0.0.1:{stack.port}" in frame
    services = stack.services()
    for name in SERVICES:
        row = service_row(frame, name)
        assert str(services[name].pid) in row and "SERVING" in row, (name, frame)
        assert has_rss(row), f"{name}'s RSS comes from the hardware service's snapshot"
    assert "tasks: " in frame and " running, " in frame and " queued" in frame
    assert "CPU " in frame and "cores, load " in frame
    assert "MEM " in frame and " available of " in frame and " reserved" in frame
    assert "GPUs: none (NVML" in frame or "NVIDIA" in frame
    assert "\x1b[" not in frame, "no terminal escapes when piped"


def test_top_once_without_a_kernel_says_so_and_fails() -> None:
    port = free_port_block(1)
    result = subprocess.run(
        [sys.executable, "-m", "llmos.kernel.cli", "top", "--once", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "the kernel is not reachable" in result.stdout


def test_top_refuses_a_too_short_interval() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmos.kernel.cli", "top", "--interval", "0.01"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--interval must be at least" in result.stderr


def test_top_on_a_terminal_redraws_in_place_until_interrupted(stack: Stack) -> None:
    leader, follower = pty.openpty()
    command = [
        sys.executable, "-m", "llmos.kernel.cli", "top", "--interval", "0.3",
        "--port", str(stack.port),
    ]  # fmt: skip
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "60"}
    process = subprocess.Popen(
        command,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        # As at a terminal: a test run started in the background by a shell without job
        # control inherits SIGINT ignored, and so would top (it then never sees Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 30
        while output.count(b"llmos top") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    output += os.read(leader, 65536)
                except OSError:
                    break
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, "Ctrl-C ends top normally"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    text = output.decode("utf-8", "replace")
    assert text.count("llmos top") >= 3, "several frames within 30 s at 0.3 s"
    # Rich redraws a live view by moving the cursor back up over the previous frame.
    assert "\x1b[1A" in text or "\x1b[2K" in text, "frames are redrawn in place, not appended"
    assert "hardware" in text and "MEM " in text
