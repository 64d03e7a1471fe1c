"""Fixtures of the face-pipeline tests: the LFW folder and one shared pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from veilface.client.face.backend import FaceBox


class FakeDetector:
    """A face backend whose detector returns fixed boxes (no dlib)."""

    name = "fake"
    embedding_dim = 4

    def __init__(self, boxes: list[FaceBox]) -> None:
        self.boxes = boxes

    def load(self) -> None:
        pass

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        return list(self.boxes)

    def align_and_embed(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        return np.zeros(4, dtype=np.float32)



@pytest.fixture(scope="session")
def lfw_dir(data_dir: Path) -> Path:
    """``<data root>/lfw`` (data root: ``$VEILFACE_DATA``, else ``<repo>/../shared/data``)."""
    lfw = data_dir / "lfw"
    if not lfw.is_dir():
        pytest.skip(f"LFW not found at {lfw}: set VEILFACE_DATA to the folder holding lfw/")
    return lfw


@pytest.fixture(scope="session")
def liveness_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("liveness")


@pytest.fixture(scope="session")
def live_artifact(liveness_dir: Path) -> Path:
    """A ``.vfpad`` under which every face is live (P(live) = sigmoid(8), threshold 0.5)."""
    from tests.client.liveness_artifacts import LIVE_LOGIT, make_artifact

    return make_artifact(liveness_dir / "live.vfpad", logit=LIVE_LOGIT)


@pytest.fixture(scope="session")
def attack_artifact(liveness_dir: Path) -> Path:
    """A ``.vfpad`` under which every face is an attack (P(live) = sigmoid(-8), threshold 0.5)."""
    from tests.client.liveness_artifacts import ATTACK_LOGIT, make_artifact

    return make_artifact(liveness_dir / "attack.vfpad", logit=ATTACK_LOGIT)
