"""faq: add the best-matching answers of an FAQ file to the prompt (customer service).

Settings, in `<data_dir>/plugins/faq.toml`:

    faq_file = "/srv/faq.toml"   # [[entry]] tables with question = "..." and answer = "..."
    top_k = 2                    # answers added at most
    min_score = 0.5              # cosine similarity below which an answer is left out
    model = ""                   # the runtime's embedding model ("" = its default)

At start it embeds every question through the runtime's Embed (`call_model`, by the
kernel's model gateway); for each request it embeds the prompt, ranks the questions by
cosine similarity and, when any clears `min_score`, puts their answers before the prompt
(`read_prompt`, `modify_prompt`).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from llmos.plugins.hookspecs import hookimpl

_state: dict[str, Any] = {"entries": [], "vectors": [], "context": None, "settings": {}}


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def best(
    query: list[float], vectors: list[list[float]], top_k: int, min_score: float
) -> list[tuple[int, float]]:
    """Indices and scores of the `top_k` vectors most like `query`, above `min_score`."""
    scored = sorted(
        ((index, cosine(query, vector)) for index, vector in enumerate(vectors)),
        key=lambda pair: -pair[1],
    )
    return [(index, score) for index, score in scored[:top_k] if score >= min_score]


def with_answers(prompt: str, answers: list[str]) -> str:
    lines = "\n".join(f"- {answer}" for answer in answers)
    return f"Relevant answers from our FAQ:\n{lines}\n\nCustomer: {prompt}"


def load_entries(path: Path) -> list[dict[str, str]]:
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("entry", [])
    for index, entry in enumerate(entries):
        if not isinstance(entry.get("question"), str) or not isinstance(entry.get("answer"), str):
            raise ValueError(f"faq: {path} entry[{index}] needs a question and an answer")
    return list(entries)


@hookimpl
def llmos_startup(config: dict[str, Any], context: Any) -> None:
    entries = load_entries(Path(config["faq_file"]))
    settings = {
        "top_k": int(config.get("top_k", 2)),
        "min_score": float(config.get("min_score", 0.5)),
        "model": str(config.get("model", "")),
    }
    vectors = context.embed([e["question"] for e in entries], settings["model"]) if entries else []
    _state.update(entries=entries, vectors=vectors, context=context, settings=settings)


@hookimpl
def llmos_before_request(prompt: str | None) -> dict[str, Any] | None:
    if not prompt or not _state["entries"]:
        return None
    settings = _state["settings"]
    (query,) = _state["context"].embed([prompt], settings["model"])
    chosen = best(query, _state["vectors"], settings["top_k"], settings["min_score"])
    if not chosen:
        return None
    return {"prompt": with_answers(prompt, [_state["entries"][i]["answer"] for i, _ in chosen])}
