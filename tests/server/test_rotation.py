"""Key rotation renews everything the server can link: handles, labels, photos (ISO/IEC 24745)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.server.conftest import create_tenant, plaintext_top1
from veilface.client.face import FaceBox
from veilface.client.photos import legacy_photo_key
from veilface.client.protect import deidentify
from veilface.client.routing import Router
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.errors import FailedPrecondition, InvalidArgument, NotFound
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer


@dataclass(frozen=True)
class Stored:
    """What the server's database holds for a tenant: every identifier it could link on."""

    handles: set[str]
    labels: set[str]
    photo_ids: set[str]
    photo_blobs: set[bytes]
    bin_ids: set[int]


def _stored(db: Path, tenant: str) -> Stored:
    with sqlite3.connect(db) as c:

        def q(sql: str) -> list[tuple[object, ...]]:
            return list(c.execute(sql, (tenant,)))

        handles = {h for (h,) in q("SELECT handle FROM subjects WHERE tenant_id=?")}
        handles |= {h for (h,) in q("SELECT handle FROM staged WHERE tenant_id=?")}
        handles |= {h for (h,) in q("SELECT handle FROM photos WHERE tenant_id=?")}
        labels = {lab for (lab,) in q("SELECT label FROM bins WHERE tenant_id=?")}
        labels |= {lab for (lab,) in q("SELECT label FROM staged WHERE tenant_id=?")}
        photos = q("SELECT photo_id, sealed FROM photos WHERE tenant_id=?")
        bins = {b for (b,) in q("SELECT bin_id FROM bins WHERE tenant_id=?")}
        assert not c.execute("SELECT 1 FROM stream_subjects").fetchall()
    return Stored(handles, labels, {p for p, _ in photos}, {bytes(b) for _, b in photos}, bins)


def _photo(seed: int) -> object:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(120, 100, 3), dtype=np.uint8)
    return deidentify(pixels, method="mask", faces=[FaceBox(left=30, top=30, right=70, bottom=80)])


@pytest.fixture()
def tenant(server: LocalServer, request: pytest.FixtureRequest) -> Iterator[tuple[VeilClient, str]]:
    tid = request.node.name.replace("_", "-")[:40].lower()
    token = create_tenant(server, tid)
    with VeilClient(server.target, TenantState.new(tid, dim=128), token=token, encrypt_workers=0) as c:
        c.register_key()
        yield c, token


def test_rotation_renews_handles_labels_and_photos(  # type: ignore[no-untyped-def]
    server: LocalServer, faces, tenant
) -> None:
    gallery, names, probes = faces
    old, token = tenant
    tid = old.state.tenant_id
    n = 24
    old.train_routing(gallery[:80], nlist=2)
    old.enroll_many(names[:20], gallery[:20])  # bulk
    old.enroll(names[20], gallery[20], fold="now")  # single, folded into its bin
    old.enroll(names[21], gallery[21], staged=False)  # single, straight into a bin
    old.enroll(names[22], gallery[22], fold="later")  # single, still staged
    old.enroll(names[23], gallery[23], fold="later")
    photo_ids = {old.upload_photo(names[1], _photo(1)), old.upload_photo(names[22], _photo(2))}
    photo_ids.add(old.upload_photo(names[1], _photo(3)))
    before = _stored(server.db_path, tid)
    assert len(before.handles) == n and before.photo_ids == photo_ids and len(before.labels) >= 1  # one shared tail bin or more

    new_state = old.state.rotated("k2")
    with VeilClient(server.target, new_state, token=token, encrypt_workers=0) as new:
        new.register_key()
        report = old.repack(target=new)
        assert (report.subjects, report.key_id, report.photos, report.photo_subjects_left) == (
            n, "k2", 3, 0
        )
        after = _stored(server.db_path, tid)

        # Nothing the server held before the rotation is there after it.
        assert len(after.handles) == n and len(after.photo_ids) == 3
        assert not after.handles & before.handles
        assert not after.labels & before.labels
        assert not after.photo_ids & before.photo_ids
        assert not after.photo_blobs & before.photo_blobs
        assert not after.bin_ids & before.bin_ids
        keys = {k.key_id: k for k in new.describe().keys}
        assert (keys["k2"].subjects, keys["k1"].subjects, keys["k1"].staged) == (n, 0, 0)
        assert new.state.router is not None and new.state.router.key_id == "k2"

        # The new state identifies, verifies and opens the photos; the old one finds no one.
        for i in (0, 7, 20, 21, 22, 23):
            assert new.identify(gallery[i]).subject_id == names[i]
            assert new.identify(gallery[i], mode="routed", nprobe=2).subject_id == names[i]
            assert old.identify(gallery[i]).subject_id is None
        for i in (3, 22):
            assert new.identify(probes[i]).subject_id == names[plaintext_top1(gallery[:n], probes[i])]
            assert new.verify(names[i], probes[i]).match
            with pytest.raises(NotFound):
                old.verify(names[i], probes[i])
        assert sorted(new.fetch_photo(p)[0] for p in after.photo_ids) == sorted(
            [names[1], names[1], names[22]]
        )
        assert len(new.list_photos(names[1])) == 2 and old.list_photos(names[1]) == []
        for p in photo_ids:
            with pytest.raises(NotFound):
                new.fetch_photo(p)


