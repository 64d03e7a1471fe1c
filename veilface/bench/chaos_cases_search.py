"""Per-RPC hostile generators of ``veilface bench chaos``: identification and tokens.

See :mod:`veilface.bench.chaos_cases` for the rules every generator follows.
"""

from __future__ import annotations

import secrets

from veilface.bench.chaos_cases import (
    BAD_IDS,
    HUGE_IDS,
    A,
    F,
    broken_probe,
    fresh_handle,
    gen,
    one_call,
    token_of,
)
from veilface.bench.chaos_fuzz import Call, Case, Rng, Rpc, Setup, bearer, pick
from veilface.bench.chaos_world import TENANT_A, TENANT_X, World
from veilface.proto.v1 import veilface_pb2 as pb

# -- Identification -------------------------------------------------------------------


@gen("Preselect", 2.0)
def g_preselect_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    key = pick(r, ("x.k1", "x.k1", "x.k1", "a.k1"))
    tenant = w.key(key).tenant_id
    probe, expect = broken_probe(r, w, key)
    req = pb.PreselectRequest(tenant_id=tenant, key_id=key.split(".")[1], mode=pb.SEARCH_MODE_STRICT,
                              probe_ciphertexts=probe)
    kind = pick(r, ("probe", "probe", "mode", "labels", "routed_none", "routed_many", "routed_long",
                    "unknown_label", "key"))
    if kind != "probe":
        req.ClearField("probe_ciphertexts")
        req.probe_ciphertexts.extend(w.samples.probes[key])
        expect = F
    if kind == "mode":
        req.mode = int(pick(r, (0, 3, 99, 2**31 - 1)))
    elif kind == "labels":
        req.labels.append("L1")
    elif kind == "routed_none":
        req.mode = pb.SEARCH_MODE_ROUTED
    elif kind == "routed_many":
        req.mode = pb.SEARCH_MODE_ROUTED
        req.labels.extend([f"L{i}" for i in range(5000)])
    elif kind == "routed_long":
        req.mode = pb.SEARCH_MODE_ROUTED
        req.labels.append("L" * 129)
    elif kind == "unknown_label":  # no bin matches: the probe must still be checked before kept
        req.mode = pb.SEARCH_MODE_ROUTED
        req.labels.append("no-such-list")
        req.ClearField("probe_ciphertexts")
        req.probe_ciphertexts.extend([r.bytes(len(b)) for b in w.samples.probes[key]])
    elif kind == "key":
        req.key_id = pick(r, ("k9", *BAD_IDS))
    if expect is A and tenant != TENANT_X:  # never a maybe-accepted request on a victim
        req.tenant_id, req.key_id = TENANT_X, "k1"
        req.ClearField("probe_ciphertexts")
        req.probe_ciphertexts.extend(probe if key.startswith("x") else w.samples.probes["x.k1"])
    return one_call("preselect_bad", rpc, req, token_of(w, req.tenant_id), expect, note=kind)


