"""The runtime's estimate of a model's weights, which it reserves before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.services.runtime.reservations import weight_bytes


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * 3000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 500)  # not weights
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return tmp_path


def test_float32_for_batched_decoding_counts_the_onednn_copy(model_dir: Path) -> None:
    assert weight_bytes(model_dir, "float32", batched=True) == 2 * 4000


def test_float32_one_sequence_at_a_time_counts_the_files_once(model_dir: Path) -> None:
    assert weight_bytes(model_dir, "float32", batched=False) == 4000


def test_int8_counts_the_files_once(model_dir: Path) -> None:
    assert weight_bytes(model_dir, "int8", batched=True) == 4000


def test_float32_of_another_architecture_counts_the_files_once(model_dir: Path) -> None:
    """Only the lean Llama pass makes the oneDNN copy; others run Hugging Face's forward."""
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert weight_bytes(model_dir, "float32", batched=True) == 4000


def test_a_missing_or_unreadable_config_counts_the_files_once(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{not json")
    assert weight_bytes(model_dir, "float32", batched=True) == 4000
    (model_dir / "config.json").unlink()
    assert weight_bytes(model_dir, "float32", batched=True) == 4000
