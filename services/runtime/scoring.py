"""Per-token log-probabilities of a continuation given a context (the explain service's input).

One forward pass over context + continuation, no cache, no sampling: position i's logits
predict token i+1, so the continuation's log-probs are read off the positions just before
each of its tokens. Runs outside the batch (on a worker thread); the model's forward pass
holds no state, so it may run beside the decoding loop.
"""

from __future__ import annotations

import dataclasses

import torch

from llmos.services.errors import InvalidArgument
from llmos.services.runtime.engine import LoadedModel


@dataclasses.dataclass(frozen=True)
class ScoredToken:
    token_id: int
    token: str
    logprob: float


def _ids(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def score(loaded: LoadedModel, context: str, continuation: str) -> list[ScoredToken]:
    """Log-probability of each continuation token given the context and the tokens before it."""
    continuation_ids = _ids(loaded, continuation)
    if not continuation_ids:
        raise InvalidArgument(
            "the continuation is empty: Score needs at least one token to score",
            reason="EMPTY_CONTINUATION",
        )
    context_ids = _ids(loaded, context)
    if not context_ids:  # nothing to condition on: start from the beginning-of-text token
        bos = loaded.tokenizer.bos_token_id
        context_ids = [bos if bos is not None else next(iter(loaded.eos_token_ids))]
    ids = context_ids + continuation_ids
    if len(ids) > loaded.context_length:
        raise InvalidArgument(
            f"context plus continuation is {len(ids)} tokens, over {loaded.name}'s context of "
            f"{loaded.context_length}; shorten them",
            reason="CONTEXT_EXCEEDED",
        )
    # Only the positions that predict a continuation token: the last len+1, less the final.
    keep = len(continuation_ids) + 1
    logits = loaded.model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0]
    logprobs = logits[:-1].float().log_softmax(-1)
    targets = torch.tensor(continuation_ids)
    picked = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    return [
        ScoredToken(token_id, loaded.tokenizer.decode([token_id]), logprob)
        for token_id, logprob in zip(continuation_ids, picked, strict=True)
    ]
