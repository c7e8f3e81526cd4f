"""`llmos safety check TEXT`, `llmos safety eval FILE.jsonl` and `llmos policy get|set`: the
running safety service, from the command line.

`check` and `eval`, like `llmos privacy ...` (kernel/privacy_cli.py), ask the kernel which
safety service serves (ListServices) and call it directly over gRPC. `policy get|set` go
through the kernel's admin API (KernelService.GetSafetyPolicy / SetSafetyPolicy), which
relays them to the safety service's GetPolicy / SetPolicy (kernel/safety.py).

- `check` prints the verdict as one JSON object: allowed, action, categories (with scores and
  OpenAI moderation names), evidence (rule ids, spans, the text they point at), the policy
  version. The exit status is 0 whatever the verdict: a refusal is an answer, not an error.
- `eval` reads labelled lines `{"text", "label": "safe"|"unsafe", "category"?, "direction"?}`,
  checks each (one call at a time, timed at the client, gRPC included) and prints what
  services/safety/evaluation.py counts: precision, recall, F1, FPR, recall at 1% FPR and per
  category, plus latency p50/p95; `--json` prints one JSON object.
- `policy get [--tenant T]` prints a tenant's policy as JSON; `policy set FILE.json` sends one
  (the SafetyPolicy message as JSON, e.g. from `get`) and prints what the service stored,
  with its new version. Effective at the next check; no restart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from llmos.kernel.service_address import serving_address
from llmos.services.config import Settings
from llmos.services.errors import InvalidArgument, from_rpc_error
from llmos.services.safety.evaluation import Scored, report
from llmos.services.safety.policy import ACTION_NAMES
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, safety_pb2, safety_pb2_grpc

CALL_TIMEOUT_S = 30.0
DIRECTIONS = {"input": safety_pb2.DIRECTION_INPUT, "output": safety_pb2.DIRECTION_OUTPUT}


def _stub(settings: Settings) -> tuple[grpc.Channel, safety_pb2_grpc.SafetyServiceStub]:
    channel = grpc.insecure_channel(serving_address(settings, common_pb2.SERVICE_KIND_SAFETY))
    return channel, safety_pb2_grpc.SafetyServiceStub(channel)


def verdict_json(verdict: safety_pb2.SafetyVerdict, text: str) -> dict[str, Any]:
    """The verdict as `check` prints it: plain names, and the text each span points at."""
    return {
        "allowed": verdict.allowed,
        "action": ACTION_NAMES.get(verdict.action, "allow"),
        "categories": [
            {
                "category": c.category,
                "score": round(c.score, 4),
                "moderation_categories": list(c.moderation_categories),
            }
            for c in verdict.categories
        ],
        "evidence": [
            {
                "rule_id": e.rule_id,
                "category": e.category,
                "start": e.start,
                "end": e.end,
                "model_score": round(e.model_score, 4),
                "view": e.view,
                "text": text[e.start : e.end],
            }
            for e in verdict.evidence
        ],
        "policy_version": verdict.policy_version,
    }


def check(settings: Settings, text: str, direction: str, tenant: str) -> dict[str, Any]:
    channel, stub = _stub(settings)
    with channel:
        try:
            reply = stub.Check(
                safety_pb2.SafetyServiceCheckRequest(
                    text=text, direction=DIRECTIONS[direction], tenant=tenant
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, "safety Check") from error  # type: ignore[arg-type]
    return verdict_json(reply.verdict, text)


def _rows(path: Path) -> list[dict[str, Any]]:
    """The labelled lines of `path`; a bad line is INVALID_ARGUMENT naming it."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"{path}:{number}: not JSON ({error})") from error
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InvalidArgument(f"{path}:{number}: needs a string 'text'")
        if row.get("label") not in ("safe", "unsafe"):
            raise InvalidArgument(f"{path}:{number}: 'label' must be 'safe' or 'unsafe'")
        if row.get("direction", "input") not in DIRECTIONS:
            raise InvalidArgument(f"{path}:{number}: 'direction' must be 'input' or 'output'")
        rows.append(row)
    if not rows:
        raise InvalidArgument(f"{path}: no labelled lines")
    return rows


