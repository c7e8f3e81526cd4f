"""How the engine lays out the prefill of the newcomers it admitted together: which of them
run in one forward pass, and what none of them needs to run.

Why: at 16 streams opened together, the time to first token is the time to prefill the
prompts ahead of a request's own, and prefill runs near the matmul peak, so only less work
or an earlier first token per pass helps (docs/performance.md, "Time to first token"):

- Requests sent with the same chat template begin with the same tokens (SmolLM2's system
  prompt: 24 of the bench's 40-47 token prompts). A running row that holds those tokens
  lends its keys and values (the engine copies them) and only the rest of each prompt runs.
  When no running row holds the prefix the newcomers share, and the copies would save more
  tokens than a prompt has, the first newcomer runs alone first, to hold it for the rest.
- The rest are cut, in order, into as few passes as the engine's `max_prefill_tokens`
  allows, made as even as they can be: 12 similar prompts of which 11 fit are run 6 and 6,
  not 11 and 1, so the first 6 stream sooner and no pass runs one prompt's few rows.

Pure logic over token ids; the engine orders the newcomers (class, then length) and says
how much of their common prefix its running rows hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Prompted(Protocol):
    """What a plan needs of a newcomer (`sequences.Running`)."""

    @property
    def prefill_ids(self) -> list[int]: ...


T = TypeVar("T", bound=Prompted)


def shared_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `sequences` have in common."""
    shortest = min(sequences, key=len)
    for index, token in enumerate(shortest):
        if any(sequence[index] != token for sequence in sequences):
            return index
    return len(shortest)


def common_prompt(newcomers: Sequence[Prompted]) -> list[int]:
    """The tokens every prefill of `newcomers` begins with, short of each one's last token
    (a prefill runs at least that one, for its logits)."""
    ids = [n.prefill_ids for n in newcomers]
    return ids[0][: min(shared_length(ids), *(len(i) - 1 for i in ids))]


def plan_chunks(ordered: list[T], held: int, budget: int) -> list[list[T]]:
    """The forward passes that prefill `ordered` (in that order), given that running rows
    hold the first `held` tokens of their common prompt; each pass runs at most `budget`
    tokens (padded, past the shared prefix), unless one prompt alone is longer."""
    if not ordered:
        return []
    common = len(common_prompt(ordered))
    if (len(ordered) - 1) * (common - held) > len(ordered[0].prefill_ids):
        return [[ordered[0]], *even_cut(ordered[1:], common, budget)]
    return even_cut(ordered, held, budget)


def even_cut(ordered: list[T], held: int, budget: int) -> list[list[T]]:
    """`ordered` cut, in order, into as few passes as `budget` tokens run (padded, past the
    first `held` tokens) allow, with the largest pass as small as it can be."""

    def cut(limit: int) -> list[list[T]]:
        chunks: list[list[T]] = []
        for newcomer in ordered:
            last = chunks[-1] if chunks else []
            run = max(len(n.prefill_ids) for n in [*last, newcomer]) - held
            if last and (len(last) + 1) * run <= limit:
                last.append(newcomer)
            else:
                chunks.append([newcomer])
        return chunks

    passes = len(cut(budget))
    low, high = 1, budget  # the smallest limit that needs no more passes
    while low < high:
        middle = (low + high) // 2
        if len(cut(middle)) <= passes:
            high = middle
        else:
            low = middle + 1
    return cut(low)
