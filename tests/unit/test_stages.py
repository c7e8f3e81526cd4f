"""The kernel_stages setting: which of the pipeline's service stages the kernel runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmos.kernel import stages
from llmos.services.config import Settings, load_settings
from llmos.services.errors import InvalidArgument


@pytest.fixture(autouse=True)
def restore_stages() -> Iterator[None]:
    """configure() sets the process's stages; put the default back for the next test."""
    yield
    stages.configure(Settings())


def test_kernel_stages_setting_chooses_the_pipeline_stages() -> None:
    assert stages.enabled_stages() == stages.STAGE_NAMES

    stages.configure(load_settings(env={"LLMOS_KERNEL_STAGES": "", "LLMOS_DATA_DIR": "/x"}))
    assert (stages.before_model(), stages.after_model(), stages.enabled_stages()) == ((), (), ())

    stages.configure(Settings(kernel_stages=("privacy:restore", "safety:input")))
    assert [s.name for s in stages.before_model()] == ["safety:input"]
    assert [s.name for s in stages.after_model()] == ["privacy:restore"]


def test_an_unknown_stage_name_is_refused() -> None:
    with pytest.raises(InvalidArgument) as bad:
        stages.configure(Settings(kernel_stages=("safety:inputs",)))
    assert bad.value.reason == "BAD_SETTING"
    assert stages.enabled_stages() == stages.STAGE_NAMES


def test_the_default_setting_names_every_stage() -> None:
    """config.py cannot import the kernel, so it spells the names out; they must agree."""
    assert Settings().kernel_stages == stages.STAGE_NAMES
