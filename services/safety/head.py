"""The classifier head: sentence vector in, P(unsafe) and P(category | unsafe) out.

A one-hidden-layer network (the encoder's 1,536 features -> 64 ReLU -> 1 sigmoid, and -> K
softmax) in numpy. Two
outputs rather than one softmax over "safe" plus every category, because the decision is
binary: a text whose unsafe mass is split between S1 and S9 must still be caught, so the
verdict's score for a category is P(unsafe) x P(category | unsafe), and the category with
most mass carries all of P(unsafe) (see `Head.scores`).

Calibration: the operating thresholds chosen on the validation split (one per direction,
`thresholds`, written by scripts/safety/train.py) are mapped to 0.5, piecewise linearly
(`calibrate`), so a policy's threshold means the same for prompts and outputs: 0.5 is
the validation operating point, higher is stricter about flagging, lower catches more.
The ranking of scores is unchanged, so recall at a fixed FPR is too.

Training is here too (full-batch Adam, seeded, class-weighted so the benign near-misses
count as much as the larger harmful set): pure numpy, no I/O but `save` and `load`, so it
runs the same on any machine and tests without a server. scripts/safety/train.py feeds it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

HIDDEN = 64
DIRECTIONS = ("input", "output")


def calibrate(score: float, threshold: float) -> float:
    """`score` mapped so that `threshold` becomes 0.5, 0 stays 0 and 1 stays 1 (monotone)."""
    if threshold <= 0.0 or threshold >= 1.0:
        return score
    if score < threshold:
        return 0.5 * score / threshold
    return 0.5 + 0.5 * (score - threshold) / (1.0 - threshold)


@dataclasses.dataclass(frozen=True)
class Head:
    w1: Array
    b1: Array
    w_unsafe: Array
    b_unsafe: Array
    w_category: Array
    b_category: Array
    categories: tuple[str, ...]
    # How it was made (data digest, seed, split sizes...): written into the .npz.
    card: dict[str, object] = dataclasses.field(default_factory=dict)
    # The raw P(unsafe) operating point per direction, chosen on the validation split;
    # empty: scores are reported raw (as while training).
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)

    def forward(self, vectors: Array) -> tuple[Array, Array]:
        """(P(unsafe) per row, P(category | unsafe) per row and category)."""
        hidden = np.maximum(vectors @ self.w1 + self.b1, 0.0)
        unsafe = 1.0 / (1.0 + np.exp(-(hidden @ self.w_unsafe + self.b_unsafe)))
        logits = hidden @ self.w_category + self.b_category
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return unsafe.astype(np.float32), (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def scores(self, vectors: Array, direction: str = "input") -> list[dict[str, float]]:
        """Per row, each category's score: the most likely category gets P(unsafe), the
        others P(unsafe) x P(category | unsafe); calibrated for `direction` (`calibrate`)."""
        unsafe, given = self.forward(vectors)
        threshold = self.thresholds.get(direction, 0.0)
        rows: list[dict[str, float]] = []
        for p, dist in zip(unsafe.tolist(), given, strict=True):
            top = int(np.argmax(dist))
            rows.append(
                {
                    category: calibrate(float(p if i == top else p * dist[i]), threshold)
                    for i, category in enumerate(self.categories)
                }
            )
        return rows

    def save(self, path: Path) -> None:
        np.savez(
            path,
            w1=self.w1,
            b1=self.b1,
            w_unsafe=self.w_unsafe,
            b_unsafe=self.b_unsafe,
            w_category=self.w_category,
            b_category=self.b_category,
            categories=np.array(self.categories),
            card=np.array(json.dumps(self.card, sort_keys=True)),
            thresholds=np.array(json.dumps(self.thresholds, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: Path) -> Head:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                w1=data["w1"],
                b1=data["b1"],
                w_unsafe=data["w_unsafe"],
                b_unsafe=data["b_unsafe"],
                w_category=data["w_category"],
                b_category=data["b_category"],
                categories=tuple(str(c) for c in data["categories"]),
                card=json.loads(str(data["card"])),
                thresholds=(
                    {str(k): float(v) for k, v in json.loads(str(data["thresholds"])).items()}
                    if "thresholds" in data.files
                    else {}
                ),
            )


def train(
    vectors: Array,
    unsafe: npt.NDArray[np.int64],
    category: npt.NDArray[np.int64],
    categories: tuple[str, ...],
    *,
    seed: int,
    epochs: int = 400,
    learning_rate: float = 0.01,
    l2: float = 1e-4,
) -> Head:
    """Fit the head. `unsafe` is 0/1 per row; `category` indexes `categories` (ignored for
    safe rows). The same inputs and seed give the same head, bit for bit, on one machine."""
    rng = np.random.default_rng(seed)
    n, dims = vectors.shape
    k = len(categories)
    params = {
        "w1": rng.normal(0, (2 / dims) ** 0.5, (dims, HIDDEN)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w_unsafe": rng.normal(0, (1 / HIDDEN) ** 0.5, HIDDEN).astype(np.float32),
        "b_unsafe": np.zeros((), np.float32),
        "w_category": rng.normal(0, (1 / HIDDEN) ** 0.5, (HIDDEN, k)).astype(np.float32),
        "b_category": np.zeros(k, np.float32),
    }
    positives = max(1, int(unsafe.sum()))
    weight = np.where(unsafe == 1, n / (2 * positives), n / (2 * max(1, n - positives)))
    weight = (weight / weight.sum()).astype(np.float32)
    harmful = unsafe == 1
    one_hot = np.zeros((n, k), np.float32)
    one_hot[np.arange(n)[harmful], category[harmful]] = 1.0
    category_weight = harmful.astype(np.float32) / max(1, int(harmful.sum()))
    moments = {name: (np.zeros_like(p), np.zeros_like(p)) for name, p in params.items()}
    for step in range(1, epochs + 1):
        pre = vectors @ params["w1"] + params["b1"]
        hidden = np.maximum(pre, 0.0)
        p = 1.0 / (1.0 + np.exp(-(hidden @ params["w_unsafe"] + params["b_unsafe"])))
        logits = hidden @ params["w_category"] + params["b_category"]
        logits -= logits.max(axis=1, keepdims=True)
        soft = np.exp(logits)
        soft /= soft.sum(axis=1, keepdims=True)
        d_unsafe = (p - unsafe) * weight  # dL/dlogit, binary cross-entropy
        d_category = (soft - one_hot) * category_weight[:, None]
        grads = {
            "w_unsafe": hidden.T @ d_unsafe + l2 * params["w_unsafe"],
            "b_unsafe": np.asarray(d_unsafe.sum(), np.float32),
            "w_category": hidden.T @ d_category + l2 * params["w_category"],
            "b_category": d_category.sum(axis=0),
        }
        d_hidden = (
            np.outer(d_unsafe, params["w_unsafe"]) + d_category @ params["w_category"].T
        ) * (pre > 0)
        grads["w1"] = vectors.T @ d_hidden + l2 * params["w1"]
        grads["b1"] = d_hidden.sum(axis=0)
        for name, grad in grads.items():  # Adam
            m, v = moments[name]
            m[...] = 0.9 * m + 0.1 * grad
            v[...] = 0.999 * v + 0.001 * grad * grad
            m_hat = m / (1 - 0.9**step)
            v_hat = v / (1 - 0.999**step)
            params[name] = (params[name] - learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(
                np.float32
            )
    return Head(
        w1=params["w1"],
        b1=params["b1"],
        w_unsafe=params["w_unsafe"],
        b_unsafe=params["b_unsafe"],
        w_category=params["w_category"],
        b_category=params["b_category"],
        categories=categories,
    )
