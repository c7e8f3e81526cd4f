"""A lean forward pass for Llama-architecture models (SmolLM2 is one), on Hugging Face's own
weights, for the engine's prefill and decoding steps.

Why: decoding a 135M-parameter model on two CPU cores is dominated by per-operation
overhead, not arithmetic (docs/performance.md). Hugging Face's forward pays for module
calls, keyword plumbing, decorators and mask building at each of the 30 layers on every
step; this pass runs the same arithmetic as a flat loop over plain tensors, with
  - the q/k/v projections fused into one matmul, and gate/up into another (their weight
    rows stacked; Hugging Face's Linear modules are re-pointed at views of the stacked
    tensors, so the weights are held once),
  - RoPE applied to queries and keys in one go, cos/sin computed once per step,
  - keys and values written straight into the engine's preallocated `SlotKVCache`,
  - logits computed only for the positions the engine samples from,
  - batched decoding steps multiplied by oneDNN on weights reordered once at load (MKL's
    float32 GEMM repacks the whole weight on every call, which dominates at 2-16 rows:
    in-process, the bench's 16 requests took 1.27x less engine CPU; docs/performance.md).
    That is a second copy of the weights (`packed_bytes`), counted in the model's
    weight bytes.

Exactness: every operation is the one Hugging Face runs (same kernels, same order, same
attention call with the same grouped-query handling and mask), and fusing matmuls does not
change a row's dot products, so for a lone sequence (one row per matmul: MKL, as HF) the
hidden states are bit-identical to Hugging Face's (tests/integration/test_runtime_llama_forward.py
checks that), and greedy decoding of a request alone reproduces `generate()` token for
token. A batched decoding step runs oneDNN's GEMM, which rounds differently (logits within
1e-3 of HF's); the greedy choices stay the same unless two logits are that close.

Only plain float32 Llama models qualify (`lean_forward_for`); others (int8 weights, other
architectures, scaled RoPE) run Hugging Face's forward (`HfForward`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.nn import functional

from llmos.services.runtime.kv_cache import SlotKVCache


class Forward(Protocol):
    """What the engine needs from a model: hidden states for a step, logits for rows."""

    def hidden(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: SlotKVCache,
    ) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @property
    def packed_bytes(self) -> int:
        """Bytes of weight copies the pass holds beside the model's own parameters."""
        ...


class HfForward:
    """Hugging Face's own forward pass, for any model the lean pass does not cover."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def packed_bytes(self) -> int:
        return 0

    def hidden(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: SlotKVCache,
    ) -> torch.Tensor:
        output = self.model.model(
            input_ids=inputs,
            position_ids=positions,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
        hidden: torch.Tensor = output.last_hidden_state
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model.lm_head(hidden)
        return logits


# The row count oneDNN's weight layout is chosen for: the engine's full decoding batch.
PACK_ROWS = 16


class _Weight:
    """A linear layer's weight as Hugging Face holds it (`plain`, [out, in]) and, with
    `pack` and where oneDNN is built in, reordered once into oneDNN's layout for batched
    steps (`packed`)."""

    def __init__(self, plain: torch.Tensor, pack: bool) -> None:
        self.plain = plain
        self.packed: torch.Tensor | None = None
        if pack and torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            self.packed = torch.ops.mkldnn._reorder_linear_weight(plain.detach(), PACK_ROWS)

    @property
    def packed_bytes(self) -> int:
        return 0 if self.packed is None else self.plain.numel() * self.plain.element_size()


class _Layer:
    """One decoder layer's weights, stacked where their matmuls are fused."""

    def __init__(self, layer: Any, pack: bool) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm: torch.Tensor = layer.input_layernorm.weight
        self.post_norm: torch.Tensor = layer.post_attention_layernorm.weight
        self.qkv = _Weight(_stack(attention.q_proj, attention.k_proj, attention.v_proj), pack)
        self.o = _Weight(attention.o_proj.weight, pack)
        self.gate_up = _Weight(_stack(mlp.gate_proj, mlp.up_proj), pack)
        self.down = _Weight(mlp.down_proj.weight, pack)

    @property
    def weights(self) -> tuple[_Weight, ...]:
        return (self.qkv, self.o, self.gate_up, self.down)


def _stack(*linears: Any) -> torch.Tensor:
    """One weight with the linears' rows stacked; each linear then views its own rows, so
    the model holds the weights once and Hugging Face's forward (Score) still works."""
    stacked = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(stacked[start : start + rows], requires_grad=False)
        start += rows
    return stacked


