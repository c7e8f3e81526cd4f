"""How much prompt-lookup ("n-gram") speculative decoding would save on bench/runtime.py's
requests, measured before building it, as one JSON object.

    python bench/ngram_acceptance.py [--concurrency 16] [--seed 0] [--data-dir DIR]

Prompt lookup (vLLM's "ngram" speculator, HF's `prompt_lookup_num_tokens`) proposes the k
tokens that followed the latest earlier occurrence of the sequence's last n tokens (n from
`max` down to `min`) in its prompt plus generated text; one forward step then verifies them
all and keeps the longest prefix equal to the greedy choice, plus one token of its own.
Greedy output does not depend on the drafts, so this bench takes Hugging Face's greedy
`generate()` tokens for the request set (the same set, seed and chat template as
bench/runtime.py) and replays the drafting and verification on them, without a model in the
loop.

Figures per (k, n range):
  drafted, accepted     draft tokens proposed and kept, over all requests
  acceptance            accepted / drafted
  tokens_per_step       generated tokens (after the prefill's first) per verification step;
                        1.0 is plain decoding
  steps / plain_steps   decoding steps of all requests with and without speculation
  longest_steps / longest_plain_steps
                        the most steps any one request needs, with and without: with all
                        requests started together, that request sets the round's wall time
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import MODEL, build_rounds, hf_generate, load_hf, single

from llmos.services.runtime.models import resolve_model_dir

DRAFT_LENGTHS = (1, 2, 4, 8)
NGRAM_RANGES = ((3, 1), (4, 2))


def propose(tokens: list[int], k: int, largest: int, smallest: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens."""
    for n in range(largest, smallest - 1, -1):
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


def replay(prompt: list[int], generated: list[int], k: int, ngrams: tuple[int, int]) -> list[int]:
    """One request's verification steps, flattened: drafted, accepted, drafted, ..."""
    counts: list[int] = []
    done = 1  # the prefill gives the first token
    while done < len(generated):
        draft = propose(prompt + generated[:done], min(k, len(generated) - done - 1), *ngrams)
        accepted = 0
        while accepted < len(draft) and draft[accepted] == generated[done + accepted]:
            accepted += 1
        counts += [len(draft), accepted]
        done += accepted + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(Path(".llmos/bench-data").resolve()))
    args = parser.parse_args()
    hf = load_hf(resolve_model_dir(MODEL, args.data_dir, progress=lambda _: None))
    requests: list[tuple[list[int], list[int]]] = []
    for round_ in build_rounds(args.concurrency, args.seed, quick=False):
        for request in round_:
            ids = hf.encode(request)
            output, _ = hf_generate(hf, single(ids), request.max_tokens)
            generated, _ = hf.useful(output[0, len(ids) :].tolist(), request.max_tokens)
            requests.append((ids, generated))
    plain = [max(len(generated) - 1, 0) for _, generated in requests]
    results: list[dict[str, Any]] = []
    for k in DRAFT_LENGTHS:
        for ngrams in NGRAM_RANGES:
            per_request = [replay(prompt, generated, k, ngrams) for prompt, generated in requests]
            drafted = sum(sum(counts[0::2]) for counts in per_request)
            accepted = sum(sum(counts[1::2]) for counts in per_request)
            steps = [len(counts) // 2 for counts in per_request]
            longest = max(range(len(steps)), key=lambda index: steps[index])
            results.append(
                {
                    "k": k,
                    "ngram_max": ngrams[0],
                    "ngram_min": ngrams[1],
                    "drafted": drafted,
                    "accepted": accepted,
                    "acceptance": round(accepted / drafted, 3) if drafted else None,
                    "tokens_per_step": round(sum(plain) / max(sum(steps), 1), 3),
                    "steps": sum(steps),
                    "plain_steps": sum(plain),
                    "longest_steps": steps[longest],
                    "longest_plain_steps": max(plain),
                }
            )
    print(
        json.dumps(
            {
                "requests": len(requests),
                "generated_tokens": sum(len(generated) for _, generated in requests),
                "seed": args.seed,
                "concurrency": args.concurrency,
                "load_average_1m": round(os.getloadavg()[0], 2),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
