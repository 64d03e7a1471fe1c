"""A bin of one key scored under another (issue 10, item 9, first finding).

Repro from the fault-injection run: one tenant with keys k1 and k2, both
bulk-enrolled, a center registered on a third key (which used to clear
every worker's center cache), then ``ScoreCandidates(key_id=k2,
candidates=[a bin of k1])``. It used to answer OK and cache k2's center
scores as the bin's, so every later k1 identification was wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.server.conftest import create_tenant
from veilface.client.transport import Transport
from veilface.crypto.kernel import BinKernel
from veilface.crypto.keys import TenantKeys
from veilface.crypto.public_context import PublicContext
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import NotFound
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server import worker
from veilface.server.launcher import LocalServer
from veilface.server.store.sqlite_store import SQLiteStore

FloatArray = npt.NDArray[np.float64]
TENANT = "crosskey"
N = 200


@dataclass
class Key:
    key_id: str
    crypto: TenantCrypto
    center: FloatArray
    templates: FloatArray
    bin_id: int = 0


def _unit(rng: np.random.Generator, n: int) -> FloatArray:
    x = rng.normal(size=(n, 128))
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def _register(t: Transport, key: Key) -> None:
    keys = key.crypto.keys
    t.call(
        t.tenants.RegisterKey,
        pb.RegisterKeyRequest(tenant_id=TENANT, key_id=key.key_id, public_context=keys.public_context_bytes()),
    )
    t.call(
        t.tenants.RegisterCenter,
        pb.RegisterCenterRequest(
            tenant_id=TENANT, key_id=key.key_id, center_ciphertexts=key.crypto.encrypt_probe(key.center)
        ),
    )


def _enroll(t: Transport, key: Key) -> None:
    chunk = pb.BulkEnrollChunk(
        total_bins=1,
        tenant_id=TENANT,
        key_id=key.key_id,
        label="lab",
        handles=[f"{key.key_id}-{i}" for i in range(len(key.templates))],
        slots=list(range(len(key.templates))),
        ciphertexts=key.crypto.encrypt_contribution(key.templates, np.arange(len(key.templates))),
    )
    (key.bin_id,) = t.call(t.enrollment.BulkEnroll, iter([chunk])).bin_ids


@pytest.fixture(scope="module")
def tenant(server: LocalServer) -> Iterator[tuple[Transport, Key, Key]]:
    t = Transport(server.target, token=create_tenant(server, TENANT))
    rng = np.random.default_rng(9)
    k1, k2 = (
        Key(name, TenantCrypto(TenantKeys.generate(128)), 0.3 * _unit(rng, 1)[0], _unit(rng, N))
        for name in ("k1", "k2")
    )
    for k in (k1, k2):
        _register(t, k)
        _enroll(t, k)
    yield t, k1, k2
    t.close()


def _identify_rest(t: Transport, key: Key, probe: FloatArray, slots: list[int]) -> FloatArray:
    """Preselect + ScoreCandidates on ``key``: the full scores of ``slots`` of its bin."""
    pre = t.call(
        t.identification.Preselect,
        pb.PreselectRequest(
            tenant_id=TENANT,
            key_id=key.key_id,
            mode=pb.SEARCH_MODE_STRICT,
            probe_ciphertexts=key.crypto.encrypt_probe(probe),
        ),
    )
    (b,) = [b for b in pre.bins if b.bin_id == key.bin_id]
    rest = t.call(
        t.identification.ScoreCandidates,
        pb.ScoreCandidatesRequest(
            tenant_id=TENANT,
            key_id=key.key_id,
            candidates=[pb.CandidateSlots(bin_id=key.bin_id, slots=slots)],
            query_id=pre.query_id,
        ),
    )
    (r,) = rest.bins

    def dec(msg: pb.BinScores) -> FloatArray:
        parts = [msg.scores] if msg.scores else list(msg.score_parts)
        return np.asarray(np.sum([key.crypto.decrypt_scores(p) for p in parts], axis=0))

    return np.asarray((dec(b) + dec(r))[slots])


def test_score_candidates_refuses_a_bin_of_another_key(tenant: tuple[Transport, Key, Key]) -> None:
    t, k1, k2 = tenant
    probe = _unit(np.random.default_rng(1), 1)[0]
    slots = [0, 17, 150]
    np.testing.assert_allclose(
        _identify_rest(t, k1, probe - k1.center, slots), k1.templates[slots] @ probe, atol=1e-3
    )
    # a center registered on another key used to clear every key's center cache
    k3 = Key("k3", TenantCrypto(TenantKeys.generate(128)), np.zeros(128), np.zeros((0, 128)))
    _register(t, k3)
    cross = pb.ScoreCandidatesRequest(
        tenant_id=TENANT,
        key_id="k2",
        candidates=[pb.CandidateSlots(bin_id=k1.bin_id, slots=[0])],
        probe_ciphertexts=k2.crypto.encrypt_probe(probe),
    )
    with pytest.raises(NotFound):
        t.call(t.identification.ScoreCandidates, cross)
    # k1's identification is still exact, and so is k2's
    np.testing.assert_allclose(
        _identify_rest(t, k1, probe - k1.center, slots), k1.templates[slots] @ probe, atol=1e-3
    )
    np.testing.assert_allclose(
        _identify_rest(t, k2, probe - k2.center, slots), k2.templates[slots] @ probe, atol=1e-3
    )


def test_worker_center_cache_is_per_key(tmp_path: Path) -> None:
    """Center scores cached under one key never answer for another; forget_key drops one key's."""
    SQLiteStore(tmp_path / "w.db").close()  # an empty database for the worker's reader
    worker.init(str(tmp_path / "w.db"))
    state = worker._s()
    rng = np.random.default_rng(4)
    x = _unit(rng, 8)
    kernels = {}
    for key_id in ("k1", "k2"):
        keys = TenantKeys.generate(128)
        tc = TenantCrypto(keys)
        kern = BinKernel(PublicContext.from_bytes(keys.public_context_bytes()))
        mu = _unit(rng, 1)[0]
        state.kernels[(TENANT, key_id)] = kern
        state.centers[(TENANT, key_id)] = kern.load_probe(tc.encrypt_probe(mu))
        kernels[key_id] = (tc, kern, mu)
    tc1, kern1, mu1 = kernels["k1"]
    cached = worker._CachedBin(3, kern1.load_bin(tc1.encrypt_contribution(x, np.arange(8))))
    first = state.center_scores(TENANT, "k1", 42, cached)
    assert first is not None
    np.testing.assert_allclose(
        tc1.decrypt_scores(kern1.serialize([first])[0])[:8], x @ mu1, atol=1e-3
    )
    # the same bin id and version asked under k2 is computed under k2, not served from k1's entry
    second = state.center_scores(TENANT, "k2", 42, cached)
    assert second is not first
    assert state.center_scores(TENANT, "k1", 42, cached) is first
    state.center_cache[(TENANT, "k3", 42)] = (3, first)
    worker.forget_key(TENANT, "k2")
    assert set(state.center_cache) == {(TENANT, "k1", 42), (TENANT, "k3", 42)}
    worker._state = None
