"""Throughput and latency of the model runtime against plain Hugging Face, as one JSON object.

    python bench/runtime.py [--concurrency 1,4,16,32] [--seed 0] [--data-dir DIR]
                            [--address HOST:PORT] [--only hf|runtime] [--quick]

For each concurrency C the same request set is served three ways, all with greedy decoding
(temperature 0), so every method generates the same tokens and does the same work:

  runtime          the model runtime over gRPC: C `RuntimeService.Generate` streams started
                   together (a runtime process is started on free ports unless --address
                   is given). Whatever engine the runtime has is what gets measured.
  hf_sequential    `model.generate()` on one request after another, in this process.
  hf_static_batch  the C requests left-padded into one `generate()` call that runs to the
                   longest max_tokens of the set; only each request's own tokens count.

A request set holds C chat prompts (stories, explanations, lists: prompts that make the model
write at length) with max_tokens drawn uniformly from 16..128 by an RNG seeded with --seed
and C. At C=1 it holds 4 requests served one at a time. --quick shrinks everything for a
smoke run (concurrency 1,4 unless given, 2 requests at C=1, max_tokens 8..24).

Figures per method and concurrency (times in seconds):

  generated_tokens      tokens produced, end-of-sequence excluded; `stopped_by_eos` says how
                        many requests ended on EOS before their max_tokens.
  tokens_per_s          generated tokens / wall time, wall time running from issuing a round
                        of C requests to its last token, summed over rounds.
  ttft_*                time to first token, measured from the moment the request was issued:
                        all C requests are issued together, so a method that serves them one
                        after another makes the later ones wait. hf_sequential also reports
                        `own_ttft_*`, measured from the start of the request's own generate().
  itl_*                 gaps between consecutive tokens of a request (for the runtime, between
                        stream messages carrying tokens), pooled over requests.
  fraction_of_arithmetic_limit
                        tokens_per_s * 2 * parameters / measured matmul FLOP/s: the share of
                        the machine's dense fp32 arithmetic the method turns into tokens
                        (2 FLOPs per parameter per token; attention ignored).
  identical_to_hf_sequential
                        requests whose token ids equal hf_sequential's (batching and padding
                        can change float rounding and with it a greedy choice).

`ratios` divides the runtime's tokens_per_s by each Hugging Face method's. `machine` holds the
measured fp32 GFLOP/s of a 2048x2048 torch.matmul, the CPU count, torch's thread count and
the library versions, and the 1-minute load average at start and end (other work on the
machine skews every figure). Figures, not assertions: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import torch
import transformers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers.generation.streamers import BaseStreamer

from llmos.services.runtime.models import resolve_model_dir
from llmos.v1 import common_pb2, runtime_pb2, runtime_pb2_grpc

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "List twenty ideas for a weekend trip, with one sentence about each.",
    "Write a detailed essay about the history of the printing press.",
    "Explain photosynthesis to a curious ten-year-old, with examples.",
    "Tell a fairy tale about a dragon who is afraid of the dark.",
    "Describe, step by step, how to bake a loaf of bread at home.",
    "List fifteen tips for learning a new language and explain each one.",
    "Explain how the internet delivers a web page, from typing the address to the screen.",
    "Write a diary entry of a sailor crossing the Atlantic in 1850.",
    "Explain the water cycle and why it matters for farming.",
    "Write a short story about two robots who become friends in a junkyard.",
    "List the planets of the solar system and describe each in a few sentences.",
    "Explain how vaccines train the immune system, in plain words.",
    "Write a detailed guide to starting a vegetable garden.",
    "Tell the story of a detective solving a mystery in a small mountain village.",
]
MIN_REQUESTS = 4
QUICK_MIN_REQUESTS = 2
MAX_TOKENS_RANGE = (16, 128)
QUICK_MAX_TOKENS_RANGE = (8, 24)
REQUEST_TIMEOUT_S = 3600.0


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


@dataclasses.dataclass
class Trace:
    """What one request produced, with times on the monotonic clock."""

    issued: float
    token_times: list[float] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    started: float | None = None
    stopped_by_eos: bool = False
    error: str | None = None


@dataclasses.dataclass
class Run:
    """One method at one concurrency: a trace per request and the summed round wall time."""

    traces: list[Trace]
    wall_s: float


# ---------------------------------------------------------------------------- request sets


def build_rounds(concurrency: int, seed: int, quick: bool) -> list[list[Request]]:
    """The request set for one concurrency, cut into rounds of `concurrency` issued together."""
    rng = random.Random(seed * 1_000_003 + concurrency)
    low, high = QUICK_MAX_TOKENS_RANGE if quick else MAX_TOKENS_RANGE
    count = max(concurrency, QUICK_MIN_REQUESTS if quick else MIN_REQUESTS)
    start = rng.randrange(len(PROMPTS))
    requests = [
        Request(PROMPTS[(start + index) % len(PROMPTS)], rng.randint(low, high))
        for index in range(count)
    ]
    return [requests[i : i + concurrency] for i in range(0, count, concurrency)]


# ---------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(run: Run, flops_per_s: float, parameters: int) -> dict[str, Any]:
    """The figures of one method at one concurrency (see the module docstring)."""
    traces = run.traces
    tokens = sum(len(trace.token_ids) for trace in traces)
    ttft = [trace.token_times[0] - trace.issued for trace in traces if trace.token_times]
    gaps = [b - a for trace in traces for a, b in pairwise(trace.token_times)]
    rate = tokens / run.wall_s if run.wall_s > 0 else 0.0
    summary: dict[str, Any] = {
        "requests": len(traces),
        "generated_tokens": tokens,
        "stopped_by_eos": sum(trace.stopped_by_eos for trace in traces),
        "errors": [trace.error for trace in traces if trace.error],
        "wall_s": rounded(run.wall_s, 3),
        "tokens_per_s": rounded(rate, 2),
        "ttft_p50_s": rounded(percentile(ttft, 0.5)),
        "ttft_p95_s": rounded(percentile(ttft, 0.95)),
        "ttft_max_s": rounded(max(ttft, default=None)),
        "itl_p50_s": rounded(percentile(gaps, 0.5)),
        "itl_p95_s": rounded(percentile(gaps, 0.95)),
        "fraction_of_arithmetic_limit": rounded(rate * 2 * parameters / flops_per_s),
    }
    own = [t.token_times[0] - t.started for t in traces if t.token_times and t.started is not None]
    if own:
        summary["own_ttft_p50_s"] = rounded(percentile(own, 0.5))
        summary["own_ttft_p95_s"] = rounded(percentile(own, 0.95))
    return summary


def identical(run: Run, reference: Run) -> int:
    """How many requests generated exactly the reference's token ids."""
    pairs = zip(run.traces, reference.traces, strict=True)
    return sum(a.token_ids == b.token_ids for a, b in pairs)


def ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> float | None:
    if not numerator or not denominator or not denominator["tokens_per_s"]:
        return None
    return round(numerator["tokens_per_s"] / denominator["tokens_per_s"], 3)


# ---------------------------------------------------------------------------- machine


def matmul_gflops(size: int = 2048, warmup: int = 3, repetitions: int = 10) -> float:
    """Measured fp32 GFLOP/s of a size x size torch.matmul (2 * size^3 FLOPs each)."""
    a = torch.randn(size, size, dtype=torch.float32)
    b = torch.randn(size, size, dtype=torch.float32)
    for _ in range(warmup):
        torch.matmul(a, b)
    started = time.perf_counter()
    for _ in range(repetitions):
        torch.matmul(a, b)
    elapsed = time.perf_counter() - started
    return 2 * size**3 * repetitions / elapsed / 1e9


def machine_facts(gflops: float, load_at_start: float) -> dict[str, Any]:
    """The machine and libraries; a load average well above 0 means the figures are noisy."""
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "matmul_fp32_gflops": round(gflops, 2),
        "load_average_1m_at_start": round(load_at_start, 2),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- Hugging Face


class StepClock(BaseStreamer):
    """Timestamps every decoding step of `generate()`; the first put() is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.monotonic())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@dataclasses.dataclass
class HfModel:
    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    parameters: int

    def encode(self, request: Request) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            request.messages(), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def useful(self, generated: list[int], max_tokens: int) -> tuple[list[int], bool]:
        """A request's own tokens: its first max_tokens, up to (not including) EOS."""
        for index, token in enumerate(generated[:max_tokens]):
            if token in self.eos_ids:
                return generated[:index], True
        return generated[:max_tokens], False