def test_a_rotation_stream_must_carry_every_subject(  # type: ignore[no-untyped-def]
    server: LocalServer, faces, tenant
) -> None:
    gallery, names, _ = faces
    old, token = tenant
    tid = old.state.tenant_id
    old.enroll_many(names[:10], gallery[:10])
    (ref,) = old.transport.call(
        old.transport.enrollment.ListBins, pb.ListBinsRequest(tenant_id=tid, key_id="k1")
    ).bins
    replaces = [pb.BinRef(bin_id=ref.bin_id, version=ref.version)]
    with VeilClient(server.target, old.state.rotated("k2"), token=token, encrypt_workers=0) as new:
        new.register_key()
        new.calibrate(gallery[:10])
        handles = [new.state.handles().encode(s) for s in names[:10]]
        x = new.normalize(gallery[:10])
        tr = new.transport

        def stream(k: int, renew: bool = True) -> Iterator[pb.BulkEnrollChunk]:
            for i, chunk in enumerate(new._enroller.bulk_chunks(handles[:k], x[:k], False, replaces=replaces)):
                chunk.renew_handles = renew and i == 0
                yield chunk

        with pytest.raises(FailedPrecondition, match="carries 9 subjects"):  # one subject dropped
            tr.call(tr.enrollment.BulkEnroll, stream(9))
        with pytest.raises(FailedPrecondition, match="leaves out"):  # new handles, no renew flag
            tr.call(tr.enrollment.BulkEnroll, stream(10, renew=False))
        with pytest.raises(InvalidArgument, match="renew"):  # the flag without bins to replace
            tr.call(
                tr.enrollment.BulkEnroll,
                iter([pb.BulkEnrollChunk(tenant_id=tid, key_id="k2", handles=["h"], slots=[0],
                                         renew_handles=True)]),
            )
        assert {k.key_id: k.subjects for k in new.describe().keys} == {"k1": 10, "k2": 0}
        assert old.identify(gallery[4]).subject_id == names[4]

        # A target that kept one of the old keys would be linkable: refused before any change.
        shared = dataclasses.replace(new.state, handle_key=old.state.handle_key)
        with (
            VeilClient(server.target, shared, token=token, encrypt_workers=0) as bad,
            pytest.raises(InvalidArgument, match="handle_key"),
        ):
            old.repack(target=bad)
        assert tr.call(tr.enrollment.BulkEnroll, stream(10)).subjects == 10
        assert new.identify(gallery[4]).subject_id == names[4]


def test_labels_carry_the_key_id_and_old_routers_keep_theirs() -> None:
    rng = np.random.default_rng(0)
    cents = rng.standard_normal((4, 8))
    key = bytes(range(32))
    k1, k2 = Router(cents, 1, key, "k1"), Router(cents, 1, key, "k2")
    legacy = Router(cents, 1, key)
    # same label key, list and version: the key id alone separates the labels
    assert not set(k1.labels(range(4))) & set(k2.labels(range(4)))
    assert not set(k1.labels(range(4))) & set(legacy.labels(range(4)))
    assert Router.from_dict(k1.to_dict()).labels(range(4)) == k1.labels(range(4))
    doc = legacy.to_dict()  # a router saved before key ids: still its old labels
    assert doc["format"] == "veilface-router/1" and "key_id" not in doc
    assert Router.from_dict(doc).labels(range(4)) == legacy.labels(range(4))
    with pytest.raises(InvalidArgument):
        Router.from_dict({**k1.to_dict(), "format": "veilface-router/1"})


def test_photo_key_is_its_own_and_old_states_still_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = TenantState.new("acme", dim=16)
    rotated = state.rotated("k2")
    assert len(state.photo_key) == 32 and state.photo_key != legacy_photo_key(state.handle_key)
    for name in ("label_key", "handle_key", "photo_key", "secret_key"):
        assert getattr(rotated, name) != getattr(state, name), name
    path = tmp_path / "t.vfk"
    state.save(path, passphrase="pw", scrypt_n=2**4)
    assert TenantState.load(path, passphrase="pw").photo_key == state.photo_key

    # A file written before the photo key was stored: derived from the handle key, as then.
    original = TenantState._secret_payload

    def without_photo_key(self: TenantState) -> bytes:
        doc = json.loads(original(self))
        del doc["photo_key"]
        return json.dumps(doc).encode()

    monkeypatch.setattr(TenantState, "_secret_payload", without_photo_key)
    state.save(path, passphrase="pw", scrypt_n=2**4)
    assert TenantState.load(path, passphrase="pw").photo_key == legacy_photo_key(state.handle_key)
