"""Fixtures of the face-pipeline tests: the LFW folder and one shared pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def lfw_dir(data_dir: Path) -> Path:
    """``<data root>/lfw`` (data root: ``$VEILFACE_DATA``, else ``<repo>/../shared/data``)."""
    lfw = data_dir / "lfw"
    if not lfw.is_dir():
        pytest.skip(f"LFW not found at {lfw}: set VEILFACE_DATA to the folder holding lfw/")
    return lfw
