"""VeilClient's photo operations against a real server: the liveness gate runs before any RPC.

The face backend is a fake (one box; a template derived from the pixels, so
the same photo gives the same template); the liveness artifacts are real
(``tests/client/liveness_artifacts.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.client.liveness_artifacts import brightness_model, tinted
from tests.server.conftest import create_tenant
from veilface.client.face import FaceBox, FacePipeline
from veilface.client.image_ops import ImageIdentification
from veilface.client.liveness import LIVENESS_SKIPPED, LivenessScore
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import InvalidArgument, PresentationAttackDetected
from veilface.nn.liveness_io import LivenessModelInvalid
from veilface.server.launcher import LocalServer

BOX = FaceBox(100, 100, 200, 200)


class PixelBackend:
    """One face at BOX unless the image is black; its 128-d template is seeded by the pixels."""

    name = "pixels"
    embedding_dim = 128

    def load(self) -> None:
        pass

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        return [] if int(rgb.max()) < 10 else [BOX]

    def align_and_embed(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        seed = zlib.crc32(np.ascontiguousarray(rgb).tobytes())
        return np.random.default_rng(seed).normal(size=128).astype(np.float32)


def photo(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (320, 320, 3), dtype=np.uint8)


def gated(liveness: object, **kw: Any) -> FacePipeline:
    return FacePipeline(PixelBackend(), min_sharpness=0, liveness=liveness, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with LocalServer(tmp_path_factory.mktemp("srv") / "gallery.db") as srv:
        yield srv


_tenants = iter(range(1000))


def connect(srv: LocalServer, **options: Any) -> VeilClient:
    tenant = f"live-{next(_tenants)}"
    client = VeilClient(
        srv.target, TenantState.new(tenant, dim=128), token=create_tenant(srv, tenant),
        encrypt_workers=0, **options,
    )
    client.register_key()
    return client


class RpcCounter:
    def __init__(self, client: VeilClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        inner = client.transport.call

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(client.transport, "call", counting)


def test_live_photos_enroll_identify_and_verify(server: LocalServer, live_artifact: Path) -> None:
    with connect(server, face_pipeline=gated(live_artifact)) as c:
        got = c.enroll_image("alice", photo(1), fold="now")
        assert isinstance(got.liveness, LivenessScore) and got.liveness.live
        assert got.receipt.subject_id == "alice"
        c.enroll_image("bob", photo(2), fold="now")
        found = c.identify_image(photo(1), mode="strict", top_n=2)
        assert isinstance(found, ImageIdentification)
        assert found.subject_id == "alice" and found.match
        assert found.score == pytest.approx(1.0, abs=1e-3)
        assert isinstance(found.liveness, LivenessScore) and found.liveness.live
        assert found.capture.to_json()["liveness"]["live"] is True
        same = c.verify_image("bob", photo(2))
        assert same.match and isinstance(same.liveness, LivenessScore)
        assert not c.verify_image("bob", photo(1)).match


def test_a_spoof_is_refused_before_any_rpc(
    server: LocalServer, attack_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(server, liveness=attack_artifact) as c:
        # the dlib pipeline is made on first use: the fake backend with the client's model here
        monkeypatch.setattr(c.images, "_pipeline", gated(c.images._liveness))
        rpcs = RpcCounter(c, monkeypatch)
        for call in (
            lambda: c.enroll_image("mallory", photo(3)),
            lambda: c.identify_image(photo(3)),
            lambda: c.verify_image("alice", photo(3)),
        ):
            with pytest.raises(PresentationAttackDetected) as info:
                call()
            assert info.value.score < 0.01 and info.value.threshold == 0.5
        assert rpcs.calls == 0


def test_policy_record_goes_on_and_records_the_score(
    server: LocalServer, attack_artifact: Path
) -> None:
    with connect(server, face_pipeline=gated(attack_artifact, liveness_policy="record")) as c:
        enrolled = c.enroll_image("eve", photo(4), fold="now")
        assert isinstance(enrolled.liveness, LivenessScore) and not enrolled.liveness.live
        found = c.identify_image(photo(4))
        assert found.subject_id == "eve"
        assert isinstance(found.liveness, LivenessScore)
        assert found.liveness.live is False and found.liveness.score < 0.01


def test_liveness_none_is_recorded(server: LocalServer) -> None:
    with connect(server, face_pipeline=gated(None)) as c:
        got = c.enroll_image("zoe", photo(5), fold="now")
        assert got.liveness is LIVENESS_SKIPPED
        assert c.identify_image(photo(5)).liveness is LIVENESS_SKIPPED


def _save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def test_folder_enrollment_counts_refusals_by_reason(
    server: LocalServer, live_artifact: Path, tmp_path: Path
) -> None:
    root = tmp_path / "people"
    _save(root / "alice" / "1.png", tinted(40))  # dark: a presentation attack
    _save(root / "alice" / "2.png", tinted(200))  # accepted
    _save(root / "bob" / "1.png", np.zeros((320, 320, 3), np.uint8))  # no face
    _save(root / "bob" / "2.png", photo(6).mean(axis=2).astype(np.uint8))  # grey
    (root / "carol").mkdir()
    (root / "carol" / "0.txt").write_text("not a photo")
    _save(root / "carol" / "1.png", tinted(180))
    _save(root / "carol" / "2.png", tinted(20))  # never examined: carol already passed
    (root / "carol" / ".hidden.png").write_bytes(b"")
    with connect(server, face_pipeline=gated(brightness_model(live_artifact))) as c:
        report = c.enroll_images(root)
        assert report.subjects == 2 and report.bins >= 1
        assert report.scan.subject_ids == ("alice", "carol")
        assert report.scan.without_photo == ("bob",)
        assert report.scan.photos_examined == 6
        assert report.refused == {
            "PresentationAttackDetected": 1, "NoFaceFound": 1, "ColourImageRequired": 1,
            "ImageDecodeError": 1,
        }
        spoof = next(r for r in report.scan.refusals if r.reason == "PresentationAttackDetected")
        assert spoof.subject_id == "alice" and spoof.score == pytest.approx(40 / 255, abs=0.01)
        js = report.to_json()
        assert js["presentation_attacks"] == 1 and js["photos_refused"] == 4
        assert js["liveness"]["alice"]["score"] == pytest.approx(200 / 255, abs=0.01)
        assert c.identify_image(tinted(200)).subject_id == "alice"


def test_folder_enrollment_of_spoofs_only_sends_nothing(
    server: LocalServer, attack_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spoofs"
    for i in range(3):
        _save(root / f"p{i}" / "1.png", photo(10 + i))
    with connect(server, face_pipeline=gated(attack_artifact)) as c:
        rpcs = RpcCounter(c, monkeypatch)
        with pytest.raises(InvalidArgument, match="3 refused: 3 PresentationAttackDetected"):
            c.enroll_images(root, single=True)
        assert rpcs.calls == 0
        assert c.images.scan_folder(root).refused == {"PresentationAttackDetected": 3}


def test_client_options(live_artifact: Path, tmp_path: Path) -> None:
    state = TenantState.new("opts", dim=128)
    with pytest.raises(ValueError, match="either face_pipeline"):
        VeilClient("127.0.0.1:1", state, token="t", face_pipeline=gated(None), liveness=None)
    bad = tmp_path / "bad.vfpad"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(LivenessModelInvalid):  # at construction, not at the first photo
        VeilClient("127.0.0.1:1", state, token="t", liveness=bad)
    with VeilClient("127.0.0.1:1", state, token="t", encrypt_workers=0) as c:
        assert c.images._pipeline is None  # the default pipeline and model load on first use
