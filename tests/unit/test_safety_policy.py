"""Safety policy: validation, per-category actions, versions, persistence (pure logic)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from llmos.services.errors import FailedPrecondition, InvalidArgument, NotFound
from llmos.services.safety.evaluation import Scored, report
from llmos.services.safety.head import Head, calibrate, train
from llmos.services.safety.policy import DEFAULT_THRESHOLD, PolicyBook
from llmos.v1 import safety_pb2 as pb

BLOCK, FLAG, ALLOW = pb.SAFETY_ACTION_BLOCK, pb.SAFETY_ACTION_FLAG, pb.SAFETY_ACTION_ALLOW


def policy(tenant: str, *rules: tuple[str, float, int], version: str = "") -> pb.SafetyPolicy:
    return pb.SafetyPolicy(
        tenant=tenant,
        version=version,
        rules=[pb.CategoryRule(category=c, threshold=t, action=a) for c, t, a in rules],
    )


def test_the_default_blocks_every_category_at_the_validation_threshold() -> None:
    effective = PolicyBook().effective("anyone")
    assert effective.version == "default@0"
    # Scores are calibrated so that 0.5 is the operating point chosen on the validation
    # split, per direction (head.calibrate; docs/safety.md).
    assert DEFAULT_THRESHOLD == 0.5
    assert effective.decide("S9", 0.49) == ALLOW
    assert effective.decide("S9", 0.5) == BLOCK


def test_a_tenant_overrides_the_categories_it_names_and_keeps_the_rest() -> None:
    book = PolicyBook()
    stored = book.set(policy("acme", ("S9", 0.4, FLAG), ("S9", 0.9, BLOCK)))
    assert stored.version == "acme@1"
    effective = book.effective("acme")
    assert effective.decide("S9", 0.5) == FLAG
    assert effective.decide("S9", 0.95) == BLOCK
    assert effective.decide("S1", 0.4) == ALLOW  # the default's rule: block at 0.5
    assert effective.decide("S1", 0.6) == BLOCK
    assert book.effective("other").decide("S9", 0.45) == ALLOW
    assert book.effective("other").decide("S9", 0.995) == BLOCK


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (policy("acme", ("S99", 0.5, BLOCK)), "UNKNOWN_CATEGORY"),
        (policy("acme", ("S1", 1.5, BLOCK)), "BAD_THRESHOLD"),
        (policy("acme", ("S1", 0.5, pb.SAFETY_ACTION_UNSPECIFIED)), "BAD_ACTION"),
        (policy("", ("S1", 0.5, BLOCK)), "BAD_POLICY"),
    ],
)
def test_bad_policies_are_refused(bad: pb.SafetyPolicy, reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        PolicyBook().set(bad)
    assert refused.value.reason == reason


def test_unknown_tenant_is_not_found_and_a_stale_version_is_refused() -> None:
    book = PolicyBook()
    with pytest.raises(NotFound):
        book.get("nobody")
    book.set(policy("acme", ("S1", 0.5, FLAG)))
    with pytest.raises(FailedPrecondition):
        book.set(policy("acme", ("S1", 0.5, BLOCK), version="acme@0"))
    assert book.set(policy("acme", ("S1", 0.5, BLOCK), version="acme@1")).version == "acme@2"


def test_policies_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    PolicyBook(path).set(policy("acme", ("S12", 0.3, FLAG)))
    again = PolicyBook(path)
    assert again.get("acme").version == "acme@1"
    assert again.effective("acme").decide("S12", 0.35) == FLAG
    assert again.set(policy("acme")).version == "acme@2"


def test_evaluation_counts_f1_fpr_and_recall_at_one_percent() -> None:
    rows = [Scored(True, True, 0.9, "S1"), Scored(True, False, 0.2, "S9")]
    rows += [Scored(False, False, 0.1)] * 99 + [Scored(False, True, 0.95)]
    figures = report(rows)
    assert (figures.precision, figures.recall, figures.fpr) == (0.5, 0.5, 0.01)
    assert figures.recall_by_category == {"S1": 1.0, "S9": 0.0}
    # One false positive in 100 is allowed at 1% FPR: the threshold drops to 0.1, and
    # both unsafe rows score above it.
    assert (figures.recall_at_1pct_fpr, figures.threshold_at_1pct_fpr) == (1.0, 0.1)


def test_calibration_maps_the_operating_point_to_one_half_and_keeps_the_order() -> None:
    assert calibrate(0.8, 0.8) == 0.5
    assert calibrate(0.0, 0.8) == 0.0 and calibrate(1.0, 0.8) == 1.0
    assert calibrate(0.4, 0.8) == pytest.approx(0.25)
    assert calibrate(0.9, 0.8) == pytest.approx(0.75)
    raw = [i / 100 for i in range(101)]
    assert [calibrate(s, 0.3) for s in raw] == sorted(calibrate(s, 0.3) for s in raw)
    assert calibrate(0.7, 0.0) == 0.7  # no threshold: raw scores, as while training


def test_a_head_keeps_its_thresholds_through_save_and_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    unsafe = (vectors[:, 0] > 0).astype(np.int64)
    head = train(vectors, unsafe, np.zeros(40, np.int64), ("S1", "S2"), seed=1, epochs=20)
    head = dataclasses.replace(head, thresholds={"input": 0.7, "output": 0.4})
    head.save(tmp_path / "head.npz")
    loaded = Head.load(tmp_path / "head.npz")
    assert loaded.thresholds == {"input": 0.7, "output": 0.4}
    p, _ = loaded.forward(vectors[:1])
    top_in = max(loaded.scores(vectors[:1], "input")[0].values())
    top_out = max(loaded.scores(vectors[:1], "output")[0].values())
    assert top_in == pytest.approx(calibrate(float(p[0]), 0.7))
    assert top_out == pytest.approx(calibrate(float(p[0]), 0.4))