def lean_forward_for(model: Any, *, batched: bool = True) -> LlamaForward | None:
    """A `LlamaForward` for a plain float32 Llama model; None for anything else (the engine
    then runs Hugging Face's forward). An engine that never decodes more than one sequence
    at a time (`batched` false) needs no oneDNN copy of the weights."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    if (
        type(model).__name__ != "LlamaForCausalLM"
        or config.hidden_act != "silu"
        or getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
        or rope.get("rope_type", "default") != "default"
        or getattr(config, "pretraining_tp", 1) != 1
        or config._attn_implementation != "sdpa"
    ):
        return None
    linears = [model.lm_head]
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        linears += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(m) is not torch.nn.Linear or m.weight.dtype != torch.float32 for m in linears):
        return None  # quantized (int8) or other-dtype weights
    return LlamaForward(model, pack=batched)


class LlamaForward:
    """The flat forward pass over a `LlamaForCausalLM`'s weights (see the module docstring)."""

    def __init__(self, model: Any, *, pack: bool = True) -> None:
        config = model.config
        base = model.model
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.eps: float = config.rms_norm_eps
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.intermediate: int = config.intermediate_size
        self.embed: torch.Tensor = base.embed_tokens.weight
        self.layers = [_Layer(layer, pack) for layer in base.layers[: config.num_hidden_layers]]
        self.norm: torch.Tensor = base.norm.weight
        self.lm_head = _Weight(model.lm_head.weight, pack)
        self.inv_freq: torch.Tensor = base.rotary_emb.inv_freq.float()
        self.attention_scaling: float = base.rotary_emb.attention_scaling

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the oneDNN copies of the weights, beside the model's own."""
        weights = [self.lm_head, *(w for layer in self.layers for w in layer.weights)]
        return sum(weight.packed_bytes for weight in weights)

    def _linear(self, hidden: torch.Tensor, weight: _Weight) -> torch.Tensor:
        """`hidden` times the weight: one row by MKL, as Hugging Face does (so a lone
        sequence stays bit-identical to it), more rows by oneDNN on the packed weight."""
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] == 1 or weight.packed is None:
            return functional.linear(hidden, weight.plain)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            rows, weight.packed, None, "none", [], ""
        )
        return out.view(*hidden.shape[:-1], weight.plain.shape[0])

    @staticmethod
    def _plain_linear(hidden: torch.Tensor, weight: _Weight) -> torch.Tensor:
        return functional.linear(hidden, weight.plain)

    def _rms(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Hugging Face's LlamaRMSNorm, operation for operation.
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return weight * (hidden * torch.rsqrt(variance + self.eps))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # LlamaRotaryEmbedding: [B, q, head_dim] cos and sin, with a heads axis added.
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos[:, :, None], sin[:, :, None]

    def hidden(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: SlotKVCache,
    ) -> torch.Tensor:
        """Hidden states [B, q, hidden] after the final norm, writing each row's keys and
        values at `positions` (the cache was `prepare`d for them); `mask` as the engine
        builds it ([B, 1, q, kv] bool), or None for a lone sequence."""
        batch, query = inputs.shape
        # Decoding steps of a batch run oneDNN; a prompt runs MKL as HF does (it is many
        # rows, where MKL is efficient, and alone it must match HF exactly).
        linear = self._linear if query == 1 else self._plain_linear
        cos, sin = self._rope(positions)
        if mask is not None and mask.dtype == torch.bool:
            # Additive once per step rather than converted by attention in every layer
            # (same result: SDPA adds -inf where a bool mask is False).
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        half = self.head_dim // 2
        qk_heads = self.heads + self.kv_heads
        hidden = functional.embedding(inputs, self.embed)
        for index, layer in enumerate(self.layers):
            normed = self._rms(hidden, layer.input_norm)
            qkv = linear(normed, layer.qkv).view(batch, query, -1, self.head_dim)
            # RoPE on queries and keys together: [B, q, heads + kv_heads, head_dim].
            qk = qkv[:, :, :qk_heads]
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = (qk * cos) + (rotated * sin)
            states = qk.transpose(1, 2)
            values = qkv[:, :, qk_heads:].transpose(1, 2)
            keys, values = cache.update(states[:, self.heads :], values, index)
            attended = self._attend(states[:, : self.heads], keys, values, mask, query)
            hidden = hidden + linear(attended, layer.o)
            normed = self._rms(hidden, layer.post_norm)
            gate_up = linear(normed, layer.gate_up)
            gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
            hidden = hidden + linear(functional.silu(gate) * up, layer.down)
        return self._rms(hidden, self.norm)

    def _attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        query: int,
    ) -> torch.Tensor:
        """transformers' sdpa_attention_forward for this case: grouped-query attention
        native when unmasked, query heads packed per key/value head for a masked single
        position, keys and values repeated for a masked prefill. Returns [B, q, hidden]."""
        batch = queries.shape[0]
        if mask is None:
            out = functional.scaled_dot_product_attention(
                queries,
                keys,
                values,
                scale=self.scaling,
                is_causal=query > 1,
                enable_gqa=self.groups > 1,
            )
        elif query == 1:
            packed = queries.reshape(batch, self.kv_heads, self.groups, self.head_dim)
            out = functional.scaled_dot_product_attention(
                packed, keys, values, attn_mask=mask, scale=self.scaling
            ).reshape(batch, self.heads, 1, self.head_dim)
        else:
            if self.groups > 1:
                keys = keys.repeat_interleave(self.groups, dim=1)
                values = values.repeat_interleave(self.groups, dim=1)
            out = functional.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=self.scaling
            )
        return out.transpose(1, 2).reshape(batch, query, self.q_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden, self.lm_head)
