"""`llmos forget tenant NAME` and `llmos forget subject --tenant T VALUE`: the kernel's
ForgetTenant and ForgetSubject admin calls from a shell (kernel/forget.py says what they
delete). Prints what was deleted and what was done first; `--json` prints the answer as
one JSON object. Exit status 1 with the gRPC status and reason when the kernel refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from llmos.services.channels import open_channel
from llmos.services.config import Settings
from llmos.services.errors import error_info
from llmos.v1 import kernel_pb2, kernel_pb2_grpc

# Forgetting cancels running tasks and waits for them; a big tenant takes a while.
TIMEOUT_S = 300.0


async def forget(settings: Settings, args: argparse.Namespace) -> int:
    async with open_channel(settings.kernel_target) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        try:
            reply: Any
            if args.forget_command == "tenant":
                reply = await stub.ForgetTenant(
                    kernel_pb2.ForgetTenantRequest(tenant=args.tenant), timeout=TIMEOUT_S
                )
            else:
                reply = await stub.ForgetSubject(
                    kernel_pb2.ForgetSubjectRequest(tenant=args.tenant, subject=args.value),
                    timeout=TIMEOUT_S,
                )
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            reason = f" [{info.reason}]" if info is not None else ""
            print(f"llmos: {error.code().name}{reason}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True)))
        return 0
    print(
        f"deleted {reply.tasks_deleted} tasks ({reply.tasks_cancelled} cancelled first) and "
        f"{reply.vault_entries_deleted} vault entries"
    )
    for task_id in getattr(reply, "task_ids", ()):
        print(f"  task {task_id}")
    for note in reply.notes:
        print(f"note: {note}")
    return 0


def add_commands(commands: Any, common: Any, settings_of: Any) -> None:
    """Add `forget tenant` and `forget subject` to the `llmos` parser."""
    parser = commands.add_parser(
        "forget", help="delete a tenant's or a data subject's tasks, traces and vault entries"
    )
    actions = parser.add_subparsers(dest="forget_command", required=True)
    tenant = actions.add_parser("tenant", help="everything of tenant NAME")
    tenant.add_argument("tenant", metavar="NAME")
    subject = actions.add_parser(
        "subject", help="the tasks whose prompt held VALUE (an email, a phone number, a name)"
    )
    subject.add_argument("--tenant", required=True, help="the tenant whose tasks to search")
    subject.add_argument("value", metavar="VALUE")
    for action in (tenant, subject):
        action.add_argument("--json", action="store_true", help="the answer as one JSON object")
        common(action)
        action.set_defaults(func=lambda a: asyncio.run(forget(settings_of(a), a)))
