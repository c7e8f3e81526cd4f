"""Start-up and single-stream figures of the local stack, printed as one JSON object.

    python bench/stack.py [--data-dir DIR] [--requests N] [--max-tokens N]

Starts `llmos up` on free ports (the model converted beforehand if needed, timed apart),
measures the time until `llmos status` reports every process healthy, then streams N
greedy completions one after another through the kernel and reports time to first token
and generated tokens per second. Stops the stack with SIGTERM and reports how long the
shutdown took. Figures, not assertions: see README "Measured".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from llmos.services.runtime.models import resolve_model_dir
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Write a short poem about autumn.",
    "List three uses of a paperclip.",
]


def free_base_port(size: int = 6) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = int(probe.getsockname()[1])
    return base if base + size < 65535 else free_base_port(size)


def status_ok(port: int) -> bool:
    command = [sys.executable, "-m", "llmos.kernel.cli", "status", "--port", str(port)]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=str(Path(".llmos/bench-data").resolve()))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    started = time.monotonic()
    resolve_model_dir("SmolLM2-135M-Instruct", args.data_dir, progress=lambda _: None)
    prepare_s = time.monotonic() - started

    port = free_base_port()
    env = {**os.environ, "LLMOS_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "llmos.kernel.cli", "up", "--port", str(port),
               "--data-dir", args.data_dir]  # fmt: skip
    started = time.monotonic()
    stack = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while not status_ok(port):
            if stack.poll() is not None or time.monotonic() - started > 300:
                raise SystemExit("the stack did not become healthy")
            time.sleep(0.25)
        healthy_s = time.monotonic() - started

        ttft: list[float] = []
        rates: list[float] = []
        tokens_total = 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            kernel = kernel_pb2_grpc.KernelServiceStub(channel)
            for index in range(args.requests):
                request = kernel_pb2.GenerateRequest(
                    prompt=PROMPTS[index % len(PROMPTS)],
                    sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                )
                sent = time.monotonic()
                first = None
                tokens = 0
                for piece in kernel.Generate(request, timeout=300):
                    if piece.token_ids and first is None:
                        first = time.monotonic()
                    tokens += len(piece.token_ids)
                done = time.monotonic()
                ttft.append((first or done) - sent)
                if tokens > 1 and first is not None:
                    rates.append((tokens - 1) / (done - first))
                tokens_total += tokens
    finally:
        stopping = time.monotonic()
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=120)
        shutdown_s = time.monotonic() - stopping

    print(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or "?"},
                "model_prepare_s": round(prepare_s, 2),
                "up_to_all_healthy_s": round(healthy_s, 2),
                "shutdown_s": round(shutdown_s, 2),
                "requests": args.requests,
                "generated_tokens": tokens_total,
                "ttft_p50_s": round(statistics.median(ttft), 3),
                "ttft_max_s": round(max(ttft), 3),
                "decode_tokens_per_s_p50": round(statistics.median(rates), 2) if rates else None,
                "decode_tokens_per_s_p10": round(percentile(rates, 0.1), 2) if rates else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
