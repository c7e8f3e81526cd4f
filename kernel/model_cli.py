"""`llmos embed TEXT...` and `llmos score PROMPT CONTINUATION`: the kernel's Embed and Score
from the command line, printing JSON.

- `embed` prints `{"embeddings": [[...], ...]}`, one unit vector per text, in order;
- `score` prints `{"tokens": [{"token_id", "token", "logprob"}, ...], "total_logprob"}`,
  one entry per token of the continuation after the prompt.

Both go through the kernel (admission, then a runtime) as the tenant `--tenant` names
(call metadata, as every client sends it); a refusal prints the status, its reason and the
message, and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc

from llmos.services.channels import TENANT_KEY, open_channel
from llmos.services.config import Settings
from llmos.services.errors import error_info
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

PRIORITIES = {"interactive": 1, "normal": 2, "batch": 3}


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return ((TENANT_KEY, args.tenant),) if args.tenant else ()


def _fail(error: grpc.aio.AioRpcError) -> int:
    info = error_info(error)
    reason = f" [{info.reason}]" if info is not None else ""
    print(f"llmos: {error.code().name}{reason}: {error.details()}", file=sys.stderr)
    return 1


async def _embed(settings: Settings, args: argparse.Namespace) -> int:
    request = kernel_pb2.EmbedRequest(
        model=args.model_name or "",
        inputs=args.texts,
        priority=PRIORITIES[args.priority],  # type: ignore[arg-type]
    )
    async with open_channel(settings.kernel_target) as channel:
        try:
            reply = await kernel_pb2_grpc.KernelServiceStub(channel).Embed(
                request, timeout=args.timeout, metadata=_metadata(args)
            )
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    vectors = [[round(v, 6) for v in e.values] for e in reply.embeddings]
    print(json.dumps({"embeddings": vectors}))
    return 0


async def _score(settings: Settings, args: argparse.Namespace) -> int:
    request = kernel_pb2.ScoreRequest(
        model=args.model_name or "",
        context=args.prompt,
        continuation=args.continuation,
        priority=PRIORITIES[args.priority],  # type: ignore[arg-type]
    )
    async with open_channel(settings.kernel_target) as channel:
        try:
            reply = await kernel_pb2_grpc.KernelServiceStub(channel).Score(
                request, timeout=args.timeout, metadata=_metadata(args)
            )
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    tokens = [
        {"token_id": t.token_id, "token": t.token, "logprob": round(t.logprob, 6)}
        for t in reply.tokens
    ]
    total = round(sum(t.logprob for t in reply.tokens), 6)
    print(json.dumps({"tokens": tokens, "total_logprob": total}, ensure_ascii=False))
    return 0


def add_commands(
    commands: Any,
    common: Callable[[argparse.ArgumentParser], None],
    settings_of: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add `embed` and `score` to the `llmos` parser."""

    def options(parser: argparse.ArgumentParser) -> None:
        common(parser)
        parser.add_argument("--model", dest="model_name", help="model (default: the runtime's)")
        parser.add_argument("--tenant", help="the tenant to call as (x-llmos-tenant)")
        parser.add_argument("--priority", choices=sorted(PRIORITIES), default="normal")
        parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")

    embed = commands.add_parser("embed", help="sentence embeddings of TEXT..., as JSON")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    options(embed)
    embed.set_defaults(func=lambda args: asyncio.run(_embed(settings_of(args), args)))

    score = commands.add_parser(
        "score", help="log-probability of each token of CONTINUATION after PROMPT, as JSON"
    )
    score.add_argument("prompt", metavar="PROMPT")
    score.add_argument("continuation", metavar="CONTINUATION")
    options(score)
    score.set_defaults(func=lambda args: asyncio.run(_score(settings_of(args), args)))
