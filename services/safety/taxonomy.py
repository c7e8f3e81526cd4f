"""The safety taxonomy: Llama Guard 3's S1-S14 plus jailbreak and prompt injection.

Every category a verdict names is one of `CATEGORIES`; each maps to the OpenAI moderation
categories closest to it, so a client that speaks that schema can read our verdicts. The
mapping is ours (the two taxonomies do not line up one to one): a Llama Guard category
with no moderation counterpart (S6 specialised advice, S8 intellectual property...) maps
to none rather than to a wrong one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Category:
    id: str
    name: str
    moderation: tuple[str, ...]


CATEGORIES: dict[str, Category] = {
    c.id: c
    for c in (
        Category("S1", "Violent Crimes", ("violence", "illicit/violent")),
        Category("S2", "Non-Violent Crimes", ("illicit",)),
        Category("S3", "Sex-Related Crimes", ("sexual", "illicit/violent")),
        Category("S4", "Child Sexual Exploitation", ("sexual/minors",)),
        Category("S5", "Defamation", ("harassment",)),
        Category("S6", "Specialized Advice", ()),
        Category("S7", "Privacy", ()),
        Category("S8", "Intellectual Property", ()),
        Category("S9", "Indiscriminate Weapons", ("illicit/violent", "violence")),
        Category("S10", "Hate", ("hate", "harassment")),
        Category(
            "S11",
            "Suicide & Self-Harm",
            ("self-harm", "self-harm/intent", "self-harm/instructions"),
        ),
        Category("S12", "Sexual Content", ("sexual",)),
        Category("S13", "Elections", ()),
        Category("S14", "Code Interpreter Abuse", ("illicit",)),
        Category("jailbreak", "Jailbreak", ()),
        Category("prompt_injection", "Prompt Injection", ()),
    )
}


def check_category(category: str) -> Category:
    """The category named `category`; KeyError names the known ones."""
    try:
        return CATEGORIES[category]
    except KeyError:
        raise KeyError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}") from None


def label(category: str) -> str:
    """How a refusal names a category: "S9 Indiscriminate Weapons"."""
    known = CATEGORIES.get(category)
    if known is None:
        return category
    return (
        known.name if known.id in ("jailbreak", "prompt_injection") else f"{known.id} {known.name}"
    )
