"""Shared fixtures. Every file a test writes goes under pytest's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from windq.models.synthetic import SyntheticConfig, write_synthetic_gguf


@pytest.fixture(scope="session")
def synthetic_gguf(tmp_path_factory) -> Path:
    """A 2-layer llama, widths multiples of 256, F32, byte-level vocabulary."""
    return write_synthetic_gguf(tmp_path_factory.mktemp("synthetic") / "tiny-llama-f32.gguf", SyntheticConfig())


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from windq.models.sources import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def sample_text() -> str:
    """Held-out Wikipedia text: real English, enough for a few chunks on any tokenizer."""
    from windq.models.sources import wiki_text

    return wiki_text("evaluation").content[:60_000]


@pytest.fixture(scope="session")
def synthetic_stats(synthetic_gguf, tmp_path_factory) -> Path:
    """A calibration folder for the synthetic model (512 tokens of the embedded text)."""
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import wiki_text
    from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration

    cal = calibrate(GGUFModel(synthetic_gguf), wiki_text("calibration"), CalibrationConfig(tokens=512, ctx=128))
    return save_calibration(cal, tmp_path_factory.mktemp("stats"))