def load_hf(model_dir: Path) -> HfModel:
    """The model in float32 and its tokenizer set up for left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parameters = sum(p.numel() for p in model.parameters())
    return HfModel(model, tokenizer, eos_ids, parameters)


@torch.inference_mode()
def hf_generate(hf: HfModel, batch: dict[str, torch.Tensor], max_new_tokens: int) -> Any:
    clock = StepClock()
    output = hf.model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=hf.tokenizer.pad_token_id,
        streamer=clock,
    )
    return output, clock.times


def single(ids: list[int]) -> dict[str, torch.Tensor]:
    """A batch of one unpadded prompt."""
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}


def hf_warm_up(hf: HfModel) -> None:
    hf_generate(hf, single(hf.encode(Request(PROMPTS[0], 4))), 4)


def hf_sequential(hf: HfModel, rounds: list[list[Request]]) -> Run:
    """Each round issued at once, then served one request after another."""
    traces: list[Trace] = []
    wall = 0.0
    for requests in rounds:
        issued = time.monotonic()
        for request in requests:
            ids = hf.encode(request)
            trace = Trace(issued=issued, started=time.monotonic())
            output, times = hf_generate(hf, single(ids), request.max_tokens)
            trace.token_ids, trace.stopped_by_eos = hf.useful(
                output[0, len(ids) :].tolist(), request.max_tokens
            )
            trace.token_times = times[: len(trace.token_ids)]
            traces.append(trace)
        wall += time.monotonic() - issued
    return Run(traces, wall)


def hf_static_batch(hf: HfModel, rounds: list[list[Request]]) -> Run:
    """Each round as one left-padded generate() running to the round's longest max_tokens."""
    traces: list[Trace] = []
    wall = 0.0
    for requests in rounds:
        issued = time.monotonic()
        encoded = [hf.encode(request) for request in requests]
        batch = hf.tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
        longest = max(request.max_tokens for request in requests)
        output, times = hf_generate(hf, dict(batch), longest)
        width = batch["input_ids"].shape[1]
        for row, request in enumerate(requests):
            trace = Trace(issued=issued)
            trace.token_ids, trace.stopped_by_eos = hf.useful(
                output[row, width:].tolist(), request.max_tokens
            )
            trace.token_times = times[: len(trace.token_ids)]
            traces.append(trace)
        wall += time.monotonic() - issued
    return Run(traces, wall)


# ---------------------------------------------------------------------------- runtime


def free_base_port() -> int:
    """A kernel port P whose runtime port P + 1 is free too (the kernel is never started)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = int(probe.getsockname()[1]) - 1
    return base if 1024 < base < 65534 else free_base_port()


def serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class RuntimeProcess:
    """`llmos serve runtime` on free ports, stopped with SIGTERM on exit."""

    def __init__(self, data_dir: str) -> None:
        port = free_base_port()
        self.address = f"127.0.0.1:{port + 1}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-runtime-", suffix=".log")  # noqa: SIM115
        command = [sys.executable, "-m", "llmos.kernel.cli", "serve", "runtime",
                   "--port", str(port), "--data-dir", data_dir]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_serving(self, limit_s: float = 600.0) -> None:
        started = time.monotonic()
        while not serving(self.address):
            if self.process.poll() is not None or time.monotonic() - started > limit_s:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-3000:]
                raise SystemExit(f"the runtime did not become SERVING:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def runtime_request(request: Request) -> runtime_pb2.RuntimeServiceGenerateRequest:
    return runtime_pb2.RuntimeServiceGenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=request.prompt)],
        sampling=common_pb2.SamplingParams(
            temperature=0.0, repetition_penalty=1.0, max_tokens=request.max_tokens
        ),
    )


async def runtime_stream(
    stub: runtime_pb2_grpc.RuntimeServiceStub, request: Request, trace: Trace
) -> None:
    """One Generate stream, its token arrivals written into `trace`."""
    try:
        call = stub.Generate(runtime_request(request), timeout=REQUEST_TIMEOUT_S)
        async for response in call:
            if response.token_ids:
                trace.token_times.append(time.monotonic())
                trace.token_ids.extend(response.token_ids)
            if response.HasField("usage"):
                trace.stopped_by_eos = (
                    response.finish_reason == common_pb2.FINISH_REASON_STOP
                    and len(trace.token_ids) < request.max_tokens
                )
    except grpc.aio.AioRpcError as error:
        trace.error = f"{error.code().name}: {error.details()}"


async def runtime_rounds(address: str, rounds: list[list[Request]]) -> Run:
    """Each round's requests started together as concurrent streams on one channel."""
    traces: list[Trace] = []
    wall = 0.0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
        await runtime_stream(stub, Request(PROMPTS[0], 4), Trace(issued=0.0))  # warm-up
        for requests in rounds:
            issued = time.monotonic()
            batch = [Trace(issued=issued) for _ in requests]
            pairs = zip(requests, batch, strict=True)
            await asyncio.gather(*(runtime_stream(stub, r, t) for r, t in pairs))
            ends = [t.token_times[-1] for t in batch if t.token_times]
            wall += max(ends, default=time.monotonic()) - issued
            traces.extend(batch)
    return Run(traces, wall)


