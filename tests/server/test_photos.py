"""Protected photos: only protector-made images leave, sealed; tenant-scoped; deleted with the subject."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from tests.server.conftest import make_client
from veilface.client.face import FaceBox
from veilface.client.protect import UnprotectedImageError, deidentify
from veilface.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def _photo(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(120, 100, 3), dtype=np.uint8)


def test_protected_photo_round_trip_scoping_and_deletion(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    box = FaceBox(left=30, top=30, right=70, bottom=80)
    with make_client(server, "photo-a") as a, make_client(server, "photo-b") as b:
        a.enroll_many(names[:5], gallery[:5])
        protected = deidentify(_photo(), method="mask", faces=[box])
        photo_id = a.upload_photo(names[1], protected)
        assert a.list_photos(names[1]) == [photo_id]
        subject, jpeg, meta = a.fetch_photo(photo_id)
        assert subject == names[1] and jpeg[:3] == b"\xff\xd8\xff" and meta["method"] == "mask"

        # unprotected images cannot even be handed to the upload path
        for raw in (_photo(), _photo().tobytes(), "face.jpg"):
            with pytest.raises(UnprotectedImageError):
                a.upload_photo(names[1], raw)  # type: ignore[arg-type]
        # unknown subject; another tenant's token
        with pytest.raises(NotFound):
            a.upload_photo("not-enrolled", protected)
        tr = b.transport
        with pytest.raises(PermissionDenied):
            tr.call(tr.photos.FetchPhoto, pb.FetchPhotoRequest(tenant_id="photo-a", photo_id=photo_id))
        with pytest.raises(NotFound):  # B's own scope has no such photo
            tr.call(tr.photos.FetchPhoto, pb.FetchPhotoRequest(tenant_id="photo-b", photo_id=photo_id))
        # bad declared protection, oversized blob
        with pytest.raises(InvalidArgument):
            a.transport.call(
                a.transport.photos.UploadPhoto,
                pb.UploadPhotoRequest(tenant_id="photo-a", handle=a.state.handles().encode(names[1]),
                                      sealed_photo=b"x" * 100, protection="none"),
            )
        with pytest.raises(ResourceExhausted):
            a.transport.call(
                a.transport.photos.UploadPhoto,
                pb.UploadPhotoRequest(tenant_id="photo-a", handle=a.state.handles().encode(names[1]),
                                      sealed_photo=b"x" * (11 * 1024 * 1024), protection="mask"),
            )

        # the database holds no JPEG, only the sealed blob
        with sqlite3.connect(server.db_path) as db:
            blobs = [bytes(r[0]) for r in db.execute("SELECT sealed FROM photos")]
        assert blobs and all(b"\xff\xd8\xff" not in blob for blob in blobs)

        a.delete(names[1])
        with pytest.raises(NotFound):
            a.fetch_photo(photo_id)
