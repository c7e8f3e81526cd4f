"""Shared fixtures: the converted model and the real stack started with `llmos up`.

The stack fixture runs the README's `llmos up` as a child process on free ports, with the
real default model, and waits until `llmos status` reports every service healthy. Tests
talk to it over real gRPC. It is session-scoped: starting it costs seconds, and tests that
break a process (SIGKILL of the runtime) wait for the supervisor to bring it back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from stacktools import DEFAULT_MODEL, REPO, Stack, start_stack, stop_stack

from llmos.services.runtime.models import converted_dir, resolve_model_dir

if TYPE_CHECKING:
    from llmos.services.runtime.engine import LoadedModel


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The data directory whose `models/` folder every test stack links: what one stack
    prepares there (the safety service's exported encoder, a converted model) the next one
    reuses. Stacks that need no language model (the echo runtime) start from this one, so
    they neither convert the model nor export the encoder again.

    LLMOS_TEST_DATA_DIR points elsewhere; the default lives in the ignored .llmos/ folder,
    so a fresh clone (as in CI) exercises the real conversion and export.
    """
    path = Path(os.environ.get("LLMOS_TEST_DATA_DIR", REPO / ".llmos" / "test-data"))
    (path / "models").mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def model_data_dir(shared_data_dir: Path) -> Path:
    """The shared data directory, holding the converted default model (converted once)."""
    resolve_model_dir(
        DEFAULT_MODEL, shared_data_dir, progress=lambda message: print(message, flush=True)
    )
    return shared_data_dir


@pytest.fixture(scope="session")
def loaded(model_data_dir: Path) -> LoadedModel:
    """The default model's float32 weights in this process, for the tests that drive the
    engine or its forward pass in-process: loaded once, not once per module (seconds each).
    Tests read it and make their own `Engine`s on it; none changes or releases it."""
    from llmos.services.runtime.engine import load_model  # torch: only when a test needs it

    return load_model(DEFAULT_MODEL, str(converted_dir(model_data_dir, DEFAULT_MODEL)))


@pytest.fixture(scope="session")
def stack(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_path = tmp_path_factory.mktemp("stack") / "llmos-up.log"
    running = start_stack(model_data_dir, log_path)
    try:
        running.wait_healthy(timeout_s=120)
        yield running
    finally:
        with contextlib.suppress(Exception):
            stop_stack(running)
