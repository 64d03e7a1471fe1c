"""The liveness gate of the face pipeline: order, policy, skipping, loading, bad input.

Runs on small random-init artifacts whose head forces every decision
(``tests/client/liveness_artifacts.py``) and a fake detector: no dlib.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.client.conftest import FakeDetector
from tests.client.liveness_artifacts import make_artifact, read_members, rewrite
from veilface.client.face import FaceBox, FacePipeline
from veilface.client.face.errors import (
    ColourImageRequired,
    FaceTooSmall,
    MultipleFaces,
    NoFaceFound,
)
from veilface.client.liveness import (
    DEFAULT_LIVENESS,
    LIVENESS_SKIPPED,
    LivenessGate,
    LivenessModel,
    LivenessScore,
    liveness_record,
)
from veilface.client.liveness import model as model_module
from veilface.errors import FaceError, PresentationAttackDetected, VeilfaceError
from veilface.nn.liveness_io import LivenessModelInvalid

BOX = FaceBox(100, 100, 200, 200)
RNG = np.random.default_rng(7)
SCENE = RNG.integers(0, 256, (320, 320, 3), dtype=np.uint8)  # colourful noise


class RecordingDetector(FakeDetector):
    """FakeDetector that remembers whether it was asked to embed."""

    def __init__(self, boxes: list[FaceBox]) -> None:
        super().__init__(boxes)
        self.embedded = 0

    def align_and_embed(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        self.embedded += 1
        return super().align_and_embed(rgb, box)


def pipe(liveness: object, *, boxes: list[FaceBox] | None = None, **kw: object) -> FacePipeline:
    return FacePipeline(
        RecordingDetector([BOX] if boxes is None else boxes),
        min_sharpness=0,
        liveness=liveness,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# -- order and policy ------------------------------------------------------------------


def test_a_live_face_is_embedded_with_its_score(live_artifact: Path) -> None:
    p = pipe(live_artifact)
    emb = p.embed(SCENE)
    assert isinstance(emb.liveness, LivenessScore)
    assert emb.liveness.live and emb.liveness.score > 0.99
    assert emb.liveness.threshold == 0.5
    assert emb.liveness.model_fingerprint == LivenessModel(live_artifact).fingerprint
    assert p.backend.embedded == 1  # type: ignore[attr-defined]


def test_an_attack_is_refused_before_it_is_embedded(attack_artifact: Path) -> None:
    p = pipe(attack_artifact)
    with pytest.raises(PresentationAttackDetected) as info:
        p.embed(SCENE)
    err = info.value
    assert err.score < 0.01 and err.threshold == 0.5
    assert err.model_fingerprint == LivenessModel(attack_artifact).fingerprint
    assert "presentation attack" in err.message and f"{err.score}" not in err.message
    assert p.backend.embedded == 0  # type: ignore[attr-defined]


def test_policy_record_embeds_and_records_the_attack(attack_artifact: Path) -> None:
    p = pipe(attack_artifact, liveness_policy="record")
    emb = p.embed(SCENE)
    assert isinstance(emb.liveness, LivenessScore)
    assert emb.liveness.live is False and emb.liveness.score < 0.01
    assert liveness_record(emb.liveness)["live"] is False


def test_liveness_none_is_recorded_as_skipped() -> None:
    emb = pipe(None).embed(SCENE)
    assert emb.liveness is LIVENESS_SKIPPED
    assert emb.liveness.skipped and emb.liveness.reason == "skipped by liveness=None"
    assert liveness_record(emb.liveness) == {"skipped": True, "reason": "skipped by liveness=None"}


def test_unknown_policy_and_liveness_types_are_refused(live_artifact: Path) -> None:
    with pytest.raises(ValueError, match="liveness_policy"):
        pipe(live_artifact, liveness_policy="warn")
    with pytest.raises(TypeError, match="liveness must be"):
        pipe(42)


def test_embed_many_counts_a_spoof_as_a_refusal(attack_artifact: Path) -> None:
    out = pipe(attack_artifact).embed_many([SCENE, SCENE], progress=False)
    assert [type(r).__name__ for r in out] == ["PresentationAttackDetected"] * 2


# -- the quality gate comes first; faces the model cannot judge ---------------------------


def test_quality_gate_runs_before_the_liveness_gate(attack_artifact: Path) -> None:
    with pytest.raises(NoFaceFound):
        pipe(attack_artifact, boxes=[]).embed(SCENE)
    with pytest.raises(MultipleFaces):
        pipe(attack_artifact, boxes=[BOX, FaceBox(10, 10, 60, 60)]).embed(SCENE)
    with pytest.raises(FaceTooSmall, match="minimum of 40"):
        pipe(attack_artifact, boxes=[FaceBox(10, 10, 30, 30)]).embed(SCENE)


def test_a_face_too_small_for_the_liveness_model_is_refused(live_artifact: Path) -> None:
    # 20 px face, crop region 2.5 x 20 = 50 px < the model's 64 px input
    tiny = pipe(live_artifact, boxes=[FaceBox(100, 100, 120, 120)], min_face_px=1)
    with pytest.raises(FaceTooSmall, match="liveness model's input of 64"):
        tiny.embed(SCENE)
    assert tiny.backend.embedded == 0  # type: ignore[attr-defined]
    # the same face with liveness=None is the quality gate's business only
    assert pipe(None, boxes=[FaceBox(100, 100, 120, 120)], min_face_px=1).embed(SCENE)


@pytest.mark.parametrize("policy", ["refuse", "record"])
def test_grey_images_are_refused_by_the_gate(live_artifact: Path, policy: str) -> None:
    grey_2d = SCENE.mean(axis=2).astype(np.uint8)  # (H, W): load_image replicates it to RGB
    for grey in (grey_2d, grey_2d[:, :, None], np.repeat(grey_2d[:, :, None], 3, axis=2)):
        with pytest.raises(ColourImageRequired, match="colour"):
            pipe(live_artifact, liveness_policy=policy).embed(grey)
    # grey is fine without the gate (dlib works on grey), and says it was not checked
    assert pipe(None).embed(grey_2d).liveness is LIVENESS_SKIPPED


def test_rgba_is_composited_and_scored_like_rgb(live_artifact: Path) -> None:
    model = LivenessModel(live_artifact)
    gate = LivenessGate(model)
    rgba = np.dstack([SCENE, np.full(SCENE.shape[:2], 255, np.uint8)])
    a = pipe(model).embed(rgba).liveness
    b = gate.check(SCENE, BOX)
    assert isinstance(a, LivenessScore) and isinstance(b, LivenessScore)
    assert a.score == pytest.approx(b.score, abs=1e-6)
    half = rgba.copy()
    half[:, :, 3] = 128  # composited over white, then scored (still colour)
    assert isinstance(pipe(model).embed(half).liveness, LivenessScore)


def test_a_box_outside_the_image_is_refused(live_artifact: Path) -> None:
    with pytest.raises(FaceTooSmall, match="outside"):
        LivenessGate(live_artifact).check(SCENE, FaceBox(400, 400, 480, 480))


# -- loading: the default lazily and once; a gate that cannot run refuses --------------------


def test_the_default_model_loads_on_first_use_and_once(
    monkeypatch: pytest.MonkeyPatch, live_artifact: Path
) -> None:
    monkeypatch.setattr(model_module, "default_model_path", lambda: live_artifact)
    p = pipe(DEFAULT_LIVENESS)
    assert p.liveness._model is None  # nothing loaded at construction
    first = p.embed(SCENE).liveness
    model = p.liveness._model
    assert model is not None and isinstance(first, LivenessScore)
    p.embed(SCENE)
    assert p.liveness._model is model


def test_a_missing_default_refuses_rather_than_passing_faces(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(model_module, "default_model_path", lambda: tmp_path / "default.vfpad")
    p = FacePipeline(RecordingDetector([BOX]), min_sharpness=0)  # default liveness
    with pytest.raises(LivenessModelInvalid, match=r"not installed.*liveness=None"):
        p.embed(SCENE)
    assert p.backend.embedded == 0  # type: ignore[attr-defined]
    # embed_many does not count it as one photo's refusal: it propagates
    with pytest.raises(LivenessModelInvalid):
        p.embed_many([SCENE], progress=False)
    assert not isinstance(LivenessModelInvalid("x"), FaceError)


def test_torch_missing_refuses_at_construction(
    monkeypatch: pytest.MonkeyPatch, live_artifact: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(LivenessModelInvalid, match="needs torch"):
        pipe(live_artifact)


# -- bad artifacts: a clear error at construction, never a silent accept ----------------------


def test_a_missing_or_foreign_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LivenessModelInvalid, match="no liveness model"):
        pipe(tmp_path / "absent.vfpad")
    junk = tmp_path / "photo.vfpad"
    junk.write_bytes(b"\xff\xd8\xff\xe0 not a zip")
    with pytest.raises(LivenessModelInvalid, match="not a liveness artifact"):
        pipe(junk)
    other = tmp_path / "other.zip"
    rewrite(other, {"format": "something-else"}, b"", refingerprint=False)
    with pytest.raises(LivenessModelInvalid, match="not a veilface liveness artifact"):
        pipe(other)


def test_a_truncated_or_corrupt_file_is_refused(live_artifact: Path, tmp_path: Path) -> None:
    data = live_artifact.read_bytes()
    cut = tmp_path / "cut.vfpad"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LivenessModelInvalid):
        pipe(cut)
    manifest, weights = read_members(live_artifact)
    flipped = bytearray(weights)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(LivenessModelInvalid, match="digest"):
        pipe(rewrite(tmp_path / "flip.vfpad", manifest, bytes(flipped), refingerprint=False))


def test_a_manifest_edited_after_export_is_refused(live_artifact: Path, tmp_path: Path) -> None:
    manifest, weights = read_members(live_artifact)
    manifest["threshold"] = 0.01  # someone lowering the bar
    with pytest.raises(LivenessModelInvalid, match="fingerprint does not match"):
        pipe(rewrite(tmp_path / "edited.vfpad", manifest, weights, refingerprint=False))


def test_another_version_is_refused(live_artifact: Path, tmp_path: Path) -> None:
    manifest, weights = read_members(live_artifact)
    manifest["format_version"] = 2
    with pytest.raises(LivenessModelInvalid, match="format version 2"):
        pipe(rewrite(tmp_path / "v2.vfpad", manifest, weights, refingerprint=True))


def test_another_architecture_is_refused(live_artifact: Path, tmp_path: Path) -> None:
    manifest, _ = read_members(live_artifact)
    arch = manifest["architecture"]
    with pytest.raises(LivenessModelInvalid, match="architecture 'minifasnet'"):
        pipe(make_artifact(tmp_path / "mf.vfpad", architecture={**arch, "name": "minifasnet"}))
    deeper = {**arch, "config": {**arch["config"], "layers": 6}}
    deeper["model_id"] = arch["model_id"].replace("-l4-", "-l6-")
    with pytest.raises(LivenessModelInvalid, match="weights do not fit"):
        pipe(make_artifact(tmp_path / "deep.vfpad", architecture=deeper))
    with pytest.raises(LivenessModelInvalid, match="model id"):
        pipe(make_artifact(tmp_path / "id.vfpad", architecture={**arch, "model_id": "x"}))


# -- the error --------------------------------------------------------------------------


def test_presentation_attack_detected_in_the_error_tree() -> None:
    from veilface.cli.common import EXIT_ATTACK, error_exit

    err = PresentationAttackDetected("spoof", score=0.12, threshold=0.5, model_fingerprint="ab" * 32)
    assert isinstance(err, FaceError) and isinstance(err, VeilfaceError)
    assert err.status == "INVALID_ARGUMENT"
    assert math.isnan(PresentationAttackDetected("bare").score)  # one-argument form works
    code, line = error_exit(err)
    assert code == EXIT_ATTACK == 3
    assert "0.120" in line and "0.500" in line and "abababababab" in line
    assert error_exit(NoFaceFound("none")) == (2, "veilface: error: none")
