"""Test plugin: writes down what it sees, in its storage folder, for tests to read.

- llmos_after_request: the prompt the model answered (after plugins:before changed it),
  one JSON line per task in `prompts.jsonl`;
- llmos_on_task_event: every task event, one JSON line each in `events.jsonl`;
- commands: `seen` prints how many prompts it saw (and the args it was given), `boom`
  raises.
"""

import json
import os

from llmos.plugins.hookspecs import hookimpl

_state = {"storage": None}


def _append(name, record):
    with open(os.path.join(_state["storage"], name), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def _lines(name):
    path = os.path.join(_state["storage"], name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


@hookimpl
def llmos_startup(config, context):
    _state["storage"] = str(context.storage_dir)


@hookimpl
def llmos_after_request(prompt, task_id):
    _append("prompts.jsonl", {"task_id": task_id, "prompt": prompt})


@hookimpl
def llmos_on_task_event(task_id, tenant, state, reason):
    _append(
        "events.jsonl",
        {
            "task_id": task_id,
            "tenant": tenant,
            "state": state,
            "reason": reason,
            "pid": os.getpid(),
        },
    )


def _seen(args):
    return f"saw {len(_lines('prompts.jsonl'))} prompts; args {args}; pid {os.getpid()}"


def _boom(args):
    raise RuntimeError("boom on purpose")


@hookimpl
def llmos_register_commands(register):
    register("seen", "How many prompts the witness saw.", _seen)
    register("boom", "Fails on purpose.", _boom)