def evaluate(settings: Settings, path: Path, tenant: str) -> dict[str, Any]:
    rows = _rows(path)
    scored: list[Scored] = []
    latencies: list[float] = []
    channel, stub = _stub(settings)
    with channel:
        try:
            for row in rows:
                started = time.perf_counter()
                reply = stub.Check(
                    safety_pb2.SafetyServiceCheckRequest(
                        text=row["text"],
                        direction=DIRECTIONS[row.get("direction", "input")],
                        tenant=tenant,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                latencies.append(time.perf_counter() - started)
                verdict = reply.verdict
                scored.append(
                    Scored(
                        unsafe=row["label"] == "unsafe",
                        flagged=verdict.action != safety_pb2.SAFETY_ACTION_ALLOW,
                        score=max((c.score for c in verdict.categories), default=0.0),
                        category=str(row.get("category", "")),
                    )
                )
        except grpc.RpcError as error:
            where = f"safety Check, line {len(scored) + 1}"
            raise from_rpc_error(error, where) from error  # type: ignore[arg-type]
    ordered = sorted(latencies)
    figures = report(scored).as_dict()
    figures["file"] = str(path)
    figures["latency_p50_ms"] = round(statistics.median(ordered) * 1000, 3)
    figures["latency_p95_ms"] = round(ordered[max(0, int(0.95 * len(ordered)) - 1)] * 1000, 3)
    return figures


def print_report(figures: dict[str, Any]) -> None:
    print(f"{figures['file']}: {figures['examples']} examples ({figures['unsafe']} unsafe)")
    print(
        f"precision {figures['precision']:.3f}  recall {figures['recall']:.3f}  "
        f"F1 {figures['f1']:.3f}  FPR {figures['fpr']:.3f}  "
        f"recall at 1% FPR {figures['recall_at_1pct_fpr']:.3f}"
    )
    for category, recall in figures["recall_by_category"].items():
        print(f"  {category:<20}recall {recall:.3f}  ({figures['count_by_category'][category]})")
    print(
        f"latency p50 {figures['latency_p50_ms']} ms, p95 {figures['latency_p95_ms']} ms "
        "(one call at a time, gRPC included)"
    )


def _kernel(settings: Settings) -> tuple[grpc.Channel, kernel_pb2_grpc.KernelServiceStub]:
    channel = grpc.insecure_channel(settings.kernel_target)
    return channel, kernel_pb2_grpc.KernelServiceStub(channel)


def get_policy(settings: Settings, tenant: str) -> dict[str, Any]:
    """Through the kernel (KernelService.GetSafetyPolicy, relayed to the safety service)."""
    channel, stub = _kernel(settings)
    with channel:
        try:
            reply = stub.GetSafetyPolicy(
                kernel_pb2.GetSafetyPolicyRequest(tenant=tenant), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as error:
            where = f"GetSafetyPolicy on the kernel at {settings.kernel_target}"
            raise from_rpc_error(error, where) from error  # type: ignore[arg-type]
    return json_format.MessageToDict(reply.policy, preserving_proto_field_name=True)


def set_policy(settings: Settings, path: Path) -> dict[str, Any]:
    """Through the kernel (KernelService.SetSafetyPolicy, relayed to the safety service)."""
    try:
        policy = json_format.Parse(path.read_text(encoding="utf-8"), safety_pb2.SafetyPolicy())
    except json_format.ParseError as error:
        raise InvalidArgument(f"{path}: not a SafetyPolicy as JSON: {error}") from error
    channel, stub = _kernel(settings)
    with channel:
        try:
            reply = stub.SetSafetyPolicy(
                kernel_pb2.SetSafetyPolicyRequest(policy=policy), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as error:
            where = f"SetSafetyPolicy on the kernel at {settings.kernel_target}"
            raise from_rpc_error(error, where) from error  # type: ignore[arg-type]
    return json_format.MessageToDict(reply.policy, preserving_proto_field_name=True)


def _print(value: Any) -> int:
    json.dump(value, sys.stdout, ensure_ascii=False, indent=2)
    print()
    return 0


def add_commands(commands: Any, common: Any, settings_of: Any) -> None:
    """Add `safety check|eval` and `policy get|set` to the `llmos` parser."""
    safety = commands.add_parser("safety", help="check text with the running safety service")
    actions = safety.add_subparsers(dest="safety_command", required=True)

    check_parser = actions.add_parser("check", help="the verdict on TEXT, as one JSON object")
    check_parser.add_argument("text")
    check_parser.add_argument("--direction", choices=sorted(DIRECTIONS), default="input")
    check_parser.add_argument("--tenant", default="", help="whose policy to check against")
    common(check_parser)
    check_parser.set_defaults(
        func=lambda a: _print(check(settings_of(a), a.text, a.direction, a.tenant))
    )

    eval_parser = actions.add_parser("eval", help="precision, recall, F1, FPR, latency")
    eval_parser.add_argument("file", type=Path, help="JSONL: text, label, category, direction")
    eval_parser.add_argument("--tenant", default="", help="whose policy to evaluate")
    eval_parser.add_argument("--json", action="store_true", help="one JSON object")
    common(eval_parser)

    def run_eval(args: argparse.Namespace) -> int:
        figures = evaluate(settings_of(args), args.file, args.tenant)
        if args.json:
            return _print(figures)
        print_report(figures)
        return 0

    eval_parser.set_defaults(func=run_eval)

    policy = commands.add_parser("policy", help="the safety service's per-tenant policy")
    verbs = policy.add_subparsers(dest="policy_command", required=True)
    get_parser = verbs.add_parser("get", help="a tenant's policy, as JSON")
    get_parser.add_argument("--tenant", default="default")
    common(get_parser)
    get_parser.set_defaults(func=lambda a: _print(get_policy(settings_of(a), a.tenant)))
    set_parser = verbs.add_parser("set", help="replace a tenant's policy from a JSON file")
    set_parser.add_argument("file", type=Path, help="a SafetyPolicy as JSON (as `get` prints)")
    common(set_parser)
    set_parser.set_defaults(func=lambda a: _print(set_policy(settings_of(a), a.file)))
