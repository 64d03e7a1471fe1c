"""Kiosk exports: a state without what a kiosk does not need, an SDK that refuses the rest, a query-only token."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veilface.bench.synthetic import SyntheticFaces
from veilface.client.admin import AdminClient
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.crypto.keystore import generate_key_file, open_blob
from veilface.errors import FailedPrecondition, KeystoreError, PermissionDenied
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

DIM = 128


@pytest.fixture(scope="module")
def faces() -> tuple[np.ndarray, list[str], np.ndarray]:
    emb, labels = SyntheticFaces().sample(60, 2, seed=5)
    return emb[0::2], [str(x) for x in labels[0::2]], emb[1::2]


@pytest.fixture()
def full_state(faces: tuple[np.ndarray, list[str], np.ndarray]) -> TenantState:
    gallery = faces[0]
    st = TenantState.new("kiosk-co", dim=DIM)
    st.train_router(gallery, nlist=2)
    st.center = gallery.mean(axis=0) / np.linalg.norm(gallery.mean(axis=0))
    return st


def _sealed_payload(path: Path, key_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clear header, decrypted secret part) of a state file, read as an attacker with the key would."""
    doc = json.loads(path.read_bytes())
    header = {k: v for k, v in doc.items() if k != "sealed"}
    aad = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return header, json.loads(open_blob(doc["sealed"], aad=aad, key_file=key_file))


def test_kiosk_file_lacks_what_a_kiosk_does_not_need(
    full_state: TenantState, tmp_path: Path
) -> None:
    key = generate_key_file(tmp_path / "k.key")
    full_state.save(tmp_path / "full.vfk", key_file=key)
    full_state.export_kiosk().save(tmp_path / "kiosk.vfk", key_file=key)
    full_state.export_kiosk(keep_router=False).save(tmp_path / "strict.vfk", key_file=key)

    header, full = _sealed_payload(tmp_path / "full.vfk", key)
    assert "role" not in header and full["photo_key"] and full["router"]
    header, kiosk = _sealed_payload(tmp_path / "kiosk.vfk", key)
    assert header["role"] == "kiosk"
    assert kiosk["photo_key"] == ""  # no photo key
    assert kiosk["router"] is not None and kiosk["label_key"] == full["label_key"]  # routed queries
    for needed in ("secret_key", "handle_key", "mixing_seed", "center", "threshold"):
        assert kiosk[needed] == full[needed]
    header, strict = _sealed_payload(tmp_path / "strict.vfk", key)
    assert strict["photo_key"] == "" and strict["router"] is None and strict["label_key"] == ""
    # No state holds relinearization or Galois keys: only the secret key's serialization.
    assert set(kiosk) == {
        "secret_key",
        "label_key",
        "handle_key",
        "photo_key",
        "mixing_seed",
        "router",
        "threshold",
        "center",
    }

    loaded = TenantState.load(tmp_path / "kiosk.vfk", key_file=key)
    assert loaded.role == "kiosk" and loaded.photo_key == b"" and loaded.router is not None
    assert TenantState.load(tmp_path / "full.vfk", key_file=key).role == "full"

    # The role is authenticated: dropping it from the header breaks the file.
    doc = json.loads((tmp_path / "kiosk.vfk").read_bytes())
    del doc["role"]
    (tmp_path / "edited.vfk").write_text(json.dumps(doc))
    (tmp_path / "edited.vfk").chmod(0o600)
    with pytest.raises(KeystoreError):
        TenantState.load(tmp_path / "edited.vfk", key_file=key)


def test_export_needs_the_centering_vector() -> None:
    with pytest.raises(FailedPrecondition, match="centering"):
        TenantState.new("early", dim=DIM).export_kiosk()


