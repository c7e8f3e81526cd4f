"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, seed.

Pure tensor logic with no model and no I/O, so it is unit-tested on hand-made logits.
Temperature 0 is greedy decoding (argmax), which reproduces Hugging Face `generate()`
with `do_sample=False`.
"""

from __future__ import annotations

import torch

from llmos.services.validation import Sampling


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty as in HF: seen tokens' positive logits divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the mass before it already reaches top_p; the first always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor,
    seen: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None,
) -> int:
    """The next token id for one sequence, given its last-position logits (1-D, vocab)."""
    logits = apply_repetition_penalty(logits.float(), seen, sampling.repetition_penalty)
    if sampling.greedy:
        return int(torch.argmax(logits).item())
    logits = logits / sampling.temperature
    logits = filter_top_k(logits, sampling.top_k)
    logits = filter_top_p(logits, sampling.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
