"""The engine's prefill plan (services/runtime/prefill_plan.py): the shared prefix found, run
once, and the newcomers cut into passes as even as the token budget allows."""

from __future__ import annotations

import dataclasses

from llmos.services.runtime.prefill_plan import (
    common_prompt,
    even_cut,
    plan_chunks,
    shared_length,
)

SYSTEM = list(range(100, 124))  # 24 tokens every chat prompt begins with


@dataclasses.dataclass
class Newcomer:
    prefill_ids: list[int]


def prompt(own: int, tag: int = 0) -> Newcomer:
    return Newcomer(SYSTEM + [tag] * own)


def sizes(chunks: list[list[Newcomer]]) -> list[int]:
    return [len(chunk) for chunk in chunks]


def test_shared_length_counts_the_leading_tokens_all_share() -> None:
    assert shared_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert shared_length([[1, 2], [1, 2]]) == 2
    assert shared_length([[5], [1, 2]]) == 0


def test_the_common_prompt_leaves_each_prompt_its_last_token() -> None:
    assert common_prompt([prompt(18, 1), prompt(20, 2)]) == SYSTEM
    # Identical prompts: the last token still runs, for its logits.
    same = [Newcomer([1, 2, 3]), Newcomer([1, 2, 3])]
    assert common_prompt(same) == [1, 2]


def test_twelve_prompts_of_which_eleven_fit_run_six_and_six() -> None:
    twelve = [prompt(20 + i % 3, i) for i in range(12)]
    held = len(SYSTEM)  # a running row holds the system prompt
    assert sizes(even_cut(twelve, held, budget=11 * 22)) == [6, 6]
    assert sizes(plan_chunks(twelve, held, budget=11 * 22)) == [6, 6]


def test_a_pass_never_runs_more_than_the_budget_unless_one_prompt_does() -> None:
    newcomers = [prompt(own, own) for own in (2, 3, 5, 8, 13, 21, 34, 55, 89, 400)]
    for budget in (16, 64, 128, 256):
        for chunk in even_cut(newcomers, len(SYSTEM), budget):
            run = max(len(n.prefill_ids) for n in chunk) - len(SYSTEM)
            assert len(chunk) * run <= budget or len(chunk) == 1
        assert [n for chunk in even_cut(newcomers, 0, budget) for n in chunk] == newcomers


def test_the_first_newcomer_runs_alone_to_hold_the_prefix_for_the_rest() -> None:
    sixteen = [prompt(16 + i % 8, i) for i in range(16)]
    chunks = plan_chunks(sixteen, held=0, budget=256)
    assert sizes(chunks)[0] == 1 and sum(sizes(chunks)) == 16
    # Each later pass runs only what follows the system prompt: 15 x 23 tokens at most.
    assert sizes(chunks[1:]) == [8, 7]


def test_no_prompt_runs_alone_when_the_prefix_is_held_or_not_worth_it() -> None:
    sixteen = [prompt(16 + i % 8, i) for i in range(16)]
    assert sizes(plan_chunks(sixteen, held=len(SYSTEM), budget=512)) == [16]
    # Two prompts sharing 24 tokens save fewer than a prompt has: run together.
    assert sizes(plan_chunks(sixteen[:2], held=0, budget=512)) == [2]
    assert plan_chunks([], held=0, budget=256) == []
