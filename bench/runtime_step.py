"""One decoding step of the runtime's engine, Hugging Face's forward against the lean Llama
forward (services/runtime/llama_forward.py), in the same process, as one JSON object.

    python bench/runtime_step.py [--batches 1,4,8,12,16,32] [--repeats 12] [--threads N]
                                 [--data-dir DIR]

For each batch size B both forwards run the same step, alternating, `--repeats` times: B
rows at positions 60..140 (each its own length, masked as the engine masks them), one
token each, then the output layer for the B rows, on the engine's `SlotKVCache`. Figures
per forward and batch: the median wall-clock ms (`wall_ms`) and the median CPU ms of the
process (`cpu_ms`: on a shared machine CPU time is the steadier figure, but it counts
threads' spinning too), and `speedup` = hf wall ÷ lean wall. `machine` holds the thread
count and the 1-minute load average at start and end: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llmos.services.runtime.engine import load_model
from llmos.services.runtime.kv_cache import SlotKVCache
from llmos.services.runtime.llama_forward import Forward, HfForward
from llmos.services.runtime.models import resolve_model_dir

MODEL = "SmolLM2-135M-Instruct"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4,8,12,16,32")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--data-dir", default=os.environ.get("LLMOS_DATA_DIR", ".llmos"))
    return parser.parse_args()


def step(forward: Forward, cache: SlotKVCache, lengths: torch.Tensor) -> torch.Tensor:
    """One decoding step as the engine runs it: mask, write positions, hidden, logits."""
    batch = lengths.shape[0]
    positions = lengths[:, None]
    mask = None
    if batch > 1:
        kv_length = int(lengths.max()) + 1
        mask = (torch.arange(kv_length)[None, :] <= lengths[:, None])[:, None, None, :]
    cache.prepare(0, positions)
    inputs = torch.randint(0, 49152, (batch, 1))
    hidden = forward.hidden(inputs, positions, mask, cache)
    return forward.logits(hidden[:, -1]).argmax(-1)


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    loaded = load_model(MODEL, str(resolve_model_dir(MODEL, Path(args.data_dir))))
    config = loaded.model.config
    forwards: dict[str, Forward] = {"hf": HfForward(loaded.model), "lean": loaded.forward}
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            lengths = torch.randint(60, 140, (batch,), generator=torch.Generator().manual_seed(0))
            caches = {}
            for name, forward in forwards.items():
                caches[name] = SlotKVCache(
                    config.num_hidden_layers,
                    config.num_key_value_heads,
                    config.head_dim,
                    loaded.context_length,
                    torch.float32,
                )
                caches[name].reserve(batch, 140 + args.repeats + 2)
                step(forward, caches[name], lengths)  # warm up
            wall: dict[str, list[float]] = {name: [] for name in forwards}
            cpu: dict[str, list[float]] = {name: [] for name in forwards}
            for repeat in range(args.repeats):
                for name, forward in forwards.items():
                    started, cpu_started = time.perf_counter(), time.process_time()
                    step(forward, caches[name], lengths + repeat)
                    wall[name].append(time.perf_counter() - started)
                    cpu[name].append(time.process_time() - cpu_started)
            row: dict[str, Any] = {
                name: {
                    "wall_ms": round(statistics.median(wall[name]) * 1e3, 2),
                    "cpu_ms": round(statistics.median(cpu[name]) * 1e3, 2),
                }
                for name in forwards
            }
            row["speedup"] = round(row["hf"]["wall_ms"] / row["lean"]["wall_ms"], 3)
            results[str(batch)] = row
            print(json.dumps({"batch": batch, **row}), flush=True)
    print(
        json.dumps(
            {
                "steps": results,
                "machine": {
                    "torch_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "load_1min_start": load_at_start,
                    "load_1min_end": os.getloadavg()[0],
                    "torch": torch.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
