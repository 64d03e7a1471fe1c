"""Both bin layouts over a real server: complex packing's imaginary half, and keys made before it.

Layout 2 (new keys) puts two templates in each slot; a gallery past 2,048
templates uses the imaginary half (virtual slots 2048..4095) of its bins.
Layout 1 keys (made before complex packing: no ``layout_version`` in their
public context or tenant file) keep their layout, keep serving, and move
to layout 2 with a key rotation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.server.conftest import create_tenant, plaintext_top1
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.crypto.public_context import MAGIC
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crowd() -> tuple[np.ndarray, list[str]]:
    """2,120 identities, one template each (past one layout-1 bin, within one layout-2 bin)."""
    emb, labels = SyntheticFaces().sample(2120, 1, seed=5)
    return emb, [str(x) for x in labels]


def _old_context(blob: bytes) -> bytes:
    """A public context as veilface wrote it before complex packing: no layout_version field."""
    (hlen,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(blob[start : start + hlen])
    assert header.pop("layout_version") == 1
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + blob[start + hlen :]


def _cosines(gallery: np.ndarray, probe: np.ndarray) -> np.ndarray:
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return np.asarray(g @ (probe / np.linalg.norm(probe)))


def test_complex_bins_use_their_imaginary_half(server: LocalServer, crowd) -> None:  # type: ignore[no-untyped-def]
    gallery, names = crowd
    token = create_tenant(server, "complex-co")
    state = TenantState.new("complex-co", dim=128)
    assert state.layout_version == 2
    with VeilClient(server.target, state, token=token, encrypt_workers=0) as c:
        info = c.register_key()
        assert (info.capacity, info.probe_ciphertexts) == (4096, 32)
        c.enroll_many(names[:2100], gallery[:2100])  # one bin, 52 templates in the imaginary half
        for n, g in zip(names[2100:2110], gallery[2100:2110]):  # staged, folded at once
            c.enroll(n, g, fold="now")
        direct = [c.enroll(n, g, staged=False) for n, g in zip(names[2110:], gallery[2110:])]
        key = c.describe().keys[0]
        assert (key.bins, key.subjects) == (1, 2120)
        assert all(r.bin_id == direct[0].bin_id and r.slot >= 2048 for r in direct)
        for i in (0, 2047, 2048, 2060, 2099, 2100, 2105, 2111, 2119):
            r = c.identify(gallery[i], mode="strict", k=0)
            assert r.subject_id == names[i], i
            assert r.score == pytest.approx(1.0, abs=1e-3)
        rng = np.random.default_rng(0)
        for i in rng.choice(2120, size=6, replace=False):
            probe = gallery[i] + 0.3 * rng.normal(size=128) * np.linalg.norm(gallery[i]) / np.sqrt(128)
            cos = _cosines(gallery, probe)
            r = c.identify(probe)
            assert r.subject_id == names[plaintext_top1(gallery, probe)]
            assert r.score == pytest.approx(float(cos.max()), abs=1e-3)
            v = c.verify(names[2115], probe)  # a subject in the imaginary half
            assert v.score == pytest.approx(float(cos[2115]), abs=1e-3)
        c.delete(names[2070])  # re-packs the bin without a template of the imaginary half
        assert c.identify(gallery[2070], k=0).subject_id != names[2070]
        assert c.identify(gallery[2071], k=0).subject_id == names[2071]


def test_old_layout_key_keeps_serving_then_rotates(
    server: LocalServer, crowd, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gallery, names = crowd
    gallery, names = gallery[:300], names[:300]
    token = create_tenant(server, "old-co")
    state = TenantState.new("old-co", dim=128, layout_version=1)
    keys = state.keys()
    fresh = keys.public_context_bytes
    keys.public_context_bytes = lambda: _old_context(fresh())  # type: ignore[method-assign]
    path = tmp_path / "old.tenant"
    with VeilClient(server.target, state, token=token, encrypt_workers=0) as c:
        info = c.register_key()
        assert (info.capacity, info.probe_ciphertexts) == (2048, 16)
        c.enroll_many(names[:-4], gallery[:-4])
        c.enroll(names[-4], gallery[-4], fold="now")
        c.enroll(names[-3], gallery[-3], fold="later")  # stays staged
        c.enroll(names[-2], gallery[-2], staged=False)
        c.enroll(names[-1], gallery[-1])
        c.flush()
        state.save(path, passphrase="pw", scrypt_n=2**10)
    # The file is as an old veilface wrote it (no layout field) and reopens as layout 1.
    assert "layout_version" not in json.loads(path.read_bytes())
    old = TenantState.load(path, passphrase="pw")
    assert old.layout_version == 1
    with VeilClient(server.target, old, token=token, encrypt_workers=0) as c:
        for i in (0, 150, 295, 296, 297, 298, 299):
            assert c.identify(gallery[i]).subject_id == names[i]
        probe = gallery[7] + 0.02
        assert c.verify(names[7], probe).score == pytest.approx(float(_cosines(gallery, probe)[7]), abs=1e-3)
        assert c.verify(names[-3], probe).score == pytest.approx(float(_cosines(gallery, probe)[-3]), abs=1e-3)
        # Explicit migration: rotate to a new key (layout 2) and move the gallery.
        new_state = old.rotated("k2")
        assert new_state.layout_version == 2
        with VeilClient(server.target, new_state, token=token, encrypt_workers=0) as new:
            new.register_key()
            report = c.repack(target=new)
            assert report.subjects == 300
            k2 = {k.key_id: k for k in new.describe().keys}["k2"]
            assert k2.capacity == 4096
            for i in (0, 150, 296, 297, 299):
                assert new.identify(gallery[i]).subject_id == names[i]