# ---------------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", help="comma-separated, default 1,4,16,32 (1,4 quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(Path(".llmos/bench-data").resolve()))
    parser.add_argument("--address", help="a running runtime's host:port; none starts one")
    parser.add_argument("--only", choices=["hf", "runtime"])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    args = parser.parse_args()
    default = "1,4" if args.quick else "1,4,16,32"
    args.levels = [int(part) for part in (args.concurrency or default).split(",") if part]
    return args


def each_level(args: argparse.Namespace) -> Iterator[tuple[int, list[list[Request]]]]:
    for level in args.levels:
        yield level, build_rounds(level, args.seed, args.quick)


def measure_runtime(args: argparse.Namespace) -> dict[int, Run]:
    process = None if args.address else RuntimeProcess(args.data_dir)
    try:
        if process is not None:
            progress(f"starting a runtime on {process.address}")
            process.wait_serving()
        address = args.address or process.address  # type: ignore[union-attr]
        runs = {}
        for level, rounds in each_level(args):
            progress(f"runtime, concurrency {level}")
            runs[level] = asyncio.run(runtime_rounds(address, rounds))
        return runs
    finally:
        if process is not None:
            process.stop()


def measure_hf(hf: HfModel, args: argparse.Namespace) -> dict[int, tuple[Run, Run]]:
    hf_warm_up(hf)
    runs = {}
    for level, rounds in each_level(args):
        progress(f"hf sequential, concurrency {level}")
        sequential = hf_sequential(hf, rounds)
        progress(f"hf static batch, concurrency {level}")
        runs[level] = (sequential, hf_static_batch(hf, rounds))
    return runs


def report_level(
    rounds: list[list[Request]],
    runtime: Run | None,
    hf: tuple[Run, Run] | None,
    flops_per_s: float,
    parameters: int,
) -> dict[str, Any]:
    """Every method's figures at one concurrency, their ratios and token agreement."""
    methods: dict[str, Run] = {}
    if runtime is not None:
        methods["runtime"] = runtime
    if hf is not None:
        methods["hf_sequential"], methods["hf_static_batch"] = hf
    figures = {name: summarize(run, flops_per_s, parameters) for name, run in methods.items()}
    if hf is not None:
        for name, run in methods.items():
            if name != "hf_sequential":
                figures[name]["identical_to_hf_sequential"] = identical(run, hf[0])
    report: dict[str, Any] = {
        "rounds": len(rounds),
        "max_tokens_requested": sum(r.max_tokens for requests in rounds for r in requests),
        **figures,
    }
    report["ratios"] = {
        "runtime_over_hf_sequential": ratio(figures.get("runtime"), figures.get("hf_sequential")),
        "runtime_over_hf_static_batch": ratio(
            figures.get("runtime"), figures.get("hf_static_batch")
        ),
    }
    return report


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    progress("measuring matmul")
    gflops = matmul_gflops()
    model_dir = resolve_model_dir(MODEL, args.data_dir, progress=lambda _: None)
    runtime_runs = measure_runtime(args) if args.only != "hf" else {}
    hf = load_hf(model_dir)
    hf_runs = measure_hf(hf, args) if args.only != "runtime" else {}
    results = {
        str(level): report_level(
            rounds, runtime_runs.get(level), hf_runs.get(level), gflops * 1e9, hf.parameters
        )
        for level, rounds in each_level(args)
    }
    print(
        json.dumps(
            {
                "machine": machine_facts(gflops, load_at_start),
                "model": {"name": MODEL, "parameters": hf.parameters, "dtype": "float32"},
                "settings": {"seed": args.seed, "quick": args.quick, "only": args.only},
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
