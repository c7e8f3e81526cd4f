"""How a loaded model's weights are held: float32 (the default) or int8.

Decoding a small model on a CPU streams every weight through memory once per step, so the
step time follows the weights' bytes more than the arithmetic. `int8` quantizes each
`nn.Linear` dynamically (PyTorch's `quantize_dynamic`: int8 weights with a per-tensor
scale, activations quantized on the fly, int8 GEMMs through fbgemm): a quarter of the
bytes, and on these 2-core machines a decoding step 2-3x faster at batch 1 and 16
(docs/performance.md). The price is exactness: outputs are no longer bit-identical to
Hugging Face `generate()` in float32, and greedy decoding can pick other tokens. That is
why it is an explicit setting (`runtime_weights = "int8"`), never the default.
"""

from __future__ import annotations

import warnings

import torch

from llmos.services.errors import InvalidArgument

WEIGHT_MODES = ("float32", "int8")


def check_weights(mode: str) -> str:
    """`mode` if it is one of WEIGHT_MODES; BAD_SETTING naming the choices otherwise."""
    if mode not in WEIGHT_MODES:
        raise InvalidArgument(
            f"runtime_weights is {mode!r}; use one of {', '.join(WEIGHT_MODES)}",
            reason="BAD_SETTING",
        )
    return mode


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes the model's weights take as held now: its parameters (each tensor once,
    so tied weights count once) plus the int8 weights and biases of quantized Linears,
    which are packed outside `parameters()`. A weight tied to a quantized Linear (the
    embedding an output layer shares) stays float32 beside the layer's int8 copy, and
    counts twice, because it is held twice."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight = module.weight()  # type: ignore[no-untyped-call]
            total += weight.numel() * weight.element_size()
            bias = module.bias()  # type: ignore[no-untyped-call]
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total


def hold_weights(model: torch.nn.Module, mode: str) -> None:
    """Hold the model's weights as `mode`, in place (float32: unchanged). In place, so the
    float32 copy is freed as each layer is swapped rather than held twice at once."""
    if check_weights(mode) == "float32":
        return
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a
        # dependency here; the eager dynamic path still works in the torch this pins.
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
