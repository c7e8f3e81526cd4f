"""`llmos privacy scan TEXT` and `llmos privacy eval FILE.jsonl`: the running privacy service,
from the command line.

Both ask the kernel which privacy service serves (ListServices) and call it directly over
gRPC, as `llmos top` does the hardware service: the kernel relays no PrivacyService call.

- `scan` prints Detect's entities as a JSON list: type, start, end (characters), score,
  recognizer, explanation.
- `eval` reads labelled lines `{"text": ..., "entities": [{"type", "start", "end"}]}`, sends
  each text to Detect (timed, one call at a time) and to Redact with pseudonymize, and prints
  precision, recall and F2 per entity type (services/privacy/evaluation.py), the leak rate
  (labelled values still in the redacted text) and throughput measured at the client, gRPC
  included. `--json` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from llmos.kernel.service_address import serving_address
from llmos.services.config import Settings
from llmos.services.errors import from_rpc_error
from llmos.services.privacy import evaluation
from llmos.v1 import common_pb2, privacy_pb2, privacy_pb2_grpc

CALL_TIMEOUT_S = 30.0


def _stub(settings: Settings) -> tuple[grpc.Channel, privacy_pb2_grpc.PrivacyServiceStub]:
    channel = grpc.insecure_channel(serving_address(settings, common_pb2.SERVICE_KIND_PRIVACY))
    return channel, privacy_pb2_grpc.PrivacyServiceStub(channel)


def scan(settings: Settings, text: str, tenant: str) -> int:
    channel, stub = _stub(settings)
    with channel:
        try:
            reply = stub.Detect(
                privacy_pb2.PrivacyServiceDetectRequest(text=text, tenant=tenant),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, "privacy Detect") from error  # type: ignore[arg-type]
    entities = [
        {
            "type": e.type,
            "start": e.start,
            "end": e.end,
            "score": round(e.score, 4),
            "recognizer": e.recognizer,
            "explanation": e.explanation,
            "text": text[e.start : e.end],
        }
        for e in reply.entities
    ]
    print(json.dumps(entities, ensure_ascii=False, indent=2))
    return 0


def evaluate(settings: Settings, path: Path, tenant: str) -> dict[str, Any]:
    rows = evaluation.load(path)
    channel, stub = _stub(settings)
    spans: list[list[evaluation.Span]] = []
    redacted: list[str] = []
    latencies: list[float] = []
    run = uuid.uuid4().hex[:8]
    with channel:
        try:
            for index, row in enumerate(rows):
                started = time.perf_counter()
                reply = stub.Detect(
                    privacy_pb2.PrivacyServiceDetectRequest(text=row.text, tenant=tenant),
                    timeout=CALL_TIMEOUT_S,
                )
                latencies.append(time.perf_counter() - started)
                spans.append([evaluation.Span(e.type, e.start, e.end) for e in reply.entities])
                redaction = stub.Redact(
                    privacy_pb2.PrivacyServiceRedactRequest(
                        text=row.text,
                        tenant=tenant,
                        conversation_id=f"eval-{run}-{index}",
                        operator=privacy_pb2.REDACTION_OPERATOR_PSEUDONYMIZE,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                redacted.append(redaction.text)
        except grpc.RpcError as error:
            raise from_rpc_error(error, f"privacy service, line {len(spans) + 1}") from error  # type: ignore[arg-type]
    leaked, labelled = evaluation.leaks(rows, redacted)
    total = sum(latencies)
    return {
        "file": str(path),
        "messages": len(rows),
        "entities": evaluation.report(evaluation.score(rows, spans)),
        "leak_rate": round(leaked / labelled, 4) if labelled else 0.0,
        "leaked": leaked,
        "labelled": labelled,
        "detect_p50_ms": round(statistics.median(latencies) * 1000, 3) if latencies else 0.0,
        "messages_per_s": round(len(rows) / total, 1) if total else 0.0,
        "kb_per_s": round(sum(len(r.text) for r in rows) / 1000 / total, 1) if total else 0.0,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['file']}: {report['messages']} messages")
    print(f"{'type':<16}{'precision':>10}{'recall':>10}{'F2':>8}{'support':>9}")
    for kind, figures in report["entities"].items():
        print(
            f"{kind:<16}{figures['precision']:>10.3f}{figures['recall']:>10.3f}"
            f"{figures['f2']:>8.3f}{figures['support']:>9}"
        )
    print(
        f"leak rate {report['leak_rate']:.2%} ({report['leaked']} of {report['labelled']}); "
        f"Detect p50 {report['detect_p50_ms']} ms, {report['messages_per_s']} messages/s, "
        f"{report['kb_per_s']} KB/s (one call at a time, gRPC included)"
    )


def add_commands(commands: Any, common: Any, settings_of: Any) -> None:
    """Add `privacy scan` and `privacy eval` to the `llmos` parser."""
    privacy = commands.add_parser("privacy", help="find PII with the running privacy service")
    actions = privacy.add_subparsers(dest="privacy_command", required=True)

    scan_parser = actions.add_parser("scan", help="the entities in TEXT, as JSON")
    scan_parser.add_argument("text")
    scan_parser.add_argument("--tenant", default="", help="the tenant to scan as")
    common(scan_parser)
    scan_parser.set_defaults(func=lambda a: scan(settings_of(a), a.text, a.tenant))

    eval_parser = actions.add_parser("eval", help="precision, recall, F2, leak rate, speed")
    eval_parser.add_argument("file", type=Path, help="JSONL: text and labelled entities")
    eval_parser.add_argument("--tenant", default="", help="the tenant to evaluate as")
    eval_parser.add_argument("--json", action="store_true", help="one JSON object")
    common(eval_parser)

    def run_eval(args: argparse.Namespace) -> int:
        report = evaluate(settings_of(args), args.file, args.tenant)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report)
        return 0

    eval_parser.set_defaults(func=run_eval)