@gen("Preselect", 0.2)
def g_preselect_burst(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """16 valid searches at once from the attacker's tenant (a load spike, not an error)."""
    req = pb.PreselectRequest(tenant_id=TENANT_X, key_id="k1", mode=pb.SEARCH_MODE_STRICT,
                              probe_ciphertexts=w.samples.probes["x.k1"]).SerializeToString()
    return Case("preselect_burst", [Call(rpc.path, req, bearer(token_of(w, TENANT_X)), A) for _ in range(16)])


def _query_id(s: Setup, w: World, key: str) -> str:
    ks = w.key(key)
    resp = s.unary("Identification/Preselect",
                   pb.PreselectRequest(tenant_id=ks.tenant_id, key_id=ks.key_id, mode=pb.SEARCH_MODE_STRICT,
                                       probe_ciphertexts=w.samples.probes[key]),
                   token_of(w, ks.tenant_id), pb.ScoresResponse)
    return str(resp.query_id) if resp is not None else secrets.token_urlsafe(12)


def _unloadable_probe(r: Rng, w: World) -> list[bytes]:
    """A probe of x.k1 that no server may score: a wrong count or a ciphertext that cannot load."""
    probe, expect = broken_probe(r, w, "x.k1")
    return probe if expect is F else [b"\0" * 32] * len(probe)


@gen("ScoreCandidates", 2.0)
def g_score_candidates_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    kind = pick(r, ("cross_key_a", "cross_key_x", "foreign_bin", "huge_bin", "slot", "many", "none",
                    "unknown_query", "foreign_query", "query_bad_probe", "probe"))
    x1 = w.key("x.k1")
    tenant, key, probe = TENANT_X, "k1", list(w.samples.probes["x.k1"])
    cands: list[tuple[int, list[int]]] = [(x1.bins[0][0], [0])]
    query_id = ""
    if kind == "cross_key_a":  # issue 10 item 9: a k1 bin scored under k2 on the victim
        tenant, key, probe = TENANT_A, "k2", list(w.samples.probes["a.k2"])
        cands = [(w.key("a.k1").bins[0][0], [0])]
    elif kind == "cross_key_x":
        key, probe, cands = "k2", list(w.samples.probes["x.k2"]), [(x1.bins[0][0], [0])]
    elif kind == "foreign_bin":
        cands = [(pick(r, (*w.key("b.k1").bins, *w.key("a.k1").bins))[0], [0])]
    elif kind == "huge_bin":
        cands = [(int(pick(r, HUGE_IDS)), [0])]
    elif kind == "slot":
        cands = [(x1.bins[0][0], [int(pick(r, (x1.capacity, 2**31, 2**32 - 1)))])]
    elif kind == "many":
        cands = [(x1.bins[0][0] + i, [0]) for i in range(300)]
    elif kind == "none":
        cands = []
    elif kind == "unknown_query":
        probe, query_id = [], secrets.token_urlsafe(12)
    elif kind == "foreign_query":
        probe, query_id = [], _query_id(s, w, "b.k1")
    elif kind == "query_bad_probe":  # a valid query id, and a probe that cannot load
        query_id = _query_id(s, w, "x.k1")
        probe = _unloadable_probe(r, w) or [b"\0" * 16]  # never empty: that alone is valid
    else:
        probe = _unloadable_probe(r, w)
    req = pb.ScoreCandidatesRequest(tenant_id=tenant, key_id=key, probe_ciphertexts=probe, query_id=query_id,
                                    candidates=[pb.CandidateSlots(bin_id=b, slots=sl) for b, sl in cands])
    return one_call("score_candidates_bad", rpc, req, token_of(w, tenant), F, note=kind)


@gen("Verify", 1.5)
def g_verify_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    kind = pick(r, ("cross_key", "foreign_handle", "unknown", "long", "probe"))
    if kind == "cross_key":  # A's k1 subject with a k2 probe
        req = pb.VerifyRequest(tenant_id=TENANT_A, handle=w.key("a.k1").handles[0], key_id="k2",
                               probe_ciphertexts=w.samples.probes["a.k2"])
        return one_call("verify_bad", rpc, req, token_of(w, TENANT_A), F, note=kind)
    req = pb.VerifyRequest(tenant_id=TENANT_X, handle=w.key("x.k1").handles[0], key_id="k1",
                           probe_ciphertexts=w.samples.probes["x.k1"])
    expect = F
    if kind == "foreign_handle":
        req.handle = w.key("b.k1").handles[0]
    elif kind == "unknown":
        req.handle = fresh_handle(r)
    elif kind == "long":
        req.handle = "h" * int(pick(r, (513, 100_000)))
    else:
        probe, expect = broken_probe(r, w, "x.k1")
        req.ClearField("probe_ciphertexts")
        req.probe_ciphertexts.extend(probe)
    return one_call("verify_bad", rpc, req, token_of(w, TENANT_X), expect, note=kind)


@gen("FetchSlotMaps")
def g_fetch_slot_maps_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """Other tenants' and other keys' bins are left out (OK); too many bins are refused."""
    cls = pb.FetchSlotMapsRequest
    x1 = w.key("x.k1")
    kind = pick(r, ("many", "key", "foreign"))
    req = cls(tenant_id=TENANT_X, key_id="k1")
    if kind == "many":
        for i in range(int(pick(r, (65, 5000)))):
            req.known.add(bin_id=x1.bins[0][0] + i, version=0)
        return one_call("fetch_slot_maps_bad", rpc, req, token_of(w, TENANT_X), F, note=kind)
    if kind == "key":
        req.key_id = pick(r, ("k9", *BAD_IDS))
        req.known.add(bin_id=x1.bins[0][0], version=0)
        return one_call("fetch_slot_maps_bad", rpc, req, token_of(w, TENANT_X), F, note=kind)
    for b, _v in (*w.key("b.k1").bins, *w.key("a.k1").bins):
        req.known.add(bin_id=b, version=int(pick(r, HUGE_IDS)))
    return one_call("fetch_slot_maps_bad", rpc, req, token_of(w, TENANT_X), A, note=kind)


# -- Tokens ----------------------------------------------------------------------------


@gen("CreateToken")
def g_create_token_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    cls = pb.CreateTokenRequest
    req = cls(tenant_id=TENANT_X, name="chaos-" + r.bytes(3).hex(), scopes=[1])
    kind = pick(r, ("scopes", "name", "tenant"))
    token = token_of(w, TENANT_X)
    if kind == "scopes":
        del req.scopes[:]
        req.scopes.extend(pick(r, ([], [0], [99], [2**31 - 1], [-1])))
    elif kind == "name":
        req.name = pick(r, ("", "n" * 65, "a b", "é", "\x00"))
    else:  # X mints a token for A
        req.tenant_id = TENANT_A
    return one_call("create_token_bad", rpc, req, token, F, note=kind)


@gen("RevokeToken")
def g_revoke_token_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    cls = pb.RevokeTokenRequest
    tenant = pick(r, (TENANT_X, TENANT_A))
    tid = pick(r, ("", "t_" + r.bytes(8).hex(), "t" * 1000, "../t"))
    return one_call("revoke_token_bad", rpc, cls(tenant_id=tenant, token_id=tid), token_of(w, TENANT_X), F)
