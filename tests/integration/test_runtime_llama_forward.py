"""The lean Llama forward pass (services/runtime/llama_forward.py) against Hugging Face's own
forward, on the real default model: bit-identical logits for a lone sequence, logits within
float rounding and the same greedy tokens as HF `generate()` alone for every row of a batch
(whose decoding steps run oneDNN on the packed weights), the packed copy counted, and
Hugging Face's forward kept for what the lean pass does not cover (int8 weights, other
architectures)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

from llmos.services.runtime.engine import Engine, LoadedModel
from llmos.services.runtime.kv_cache import SlotKVCache
from llmos.services.runtime.llama_forward import (
    PACK_ROWS,
    Forward,
    HfForward,
    LlamaForward,
    lean_forward_for,
)
from llmos.services.runtime.sequences import SequenceHandle
from llmos.services.runtime.weights import hold_weights
from llmos.services.validation import Sampling

pytestmark = pytest.mark.model

# Ten prompts: fewer rows than oneDNN's weight layout is chosen for (PACK_ROWS).
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "List three colours of the rainbow.",
    "Why is the sky blue?",
    "Give me a name for a pet turtle.",
    "What is two plus two?",
    "Describe a cat in five words.",
    "Say hello in Spanish.",
    "What do bees make?",
]


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    running = Engine(loaded)
    yield running
    running.close()


def decode_logits(
    forward: Forward, loaded: LoadedModel, prompts: list[list[int]], steps: int
) -> list[torch.Tensor]:
    """Prefill `prompts` together (padded, masked as the engine does; no mask alone), then
    `steps` greedy decoding steps; the logits of every step."""
    config = loaded.model.config
    cache = SlotKVCache(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 8192, torch.float32
    )
    lengths = torch.tensor([len(p) for p in prompts])
    batch, longest = len(prompts), int(lengths.max())
    cache.reserve(batch, longest + steps + 1)
    inputs = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    positions = torch.arange(longest).expand(batch, longest)
    mask = None
    if batch > 1:
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        valid = torch.arange(longest)[None, :] < lengths[:, None]
        mask = (causal[None] & valid[:, None, :])[:, None]
    with torch.inference_mode():
        cache.prepare(0, positions)
        hidden = forward.hidden(inputs, positions, mask, cache)
        logits = [forward.logits(hidden[torch.arange(batch), lengths - 1])]
        for _ in range(steps):
            step_positions = lengths[:, None].clone()
            mask = None
            if batch > 1:
                kv_length = int(lengths.max()) + 1
                mask = (torch.arange(kv_length)[None, :] <= lengths[:, None])[:, None, None, :]
            cache.prepare(0, step_positions)
            tokens = logits[-1].argmax(-1)[:, None]
            hidden = forward.hidden(tokens, step_positions, mask, cache)
            logits.append(forward.logits(hidden[:, -1]))
            lengths = lengths + 1
    return logits


async def collect(handle: SequenceHandle) -> list[int]:
    return [token async for event in handle.events() for token in event.token_ids]


def chat_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    return loaded.encode_chat([{"role": "user", "content": prompt}])


def test_the_default_model_runs_the_lean_pass(loaded: LoadedModel) -> None:
    assert isinstance(loaded.forward, LlamaForward)


def test_a_lone_sequence_gets_bit_identical_logits(loaded: LoadedModel) -> None:
    prompt = [chat_ids(loaded, PROMPTS[0])]
    ours = decode_logits(loaded.forward, loaded, prompt, steps=4)
    theirs = decode_logits(HfForward(loaded.model), loaded, prompt, steps=4)
    for step, (mine, hf) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(mine, hf), f"step {step}: max diff {(mine - hf).abs().max()}"


def test_the_packed_weights_are_every_matmul_weight_once(loaded: LoadedModel) -> None:
    forward = loaded.forward
    assert isinstance(forward, LlamaForward)
    matmul = [forward.lm_head, *(w for layer in forward.layers for w in layer.weights)]
    assert all(weight.packed is not None for weight in matmul)
    # Every parameter but the norms' (the output layer is tied to the embedding).
    norms = sum(p.numel() for name, p in loaded.model.named_parameters() if "norm" in name)
    assert forward.packed_bytes == 4 * (loaded.parameters - norms)


def test_an_engine_that_never_batches_keeps_no_onednn_copy(loaded: LoadedModel) -> None:
    """`runtime_max_batch = 1`: every step has one row, which runs MKL on the weights as
    Hugging Face holds them, so a reordered copy would only hold memory."""
    forward = lean_forward_for(loaded.model, batched=False)
    assert isinstance(forward, LlamaForward)
    assert forward.packed_bytes == 0
    prompt = [chat_ids(loaded, PROMPTS[0])]
    ours = decode_logits(forward, loaded, prompt, steps=2)
    theirs = decode_logits(HfForward(loaded.model), loaded, prompt, steps=2)
    for mine, hf in zip(ours, theirs, strict=True):
        assert torch.equal(mine, hf)


@pytest.mark.parametrize("rows", [2, len(PROMPTS)])
def test_a_batch_keeps_each_rows_logits(loaded: LoadedModel, rows: int) -> None:
    prompts = [chat_ids(loaded, prompt) for prompt in PROMPTS[:rows]]
    assert rows < PACK_ROWS
    ours = decode_logits(loaded.forward, loaded, prompts, steps=3)
    theirs = decode_logits(HfForward(loaded.model), loaded, prompts, steps=3)
    for mine, hf in zip(ours, theirs, strict=True):
        # Another GEMM kernel: float rounding may differ, the choice must not.
        torch.testing.assert_close(mine, hf, rtol=0, atol=1e-3)
        assert torch.equal(mine.argmax(-1), hf.argmax(-1))


async def test_a_batch_decodes_each_prompt_as_hf_does_alone(
    engine: Engine, loaded: LoadedModel
) -> None:
    greedy = Sampling(temperature=0.0, max_tokens=16)
    handles = [engine.submit(chat_ids(loaded, prompt), greedy) for prompt in PROMPTS]
    results = await asyncio.gather(*(collect(handle) for handle in handles))
    reference = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32)
    with torch.inference_mode():
        for prompt, ours in zip(PROMPTS, results, strict=True):
            ids = chat_ids(loaded, prompt)
            output = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
            theirs = [t for t in output[0, len(ids) :].tolist() if t not in loaded.eos_token_ids]
            assert ours == theirs, prompt


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def test_int8_weights_keep_hugging_faces_forward() -> None:
    model = tiny_llama()
    assert lean_forward_for(model) is not None
    hold_weights(model, "int8")
    assert lean_forward_for(model) is None


def test_other_architectures_keep_hugging_faces_forward() -> None:
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    assert lean_forward_for(GPT2LMHeadModel(config).eval()) is None
