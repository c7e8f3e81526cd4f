"""Next-token choice on hand-made logits, checked against Hugging Face's logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmos.services.runtime.sampling import (
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    next_token,
)
from llmos.services.validation import Sampling

VOCAB = 64
NO_SEEN = torch.tensor([], dtype=torch.long)


def random_logits(seed: int, size: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=generator) * 3


def sample(logits: torch.Tensor, sampling: Sampling, seed: int, steps: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [next_token(logits, NO_SEEN, sampling, generator) for _ in range(steps)]


def test_greedy_is_argmax() -> None:
    for seed in range(5):
        logits = random_logits(seed)
        token = next_token(logits, NO_SEEN, Sampling(temperature=0.0), None)
        assert token == int(torch.argmax(logits))


def test_greedy_sees_the_repetition_penalty() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0])

    assert next_token(logits, NO_SEEN, Sampling(temperature=0.0), None) == 0
    penalised = Sampling(temperature=0.0, repetition_penalty=1.2)
    assert next_token(logits, torch.tensor([0]), penalised, None) == 1


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = random_logits(1)
    logits[5] = 0.0  # zero stays zero either way
    seen = torch.tensor([3, 5, 9, 3, 40, 9, 9])
    before = logits.clone()

    ours = apply_repetition_penalty(logits, seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(seen.unsqueeze(0), logits.unsqueeze(0))

    torch.testing.assert_close(ours, theirs.squeeze(0))
    assert not torch.equal(ours, before)
    torch.testing.assert_close(logits, before)  # the input is not modified in place


def test_repetition_penalty_pushes_seen_tokens_down_whatever_their_sign() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])

    penalised = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)

    torch.testing.assert_close(penalised, torch.tensor([1.0, -4.0, 1.0]))


def test_repetition_penalty_of_one_or_nothing_seen_is_a_no_op() -> None:
    logits = random_logits(2)

    torch.testing.assert_close(apply_repetition_penalty(logits, torch.tensor([1, 2]), 1.0), logits)
    torch.testing.assert_close(apply_repetition_penalty(logits, NO_SEEN, 1.5), logits)


@pytest.mark.parametrize("top_k", [1, 2, 10, VOCAB - 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_matches_transformers(top_k: int, seed: int) -> None:
    logits = random_logits(seed)

    ours = filter_top_k(logits, top_k)
    theirs = TopKLogitsWarper(top_k)(None, logits.unsqueeze(0)).squeeze(0)

    torch.testing.assert_close(ours, theirs)
    assert int(torch.isfinite(ours).sum()) == top_k


@pytest.mark.parametrize("top_k", [0, VOCAB, VOCAB + 5])
def test_top_k_off_or_as_large_as_the_vocabulary_keeps_everything(top_k: int) -> None:
    logits = random_logits(3)

    torch.testing.assert_close(filter_top_k(logits, top_k), logits)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p_matches_transformers(top_p: float, seed: int) -> None:
    logits = random_logits(seed)

    ours = filter_top_p(logits, top_p)
    theirs = TopPLogitsWarper(top_p)(None, logits.unsqueeze(0)).squeeze(0)

    torch.testing.assert_close(ours, theirs)
    assert 1 <= int(torch.isfinite(ours).sum()) < VOCAB


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    # Probabilities 0.5, 0.3, 0.2 (in shuffled positions).
    logits = torch.tensor([0.3, 0.5, 0.2]).log()

    kept = [torch.isfinite(filter_top_p(logits, p)).tolist() for p in (0.4, 0.7, 0.9)]

    assert kept == [[False, True, False], [True, True, False], [True, True, True]]


def test_top_p_of_one_keeps_everything() -> None:
    logits = random_logits(4)

    torch.testing.assert_close(filter_top_p(logits, 1.0), logits)


def test_sampling_never_picks_a_filtered_token() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, 0.0, -1.0])

    picked = set(sample(logits, Sampling(temperature=1.0, top_k=2), seed=0, steps=200))

    assert picked == {1, 2}


def test_low_temperature_concentrates_on_the_most_likely_token() -> None:
    logits = torch.tensor([1.0, 1.5, 0.5])

    hot = set(sample(logits, Sampling(temperature=1.0), seed=0, steps=200))
    cold = set(sample(logits, Sampling(temperature=0.01), seed=0, steps=200))

    assert hot == {0, 1, 2}
    assert cold == {1}


def test_same_seed_gives_the_same_tokens() -> None:
    flat = torch.zeros(1000)
    sampling = Sampling(temperature=1.0, seed=7)

    assert sample(flat, sampling, seed=7, steps=20) == sample(flat, sampling, seed=7, steps=20)


def test_different_seeds_give_different_tokens() -> None:
    flat = torch.zeros(1000)
    sampling = Sampling(temperature=1.0)

    runs = {tuple(sample(flat, sampling, seed=seed, steps=20)) for seed in range(5)}

    assert len(runs) == 5