def test_kiosk_sdk_refuses_before_any_rpc(full_state: TenantState, faces: Any) -> None:
    """Nothing listens on the target: a refusal that needed an RPC would be UNAVAILABLE instead."""
    gallery, names, _ = faces
    kiosk = full_state.export_kiosk()
    with VeilClient("127.0.0.1:9", kiosk, token="vf_unused", encrypt_workers=0, timeout_s=2) as c:
        calls: list[Callable[[], object]] = [
            lambda: c.enroll(names[0], gallery[0]),
            lambda: c.enroll_many(names[:2], gallery[:2]),
            lambda: c.delete(names[0]),
            lambda: c.repack(),
            lambda: c.repack(nlist=2),
            lambda: c.fold_staged(),
            lambda: c.register_key(),
            lambda: c.register_center(),
            lambda: c.calibrate(gallery),
            lambda: c.train_routing(gallery, nlist=2),
            lambda: c.list_photos(names[0]),
            lambda: c.fetch_photo("p"),
            lambda: c.upload_photo(names[0], None),  # type: ignore[arg-type]
        ]
        for call in calls:
            with pytest.raises(PermissionDenied, match="kiosk"):
                call()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, faces: tuple[np.ndarray, list[str], np.ndarray]
) -> Iterator[tuple[LocalServer, TenantState, str]]:
    """A server with a routed gallery of 60, enrolled by the back office; a kiosk's query token."""
    gallery, names, _ = faces
    with LocalServer(tmp_path_factory.mktemp("kiosk") / "kiosk.db", workers=1) as srv:
        with AdminClient(srv.target, token=srv.admin_token) as admin:
            first = admin.create_tenant("kiosk-co")
        state = TenantState.new("kiosk-co", dim=DIM)
        with VeilClient(srv.target, state, token=first.api_token, encrypt_workers=0) as office:
            office.register_key()
            office.train_routing(gallery, nlist=2)
            office.enroll_many(names, gallery)
        with AdminClient(srv.target, token=first.api_token) as mgr:
            query = mgr.create_token("kiosk-co", name="kiosk-1", scopes=["query"])
        yield srv, state.export_kiosk(), query.api_token


def test_kiosk_identifies_and_verifies_with_a_query_token(served: Any, faces: Any) -> None:
    srv, kiosk, token = served
    gallery, names, probes = faces
    with VeilClient(srv.target, kiosk, token=token, encrypt_workers=0) as c:
        for i in (3, 17):
            assert c.identify(probes[i]).subject_id == names[i]
            assert c.identify(probes[i], mode="routed", nprobe=2).subject_id == names[i]
        genuine, impostor = c.verify(names[5], probes[5]), c.verify(names[6], probes[5])
        g, p = gallery[5] / np.linalg.norm(gallery[5]), probes[5] / np.linalg.norm(probes[5])
        # exact, as for the back office
        assert genuine.score == pytest.approx(float(g @ p), abs=1e-3)
        assert genuine.score > impostor.score


def test_query_token_cannot_read_the_gallery_back(served: Any, faces: Any) -> None:
    srv, kiosk, token = served
    handle = kiosk.handles().encode(faces[1][0])
    with VeilClient(srv.target, kiosk, token=token, encrypt_workers=0) as c:
        tr, t = c.transport, kiosk.tenant_id
        for method, req in (
            (tr.enrollment.FetchBin, pb.FetchBinRequest(tenant_id=t, bin_id=1)),
            (tr.enrollment.ListBins, pb.ListBinsRequest(tenant_id=t, key_id=kiosk.key_id)),
            (tr.enrollment.FetchStaged, pb.FetchStagedRequest(tenant_id=t, key_id=kiosk.key_id)),
            (tr.enrollment.FetchSubjectBin, pb.FetchSubjectBinRequest(tenant_id=t, handle=handle)),
            (
                tr.enrollment.DeleteSubject,
                pb.DeleteSubjectRequest(tenant_id=t, handle=handle, bin_id=1),
            ),
            (tr.tenants.RegisterKey, pb.RegisterKeyRequest(tenant_id=t, key_id="k9")),
        ):
            with pytest.raises(PermissionDenied, match="'manage'"):
                tr.call(method, req)


def test_keys_export_cli(full_state: TenantState, tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    full_state.save(tmp_path / "full.vfk", key_file=key)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "veilface.cli.main",
            "keys",
            "export",
            "--role",
            "kiosk",
            "--state",
            str(tmp_path / "full.vfk"),
            "--key-file",
            str(key),
            "--out",
            str(tmp_path / "kiosk.vfk"),
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["role"] == "kiosk"
    kiosk = TenantState.load(tmp_path / "kiosk.vfk", key_file=key)
    assert (
        kiosk.role == "kiosk"
        and kiosk.photo_key == b""
        and kiosk.secret_key == full_state.secret_key
    )
