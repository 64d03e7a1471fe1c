"""Per-RPC hostile generators of ``veilface bench chaos`` (the generic ones are in chaos_fuzz).

Each generator knows what its RPC means and breaks exactly one thing a
correct server must notice (Expect.FAIL), or sends something it cannot
tell from a legitimate request (Expect.ANY, always on the attacker's own
tenant X). Generators are keyed by method name; one whose method is gone
from the descriptors is simply not used, and one whose message fields
changed fails to build and is counted in ``generator_errors``.

Victims: tenant A (keys k1, k2) and B are only ever sent requests that a
correct server refuses; a request that a server might accept is sent as X.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from veilface.bench.chaos_bombs import crafted_context
from veilface.bench.chaos_fuzz import (
    FAILING_CORRUPTIONS,
    LOADABLE_CORRUPTIONS,
    Call,
    Case,
    Expect,
    Gen,
    Rng,
    Rpc,
    Setup,
    bearer,
    corrupt,
    declare_bins,
    pick,
)
from veilface.bench.chaos_world import TENANT_A, TENANT_B, TENANT_X, World
from veilface.proto.v1 import veilface_pb2 as pb

F, A = Expect.FAIL, Expect.ANY
HUGE_IDS = (0, 2**63 - 1, 2**63, 2**64 - 1)
BAD_IDS = ("", "A" * 65, "a b", "../k1", "é", "k\x00", "A" * 10_000)
SPECIFIC: dict[str, list[tuple[str, Gen, float]]] = {}


def gen(method: str, weight: float = 1.0) -> Callable[[Gen], Gen]:
    def register(fn: Gen) -> Gen:
        SPECIFIC.setdefault(method, []).append((fn.__name__.removeprefix("g_"), fn, weight))
        return fn

    return register


def one_call(name: str, rpc: Rpc, msgs: Any, token: str | None, expect: Expect, **kw: Any) -> Case:
    if rpc.streaming:
        seq = msgs if isinstance(msgs, list) else [msgs]
        payload: bytes | list[bytes] = [m.SerializeToString() for m in seq]
    else:
        payload = msgs.SerializeToString()
    return Case(name, [Call(rpc.path, payload, bearer(token), expect, **kw)])


def broken_probe(r: Rng, w: World, key: str) -> tuple[list[bytes], Expect]:
    """A probe for ``key`` broken one way: a wrong count, or one ciphertext corrupted."""
    good = list(w.samples.probes[key])
    kind = pick(r, ("count", "count", *FAILING_CORRUPTIONS, *LOADABLE_CORRUPTIONS, "foreign"))
    if kind == "count":
        n = int(pick(r, (0, len(good) - 1, len(good) + 1, 5000)))
        return (good * (n // len(good) + 1))[:n] if n <= 2 * len(good) else [b"\0" * 16] * n, F
    i = int(r.integers(len(good)))
    if kind == "foreign":  # another tenant's valid ciphertext: same parameters, cannot be told
        good[i] = w.samples.probes["a.k1" if key.startswith("x") else "x.k1"][i]
        return good, A
    good[i] = corrupt(r, good[i], kind)
    return good, (F if kind in FAILING_CORRUPTIONS else A)


def token_of(w: World, tenant: str) -> str:
    return w.tokens[tenant]


def fresh_handle(r: Rng) -> str:
    return "chaos-" + r.bytes(12).hex()


# -- Tenants ----------------------------------------------------------------------


@gen("CreateTenant")
def g_create_tenant_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    tid = pick(r, ("", "A", "-x", "x" * 64, "x" * 100_000, "a/b", "é", "a\x00b", " a", TENANT_A, TENANT_B))
    return one_call("create_tenant_bad", rpc, pb.CreateTenantRequest(tenant_id=tid), w.admin_token, F)


@gen("RegisterKey", 2.0)
def g_register_key_bad_context(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    from veilface.bench.chaos_bombs import ContextParts

    ctx = w.samples.context
    parts = ContextParts.parse(ctx)
    kind = pick(r, (*FAILING_CORRUPTIONS, "flipped", "bad_magic", "huge_header", "trailing",
                    "lying_sizes", "param_set", "dim", "secret_section", "missing_galois",
                    "extra_galois", "zero_galois"))
    expect = F
    ks = w.key("x.k1")
    lay = ks.state.keys().layout
    if kind in FAILING_CORRUPTIONS or kind == "flipped":
        blob = corrupt(r, ctx, kind)
        expect = F if kind != "flipped" else A
    elif kind == "bad_magic":
        blob = b"VFPC2\n" + ctx[6:]
    elif kind == "huge_header":
        blob = ctx[:6] + b"\xff\xff\xff\xff" + ctx[10:]
    elif kind == "trailing":
        blob = ctx + b"\0" * int(r.integers(1, 100))
    elif kind == "lying_sizes":
        h = dict(parts.header)
        h["sections"] = [[n, int(v) * int(pick(r, (0, 2, -1)))] for n, v in parts.header["sections"]]  # type: ignore[attr-defined]
        blob = parts.encode(header=h)
    elif kind in ("param_set", "dim"):
        h = dict(parts.header)
        if kind == "param_set":
            h["param_set"] = pick(r, ("n2048", "n8192", "", "n4096 "))
        else:
            h["dim"] = int(pick(r, (0, 1, 64, 10**9, -128)))
        blob = ContextParts(h, parts.sections).encode()
    elif kind == "secret_section":
        blob = ContextParts(parts.header, {**parts.sections, "secret_key": b"\1" * 64}).encode()
    else:  # zero Galois keys: one giant step missing, 8 rotations too many, or exactly the set
        steps = list(lay.key_steps)
        if kind == "missing_galois":
            steps.remove(lay.galois_steps[0])
        elif kind == "extra_galois":
            steps += [s_ for s_ in range(1, 2048) if s_ not in steps][:8]
            # item 1: a context must carry exactly the keys the layout needs
        else:
            expect = A  # well-formed; the server cannot know the keys are zero
        blob = crafted_context(ks, ctx, steps=steps)
    req = pb.RegisterKeyRequest(tenant_id=TENANT_X, key_id="kz" + r.bytes(4).hex(), public_context=blob)
    return one_call("register_key_bad_context", rpc, req, token_of(w, TENANT_X), expect, note=kind)


@gen("RegisterKey")
def g_register_key_bad_id(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    if r.integers(3) == 0:  # A's existing key id with another key's context: never replaced
        req = pb.RegisterKeyRequest(tenant_id=TENANT_A, key_id="k1", public_context=w.samples.context)
        return one_call("register_key_bad_id", rpc, req, token_of(w, TENANT_A), F)
    req = pb.RegisterKeyRequest(tenant_id=TENANT_X, key_id=pick(r, BAD_IDS), public_context=w.samples.context)
    return one_call("register_key_bad_id", rpc, req, token_of(w, TENANT_X), F)


@gen("RegisterCenter")
def g_register_center_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    key = pick(r, ("x.k1", "x.k2"))
    probe, _ = broken_probe(r, w, key)
    if r.integers(3) == 0:  # a valid center for a key that already has bins: refused
        probe = list(w.samples.probes[key])
    key_id = key.split(".")[1] if r.integers(4) else pick(r, ("k9", *BAD_IDS))
    req = pb.RegisterCenterRequest(tenant_id=TENANT_X, key_id=key_id, center_ciphertexts=probe)
    return one_call("register_center_bad", rpc, req, token_of(w, TENANT_X), F)


@gen("DescribeTenant")
def g_describe_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    req = pb.DescribeTenantRequest(tenant_id=pick(r, ("", "A" * 64, "x" * 100_000, "é", TENANT_B)))
    return one_call("describe_bad", rpc, req, token_of(w, TENANT_X), F)


# -- Photos -------------------------------------------------------------------------


@gen("UploadPhoto")
def g_upload_photo_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    ks = w.key("x.k1")
    req = pb.UploadPhotoRequest(tenant_id=TENANT_X, handle=ks.handles[1], sealed_photo=r.bytes(512),
                                protection="blur")
    kind = pick(r, ("empty", "huge", "protection", "handle", "unknown_handle"))
    expect = F
    if kind == "empty":
        req.sealed_photo = b""
    elif kind == "huge":
        req.sealed_photo = b"\0" * (10 * 1024 * 1024 + int(r.integers(1, 1000)))
    elif kind == "protection":
        req.protection = pick(r, ("", "none", "A" * 1000, "BLUR"))
    elif kind == "handle":
        req.handle = pick(r, ("", "h" * 513))
    else:
        req.handle, expect = fresh_handle(r), A
    return one_call("upload_photo_bad", rpc, req, token_of(w, TENANT_X), expect, note=kind)


@gen("ListPhotos")
def g_list_photos_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    req = pb.ListPhotosRequest(tenant_id=TENANT_X, handle=pick(r, ("", "h" * 513, "h" * 100_000)))
    return one_call("list_photos_bad", rpc, req, token_of(w, TENANT_X), F)


@gen("FetchPhoto")
def g_fetch_photo_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    other = w.samples.photo_ids[TENANT_B]
    pid = pick(r, (other, other, "", "p" * 65, "p" * 100_000, secrets.token_hex(8)))
    tenant = pick(r, (TENANT_X, TENANT_A))
    return one_call("fetch_photo_bad", rpc, pb.FetchPhotoRequest(tenant_id=tenant, photo_id=pid), token_of(w, tenant), F)


# -- Enrollment ---------------------------------------------------------------------


@gen("ReserveSlots")
def g_reserve_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    ks = w.key("x.k1")
    req = pb.ReserveSlotsRequest(tenant_id=TENANT_X, key_id="k1", label="", count=1)
    kind = pick(r, ("count", "count", "key", "label"))
    if kind == "count":
        req.count = int(pick(r, (0, ks.capacity + 1, 2**31, 2**32 - 1)))
    elif kind == "key":
        req.key_id = pick(r, ("k9", *BAD_IDS))
    else:
        req.label = "L" * int(pick(r, (129, 4096, 100_000)))
    return one_call("reserve_bad", rpc, req, token_of(w, TENANT_X), F, note=kind)


@gen("ReserveSlots", 0.3)
def g_reserve_flood(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """Many reservations at once (each holds slots for its TTL)."""
    counts = [int(pick(r, (1, 64, 2048))) for _ in range(8)]
    calls = [
        Call(rpc.path, pb.ReserveSlotsRequest(tenant_id=TENANT_X, key_id="k1", count=c).SerializeToString(),
             bearer(token_of(w, TENANT_X)), A)
        for c in counts
    ]
    return Case("reserve_flood", calls)


def _reserve(s: Setup, w: World, tenant: str, key_id: str) -> str:
    resp = s.unary("Enrollment/ReserveSlots", pb.ReserveSlotsRequest(tenant_id=tenant, key_id=key_id, count=1),
                   token_of(w, tenant), pb.ReserveSlotsResponse)
    return str(resp.reservation_id) if resp is not None else "forged-" + secrets.token_hex(8)


@gen("Enroll", 2.0)
def g_enroll_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    cts = list(w.samples.contribution)
    first = pb.EnrollRequest(tenant_id=TENANT_X, key_id="k1", handles=[fresh_handle(r)])
    kind = pick(r, ("forged", "other_tenant", "other_key", "handles", "existing", "few", "many",
                    "corrupt", "flipped", "staged_id", "switch", "empty", "valid"))
    expect = F
    first.reservation_id = "forged-" + secrets.token_hex(8) if kind == "forged" else _reserve(s, w, TENANT_X, "k1")
    if kind == "other_tenant":
        first.reservation_id = _reserve(s, w, TENANT_B, "k1")
    elif kind == "other_key":
        first.key_id = "k2"
    elif kind == "handles":
        del first.handles[:]
        first.handles.extend(pick(r, ([], ["h1", "h2"], [""], ["h" * 513])))
    elif kind == "existing":
        first.handles[0] = w.key("x.k1").handles[1]
    elif kind == "few":
        cts = cts[: len(cts) - int(r.integers(1, len(cts)))]
    elif kind == "many":
        cts = cts + cts[: int(r.integers(1, 8))]
    elif kind in ("corrupt", "flipped"):
        i = int(r.integers(len(cts)))
        cts[i] = corrupt(r, cts[i], pick(r, FAILING_CORRUPTIONS) if kind == "corrupt" else "flipped")
        expect = F if kind == "corrupt" else A
    elif kind == "staged_id":
        first.staged_id = int(pick(r, HUGE_IDS[1:]))
    elif kind == "valid":
        expect = A
    half = len(cts) // 2
    first.ciphertexts.extend(cts[:half])
    rest = pb.EnrollRequest(ciphertexts=cts[half:])
    if kind == "switch":
        rest.reservation_id = "other"
    msgs = [] if kind == "empty" else [first, rest]
    token = token_of(w, TENANT_X)
    return one_call("enroll_bad", rpc, msgs, token, expect, note=kind)


@gen("Enroll", 0.5)
def g_enroll_cut(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """Half a contribution, then the client dies or cancels: nothing may be written."""
    handle = fresh_handle(r)
    cts = list(w.samples.contribution)
    first = pb.EnrollRequest(tenant_id=TENANT_X, key_id="k1", reservation_id=_reserve(s, w, TENANT_X, "k1"),
                             handles=[handle], ciphertexts=cts[:64])
    return one_call("enroll_cut", rpc, [first], token_of(w, TENANT_X), F, cut=pick(r, ("raise", "cancel")),
                absent=((TENANT_X, handle),))


def _chunk(w: World, r: Rng, n: int = 4, **over: Any) -> pb.BulkEnrollChunk:
    c = pb.BulkEnrollChunk(tenant_id=TENANT_X, key_id="k1", label="", handles=[fresh_handle(r) for _ in range(n)],
                           slots=list(range(n)), ciphertexts=list(w.samples.bulk))
    for k, v in over.items():
        field = getattr(c, k)
        if isinstance(v, list):
            del field[:]
            field.extend(v)
        else:
            setattr(c, k, v)
    return c


@gen("BulkEnroll", 2.0)
def g_bulk_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    kind = pick(r, ("tenant", "mismatch", "no_handles", "slots", "dup_slots", "count", "corrupt",
                    "flipped", "replaces_foreign", "replaces_huge", "replaces_late", "existing",
                    "key", "empty", "declared", "valid"))
    expect, msgs = F, [declare_bins(_chunk(w, r), 1)]
    c = msgs[0]
    if kind == "tenant":
        c.tenant_id = pick(r, (TENANT_A, TENANT_B))
    elif kind == "mismatch":
        del c.slots[-1]
    elif kind == "no_handles":
        del c.handles[:], c.slots[:]
    elif kind == "slots":
        c.slots[0] = int(pick(r, (w.key("x.k1").capacity, 2**31, 2**32 - 1)))
    elif kind == "dup_slots":
        c.slots[1] = c.slots[0]
    elif kind == "count":
        del c.ciphertexts[:]
        c.ciphertexts.extend([b"\0" * 16] * int(pick(r, (0, 1, 127, 129, 5000))))
    elif kind in ("corrupt", "flipped"):
        i = int(r.integers(len(c.ciphertexts)))
        c.ciphertexts[i] = corrupt(r, c.ciphertexts[i], pick(r, FAILING_CORRUPTIONS) if kind == "corrupt" else "flipped")
        expect = F if kind == "corrupt" else A
    elif kind == "replaces_foreign":  # B's or A's bins, swapped out by X's stream
        b, v = pick(r, (*w.key("b.k1").bins, *w.key("a.k1").bins))
        c.replaces.add(bin_id=b, version=v)
    elif kind == "replaces_huge":
        c.replaces.add(bin_id=int(pick(r, HUGE_IDS)), version=int(pick(r, HUGE_IDS)))
    elif kind == "replaces_late":
        b, v = w.key("x.k1").bins[0]
        second = _chunk(w, r)
        second.replaces.add(bin_id=b, version=v)
        declare_bins(c, 2)
        msgs.append(second)
    elif kind == "existing":
        c.handles[0] = w.key("x.k1").handles[0]
    elif kind == "key":
        c.key_id = pick(r, ("k9", *BAD_IDS))
    elif kind == "empty":
        msgs = []
    elif kind == "declared":  # a declared length the stream does not keep (ended cleanly)
        if "total_bins" not in c.DESCRIPTOR.fields_by_name:
            return one_call("bulk_bad", rpc, [], token_of(w, TENANT_X), F, note=kind)
        declared, sent = pick(r, ((0, 1), (2, 1), (3, 1), (1, 2), (2**32 - 1, 1)))
        c.total_bins = declared
        msgs += [_chunk(w, r) for _ in range(sent - 1)]
    else:
        expect = A
    return one_call("bulk_bad", rpc, msgs, token_of(w, TENANT_X), expect, note=kind)


@gen("BulkEnroll", 0.5)
def g_bulk_cut(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """1-3 valid bins of a longer declared stream, then the client dies or cancels: no bin may appear."""
    msgs = [_chunk(w, r) for _ in range(int(r.integers(1, 4)))]
    declare_bins(msgs[0], len(msgs) + int(r.integers(1, 3)))
    absent = tuple((TENANT_X, h) for m in msgs for h in m.handles)
    return one_call("bulk_cut", rpc, msgs, token_of(w, TENANT_X), F, cut=pick(r, ("raise", "cancel")),
                    absent=absent)


@gen("FetchSubjectBin")
def g_fetch_subject_bin_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    handle = pick(r, (w.key("b.k1").handles[0], w.key("a.k1").handles[0], "", "h" * 513, fresh_handle(r)))
    return one_call("fetch_subject_bin_bad", rpc, pb.FetchSubjectBinRequest(tenant_id=TENANT_X, handle=handle),
                token_of(w, TENANT_X), F)


@gen("DeleteSubject")
def g_delete_subject_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    kind = pick(r, ("foreign_handle", "bin", "version", "count", "corrupt", "not_staged"))
    if kind == "not_staged":  # A's own subject, named as if staged: it is in a bin, refused
        ks = w.key("a.k1")
        req = pb.DeleteSubjectRequest(tenant_id=TENANT_A, handle=ks.handles[0])
        return one_call("delete_subject_bad", rpc, req, token_of(w, TENANT_A), F, note=kind)
    if kind == "corrupt":  # A's subject with its real bin and version, the re-pack is garbage
        ks = w.key("a.k1")
        b, v = ks.bins[0]
        cts = [corrupt(r, w.samples.contribution[0], pick(r, FAILING_CORRUPTIONS))] * ks.n_ct
        req = pb.DeleteSubjectRequest(tenant_id=TENANT_A, handle=ks.handles[0], bin_id=b, bin_version=v,
                                      ciphertexts=cts)
        return one_call("delete_subject_bad", rpc, req, token_of(w, TENANT_A), F, note=kind)
    ks = w.key("x.k1")
    b, v = ks.bins[0]
    req = pb.DeleteSubjectRequest(tenant_id=TENANT_X, handle=ks.handles[2], bin_id=b, bin_version=v,
                                  ciphertexts=list(w.samples.contribution))
    if kind == "foreign_handle":
        req.handle = w.key("b.k1").handles[0]
    elif kind == "bin":
        req.bin_id = int(pick(r, (*HUGE_IDS, w.key("b.k1").bins[0][0], w.key("x.k2").bins[0][0])))
    elif kind == "version":
        req.bin_version = int(pick(r, HUGE_IDS))
    else:
        del req.ciphertexts[:]
        req.ciphertexts.extend(list(w.samples.contribution)[: int(pick(r, (0, 1, 127)))])
    return one_call("delete_subject_bad", rpc, req, token_of(w, TENANT_X), F, note=kind)


@gen("EnrollStaged", 1.5)
def g_enroll_staged_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    req = pb.EnrollStagedRequest(tenant_id=TENANT_X, key_id="k1", label="", handle=fresh_handle(r),
                                 ciphertext=w.samples.staged)
    kind = pick(r, (*FAILING_CORRUPTIONS, "huge", "label", "handle", "key", "existing", "foreign", "flipped",
                    "valid"))
    expect = F
    if kind in FAILING_CORRUPTIONS:
        req.ciphertext = corrupt(r, w.samples.staged, kind)
    elif kind == "huge":
        req.ciphertext = w.samples.staged + b"\0" * (600 * 1024)
    elif kind == "label":
        req.label = "L" * 129
    elif kind == "handle":
        req.handle = pick(r, ("", "h" * 513))
    elif kind == "key":
        req.key_id = pick(r, ("k9", *BAD_IDS))
    elif kind == "existing":
        req.handle = w.key("x.k1").handles[0]
    else:  # another key's ciphertext, a flipped one, a valid one: cannot be told apart
        if kind == "foreign":
            req.ciphertext = w.samples.probes["a.k1"][0]
        elif kind == "flipped":
            req.ciphertext = corrupt(r, w.samples.staged, "flipped")
        expect = A
    return one_call("enroll_staged_bad", rpc, req, token_of(w, TENANT_X), expect, note=kind)


@gen("FetchStaged")
def g_fetch_staged_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    if r.integers(2):
        req = pb.FetchStagedRequest(tenant_id=TENANT_X, key_id="k1", limit=2**32 - 1)
        return one_call("fetch_staged_bad", rpc, req, token_of(w, TENANT_X), A)
    req = pb.FetchStagedRequest(tenant_id=TENANT_X, key_id=pick(r, ("k9", *BAD_IDS)))
    return one_call("fetch_staged_bad", rpc, req, token_of(w, TENANT_X), F)


@gen("ListBins")
def g_list_bins_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    req = pb.ListBinsRequest(tenant_id=TENANT_X, key_id=pick(r, ("k9", *BAD_IDS)))
    return one_call("list_bins_bad", rpc, req, token_of(w, TENANT_X), F)


@gen("FetchBin")
def g_fetch_bin_bad(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    bin_id = int(pick(r, (*HUGE_IDS, w.key("b.k1").bins[0][0], w.key("a.k1").bins[0][0], w.key("a.k2").bins[0][0])))
    return one_call("fetch_bin_bad", rpc, pb.FetchBinRequest(tenant_id=TENANT_X, bin_id=bin_id), token_of(w, TENANT_X), F)
