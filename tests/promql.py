"""What the dashboard and the docs name, and what the processes export, as sets of names.

`query_metric_names` pulls the metric names out of a PromQL expression (enough PromQL for
the dashboard's queries: selectors, label matchers, range selectors, aggregations with
`by`/`without`, `on`/`group_left` joins, Grafana's `$variables`). `exported_names` turns a
parsed /metrics text into every sample name a query may use, including those of a family
that has no series yet (a labelled histogram nobody observed still has `_bucket`, `_count`
and `_sum` names a query may rightly use).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# PromQL words that look like names but are not metrics.
KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NAME = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")


def query_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects."""
    text = _VARIABLE.sub(" ", expr)
    text = _STRING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = {match.group(1) for match in _NAME.finditer(text)}
    return {name for name in names if name.lower() not in KEYWORDS}


def exported_names(metrics_text: str) -> set[str]:
    """Every name a query may select from one process's /metrics."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a Grafana dashboard, the panels inside collapsed rows included."""

    def walk(items: Iterable[Any]) -> Iterator[dict[str, Any]]:
        for item in items:
            if isinstance(item, dict):
                yield item
                yield from walk(item.get("panels") or [])

    return list(walk(dashboard.get("panels") or []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a Grafana dashboard's panels."""
    return [
        str(target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets") or []
        if isinstance(target, dict) and target.get("expr")
    ]
