"""The one probe cache (server/probes.py), and what reaches it (issue 10, items 1 and 9)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import numpy as np
import pytest

from tests.server.conftest import create_tenant
from veilface.client.transport import Transport
from veilface.crypto.keys import TenantKeys
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import InvalidArgument, NotFound, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer
from veilface.server.probes import ProbeCache, ProbeLimits

TENANT = "probes"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(**limits: float) -> tuple[ProbeCache, Clock]:
    clock = Clock()
    base = {"max_entries": 100, "max_bytes": 1000, "max_bytes_per_tenant": 400, "ttl_s": 10.0}
    base.update(limits)
    lim = ProbeLimits(
        int(base["max_entries"]), int(base["max_bytes"]), int(base["max_bytes_per_tenant"]), base["ttl_s"]
    )
    return ProbeCache(lim, clock=clock), clock


def test_cache_bounds_bytes_per_tenant_without_touching_others() -> None:
    cache, _ = _cache()
    assert cache.put("b0", "bob", "k", [b"x" * 100])
    for i in range(6):
        assert cache.put(f"a{i}", "alice", "k", [b"x" * 50, b"y" * 50])
    assert cache.tenant_bytes("alice") == 400  # her four newest
    assert cache.get("a5", "alice", "k") and cache.get("b0", "bob", "k")
    with pytest.raises(NotFound):
        cache.get("a0", "alice", "k")
    assert cache.nbytes == 500


def test_cache_bounds_total_bytes_count_and_age() -> None:
    cache, clock = _cache(max_bytes=300, max_entries=2)
    for t in ("t1", "t2", "t3"):
        cache.put(t, t, "k", [b"x" * 100])
    assert len(cache) == 2 and cache.nbytes == 200  # count bound: oldest out
    with pytest.raises(NotFound):
        cache.get("t1", "t1", "k")
    clock.now = 10.0
    with pytest.raises(NotFound):  # expired
        cache.get("t3", "t3", "k")
    assert len(cache) == 0 and cache.nbytes == 0
    assert not cache.put("big", "t1", "k", [b"x" * 401])  # over a tenant's share: not kept
    assert len(cache) == 0


def test_cache_answers_only_its_tenant_and_key() -> None:
    cache, _ = _cache()
    cache.put("q", "alice", "k1", [b"p"])
    for tenant, key in (("bob", "k1"), ("alice", "k2")):
        with pytest.raises(NotFound):
            cache.get("q", tenant, key)
    with pytest.raises(NotFound):
        cache.get("", "alice", "k1")


@pytest.fixture(scope="module")
def tenant(server: LocalServer) -> Iterator[tuple[Transport, TenantCrypto]]:
    t = Transport(server.target, token=create_tenant(server, TENANT))
    keys = TenantKeys.generate(128)
    t.call(
        t.tenants.RegisterKey,
        pb.RegisterKeyRequest(tenant_id=TENANT, key_id="k1", public_context=keys.public_context_bytes()),
    )
    tc = TenantCrypto(keys)
    x = np.eye(128)[:4]
    chunk = pb.BulkEnrollChunk(
        total_bins=1,
        tenant_id=TENANT,
        key_id="k1",
        label="known",
        handles=[f"s{i}" for i in range(4)],
        slots=list(range(4)),
        ciphertexts=tc.encrypt_contribution(x, np.arange(4)),
    )
    t.call(t.enrollment.BulkEnroll, iter([chunk]))
    yield t, tc
    t.close()


def _preselect(t: Transport, probe: list[bytes], labels: list[str]) -> pb.ScoresResponse:
    return t.call(
        t.identification.Preselect,
        pb.PreselectRequest(
            tenant_id=TENANT,
            key_id="k1",
            mode=pb.SEARCH_MODE_ROUTED,
            labels=labels,
            probe_ciphertexts=probe,
        ),
    )


def test_preselect_loads_a_probe_before_remembering_it(tenant: tuple[Transport, TenantCrypto]) -> None:
    t, tc = tenant
    good = tc.encrypt_probe(np.ones(128) / np.sqrt(128))
    junk = [secrets.token_bytes(len(b)) for b in good]
    # no bin has this label: nothing is scored, yet the probe is loaded (and refused)
    with pytest.raises(InvalidArgument):
        _preselect(t, junk, ["no-such-label"])
    # an oversized blob is refused on arrival
    with pytest.raises(ResourceExhausted):
        _preselect(t, [secrets.token_bytes(1 << 20)] + good[1:], ["no-such-label"])
    # a good probe with no matching bin is still remembered for re-ranking
    pre = _preselect(t, good, ["no-such-label"])
    assert pre.query_id and not pre.bins


def test_score_candidates_takes_a_query_id_or_a_probe(tenant: tuple[Transport, TenantCrypto]) -> None:
    t, tc = tenant
    probe = tc.encrypt_probe(np.ones(128) / np.sqrt(128))
    pre = _preselect(t, probe, ["known"])
    (b,) = pre.bins
    req = pb.ScoreCandidatesRequest(
        tenant_id=TENANT,
        key_id="k1",
        candidates=[pb.CandidateSlots(bin_id=b.bin_id, slots=[0, 1])],
        query_id=pre.query_id,
    )
    assert len(t.call(t.identification.ScoreCandidates, req).bins) == 1
    both = pb.ScoreCandidatesRequest()
    both.CopyFrom(req)
    both.probe_ciphertexts.extend(tc.encrypt_probe(np.zeros(128)))
    with pytest.raises(InvalidArgument):  # never one of them silently ignored
        t.call(t.identification.ScoreCandidates, both)
    both.query_id = ""
    assert len(t.call(t.identification.ScoreCandidates, both).bins) == 1  # the probe alone
    both.probe_ciphertexts[0] = secrets.token_bytes(len(both.probe_ciphertexts[0]))
    with pytest.raises(InvalidArgument):  # ... and it is validated
        t.call(t.identification.ScoreCandidates, both)
    neither = pb.ScoreCandidatesRequest(tenant_id=TENANT, key_id="k1", candidates=req.candidates)
    with pytest.raises(InvalidArgument):
        t.call(t.identification.ScoreCandidates, neither)
