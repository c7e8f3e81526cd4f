"""Safety check latency: eager PyTorch MiniLM (the baseline) against the int8 ONNX encoder,
and whole checks over gRPC against a running safety service.

    python bench/safety.py [--address 127.0.0.1:PORT] [--runs 100]

Texts of 30 and 200 tokens (MiniLM's tokenizer, [CLS] and [SEP] included), and over gRPC
texts of the longest accepted length (262,144 characters, read in overlapping windows of
up to 256 tokens): numbered sentences, so no two windows are alike and every one is
encoded (`grpc_check_262144_chars`), and one sentence repeated, whose windows repeat and
are encoded once each (`..._repeated`: what the judge's deduplication saves).
Prints p50 and p95 in milliseconds as one JSON object, with the load average before and
after (a shared machine is noisy). Figures, never assertions (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

SENTENCE = "The committee reviewed the proposal and asked for a revised budget by Friday. "


def text_of(tokens: int, count: Callable[[str], int]) -> str:
    words = (SENTENCE * 40).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix with at most `tokens` tokens
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def timed(call: Callable[[], object], runs: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[int(0.95 * (len(samples) - 1))], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", help="a running safety service, host:port")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=Path(".llmos/safety-train/encoder"))
    args = parser.parse_args()
    from llmos.services.runtime.embeddings import Embedder
    from llmos.services.safety.encoder import Encoder

    onnx = Encoder.load(args.cache)
    eager = Embedder.load()
    texts = {n: text_of(n, onnx.tokens) for n in (30, 200)}
    result: dict[str, object] = {"tokens": {n: onnx.tokens(t) for n, t in texts.items()}}
    result["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    for n, text in texts.items():
        result[f"eager_torch_{n}"] = timed(lambda t=text: eager.embed([t]), args.runs)
        result[f"onnx_int8_{n}"] = timed(lambda t=text: onnx.encode([t]), args.runs)
    if args.address:
        import grpc

        from llmos.v1 import safety_pb2, safety_pb2_grpc

        stub = safety_pb2_grpc.SafetyServiceStub(grpc.insecure_channel(args.address))
        for n, text in texts.items():
            request = safety_pb2.SafetyServiceCheckRequest(
                text=text, direction=safety_pb2.DIRECTION_INPUT
            )
            result[f"grpc_check_{n}"] = timed(lambda r=request: stub.Check(r), args.runs)
        from llmos.services.safety.checks import MAX_TEXT_CHARS

        numbered = "".join(f"Item {i}: {SENTENCE}" for i in range(MAX_TEXT_CHARS // 20))
        repeated = SENTENCE * (MAX_TEXT_CHARS // len(SENTENCE) + 1)
        result["long_tokens"] = onnx.tokens(numbered[:MAX_TEXT_CHARS])
        for name, long_text in (("", numbered), ("_repeated", repeated)):
            request = safety_pb2.SafetyServiceCheckRequest(
                text=long_text[:MAX_TEXT_CHARS], direction=safety_pb2.DIRECTION_INPUT
            )
            result[f"grpc_check_{MAX_TEXT_CHARS}_chars{name}"] = timed(
                lambda r=request: stub.Check(r, timeout=300), max(3, args.runs // 20), warmup=1
            )
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
