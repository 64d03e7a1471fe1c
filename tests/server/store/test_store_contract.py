"""The GalleryStore contract (server/store/base.py), method by method, on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

from veilface.errors import (
    AlreadyExists,
    FailedPrecondition,
    GalleryFull,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from veilface.server.store.base import GalleryStore
from veilface.server.store.factory import open_reader, open_store
from veilface.server.store.records import GalleryUsage, KeyBins, KeyRecord, TokenRecord

# Ciphertext-like blobs: every byte value, so a text column would mangle them.
BLOB = bytes(range(256)) * 4


def token(tenant: str, i: int = 0, *, at: float = 0.0) -> TokenRecord:
    return TokenRecord(f"t_{tenant}_{i}", tenant, f"tok{i}", f"hash-{tenant}-{i}", ("query",), at or 1.0 + i)


def tenant_with_key(store: GalleryStore, tenant: str = "acme", key_id: str = "k1") -> KeyRecord:
    store.create_tenant(tenant, token(tenant))
    return store.put_key(KeyRecord(tenant, key_id, "n4096", 128, 16, b"ctx-" + BLOB, f"fp-{key_id}"))


def enroll(store: GalleryStore, handles: list[str], *, tenant: str = "acme", label: str = "", cap: int = 8) -> int:
    res = store.reserve(tenant, "k1", label, len(handles), cap, 60.0)
    store.commit_enroll(res, handles, b"delta:" + BLOB)
    return res.bin_id


# -- tenants and tokens ----------------------------------------------------------


def test_tenants(store: GalleryStore) -> None:
    assert not store.tenant_exists("acme")
    store.create_tenant("acme", token("acme"))
    assert store.tenant_exists("acme")
    with pytest.raises(AlreadyExists):
        store.create_tenant("acme", token("acme", 1))
    assert [t.token_id for t in store.active_tokens()] == ["t_acme_0"]  # the failed one left nothing


def test_tokens_add_list_revoke(store: GalleryStore) -> None:
    store.create_tenant("acme", token("acme"))
    store.create_tenant("other", token("other"))
    with pytest.raises(NotFound):
        store.add_token(token("ghost"), max_active=4)
    store.add_token(token("acme", 1), max_active=3)
    store.add_token(token("acme", 2), max_active=3)
    with pytest.raises(ResourceExhausted):
        store.add_token(token("acme", 3), max_active=3)
    assert [t.token_id for t in store.list_tokens("acme")] == ["t_acme_0", "t_acme_1", "t_acme_2"]

    revoked = store.revoke_token("acme", "t_acme_1")
    assert revoked.revoked_at is not None and revoked.scopes == ("query",)
    again = store.revoke_token("acme", "t_acme_1")  # idempotent: the first time stays
    assert again.revoked_at == revoked.revoked_at
    with pytest.raises(NotFound):
        store.revoke_token("other", "t_acme_0")  # another tenant's token
    assert {t.token_id for t in store.active_tokens()} == {"t_acme_0", "t_acme_2", "t_other_0"}
    assert [t.token_id for t in store.list_tokens("acme", include_revoked=False)] == ["t_acme_0", "t_acme_2"]
    store.add_token(token("acme", 3), max_active=3)  # a revoked token frees its place
    assert store.list_tokens("ghost") == []


def test_revoked_tokens_are_kept_to_a_bound(store: GalleryStore) -> None:
    store.create_tenant("acme", token("acme"))
    for i in range(1, 67):
        store.add_token(token("acme", i), max_active=2)
        store.revoke_token("acme", f"t_acme_{i}")
    kept = [t for t in store.list_tokens("acme") if t.revoked_at is not None]
    assert len(kept) == 64 and "t_acme_1" not in {t.token_id for t in kept}


# -- keys ------------------------------------------------------------------------


def test_keys(store: GalleryStore) -> None:
    rec = tenant_with_key(store)
    assert store.put_key(rec) == rec  # the same key again: nothing changes
    with pytest.raises(AlreadyExists):
        store.put_key(KeyRecord("acme", "k1", "n4096", 128, 16, b"other", "fp-other"))
    got = store.get_key("acme", "k1")
    assert got == rec and isinstance(got.public_context, bytes)
    with pytest.raises(NotFound):
        store.get_key("other", "k1")
    store.put_key(KeyRecord("acme", "k2", "n8192", 512, 32, b"ctx2", "fp-k2"), max_keys=2)
    assert [k.key_id for k, _ in store.list_keys("acme")] == ["k1", "k2"]
    assert store.put_key(rec, max_keys=2) == rec  # a known key is not a new one
    with pytest.raises(ResourceExhausted):
        store.put_key(KeyRecord("acme", "k3", "n4096", 128, 16, b"ctx3", "fp-k3"), max_keys=2)


def test_list_keys_counts(store: GalleryStore) -> None:
    tenant_with_key(store)
    enroll(store, ["a", "b"])
    store.stage_template("acme", "k1", "", "s", b"x" * 10, 8)
    (_, stats), = store.list_keys("acme")
    assert (stats.subjects, stats.bins, stats.staged) == (3, 1, 1)
    assert stats.stored_bytes == len(b"delta:" + BLOB) + 10


def test_set_center(store: GalleryStore) -> None:
    tenant_with_key(store)
    with pytest.raises(NotFound):
        store.set_center("acme", "nokey", b"c")
    store.set_center("acme", "k1", b"c1")
    store.set_center("acme", "k1", b"c2")  # replaceable while the key holds nothing
    assert store.get_key("acme", "k1").center_probe == b"c2"
    enroll(store, ["a"])
    with pytest.raises(FailedPrecondition):
        store.set_center("acme", "k1", b"c3")
    assert store.get_key("acme", "k1").center_probe == b"c2"


# -- single enrollment -----------------------------------------------------------


def test_reserve_never_shares_a_slot(store: GalleryStore) -> None:
    tenant_with_key(store)
    a = store.reserve("acme", "k1", "", 3, 4, 60.0)
    b = store.reserve("acme", "k1", "", 1, 4, 60.0)
    assert a.bin_id == b.bin_id and set(a.slots).isdisjoint(b.slots)
    c = store.reserve("acme", "k1", "", 1, 4, 60.0)  # the bin is full: a new one
    assert c.bin_id != a.bin_id
    d = store.reserve("acme", "k1", "other-label", 1, 4, 60.0)
    assert d.bin_id not in (a.bin_id, c.bin_id)
    assert store.get_reservation("acme", a.reservation_id) == a
    with pytest.raises(NotFound):
        store.get_reservation("other", a.reservation_id)  # tenant-scoped
    with pytest.raises(ResourceExhausted):
        store.reserve("acme", "k1", "", 1, 4, 60.0, max_live=4)


def test_reserve_without_a_new_bin(store: GalleryStore) -> None:
    tenant_with_key(store)
    with pytest.raises(GalleryFull, match="budget reached"):
        store.reserve("acme", "k1", "", 3, 4, 60.0, no_new_bin="budget reached")  # no bin yet
    assert store.key_bins("acme", "k1") == []  # nothing was written
    a = store.reserve("acme", "k1", "", 3, 4, 60.0)
    with pytest.raises(GalleryFull, match="budget reached"):
        store.reserve("acme", "k1", "new-label", 1, 4, 60.0, no_new_bin="budget reached")
    assert store.reserve("acme", "k1", "", 1, 4, 60.0, no_new_bin="x").bin_id == a.bin_id  # room left
    with pytest.raises(GalleryFull):
        store.reserve("acme", "k1", "", 1, 4, 60.0, no_new_bin="x")  # the bin is full now
    assert [b.bin_id for b in store.key_bins("acme", "k1")] == [a.bin_id]


def test_gallery_usage_counts_every_tenant_and_state(store: GalleryStore) -> None:
    tenant_with_key(store)
    tenant_with_key(store, "beta")
    assert store.gallery_usage(count_templates=True) == GalleryUsage((), 0)
    enroll(store, ["a", "b"])
    enroll(store, ["c"], label="L")
    store.stage_template("acme", "k1", "", "s", b"one", 8)
    store.stage_bin("beta", "k1", "", "st", ["x", "y", "z"], [0, 1, 2], BLOB)  # a stream in progress
    usage = store.gallery_usage(count_templates=True)
    assert usage.keys == (KeyBins("acme", "k1", 2), KeyBins("beta", "k1", 1))
    assert usage.templates == 2 + 1 + 1 + 3
    assert store.gallery_usage().templates == -1  # not counted unless asked
    store.abort_stream("st")
    assert store.gallery_usage(count_templates=True).templates == 4


def test_expired_reservations(store: GalleryStore) -> None:
    tenant_with_key(store)
    gone = store.reserve("acme", "k1", "", 2, 4, 0.01)
    time.sleep(0.05)
    with pytest.raises(NotFound):
        store.get_reservation("acme", gone.reservation_id)
    fresh = store.reserve("acme", "k1", "", 4, 4, 60.0)  # the expired one's slots are free again
    assert fresh.slots == (0, 1, 2, 3)
    assert len(store.key_bins("acme", "k1")) == 1  # its empty bin was removed (or reused)


def test_commit_enroll(store: GalleryStore) -> None:
    tenant_with_key(store)
    res = store.reserve("acme", "k1", "L", 2, 8, 60.0)
    assert store.commit_enroll(res, ["a", "b"], BLOB) == 1
    with pytest.raises(NotFound):
        store.commit_enroll(res, ["c", "d"], BLOB)  # the reservation was used up
    res2 = store.reserve("acme", "k1", "L", 1, 8, 60.0)
    assert res2.bin_id == res.bin_id
    assert store.commit_enroll(res2, ["c"], b"second") == 2
    data = store.load_bin_data(res.bin_id)
    assert data.version == 2 and data.base is None and data.deltas == ((1, BLOB), (2, b"second"))
    assert store.occupancy([res.bin_id]) == {res.bin_id: (0, 1, 2)}
    assert store.handles_for(res.bin_id, [2, 0, 7]) == ["c", "a", ""]
    assert store.bin_subjects(res.bin_id) == [(0, "a"), (1, "b"), (2, "c")]
    ref = store.subject("acme", "b")
    assert (ref.key_id, ref.bin_id, ref.slot) == ("k1", res.bin_id, 1)
    with pytest.raises(NotFound):
        store.subject("other", "b")


def test_commit_enroll_is_atomic(store: GalleryStore) -> None:
    tenant_with_key(store)
    enroll(store, ["a"])
    res = store.reserve("acme", "k1", "", 2, 8, 60.0)
    with pytest.raises(AlreadyExists):
        store.commit_enroll(res, ["new", "a"], BLOB)  # "a" is taken: nothing of it is written
    info = store.bin_info("acme", res.bin_id)
    assert info.version == 1 and info.occupied == (0,)
    with pytest.raises(NotFound):
        store.subject("acme", "new")
    assert store.get_reservation("acme", res.reservation_id) == res  # still usable


# -- the staging area ------------------------------------------------------------


def test_staging(store: GalleryStore) -> None:
    tenant_with_key(store)
    enroll(store, ["in-bin"])
    i1 = store.stage_template("acme", "k1", "L1", "s1", BLOB, 3)
    i2 = store.stage_template("acme", "k1", "L2", "s2", b"two", 3)
    assert i2 > i1 > 0
    with pytest.raises(AlreadyExists):
        store.stage_template("acme", "k1", "L1", "s1", b"again", 3)
    with pytest.raises(AlreadyExists):
        store.stage_template("acme", "k1", "L1", "in-bin", b"x", 3)
    store.stage_template("acme", "k1", "L1", "s3", b"three", 3)
    with pytest.raises(ResourceExhausted):
        store.stage_template("acme", "k1", "L1", "s4", b"four", 3)
    assert [r.handle for r in store.staged_templates("acme", "k1")] == ["s1", "s2", "s3"]
    assert [r.handle for r in store.staged_templates("acme", "k1", ["L1"])] == ["s1", "s3"]
    assert [r.handle for r in store.staged_templates("acme", "k1", limit=1)] == ["s1"]
    assert store.staged_templates("acme", "k1", []) == []
    rec = store.staged_subject("acme", "s1")
    assert rec is not None and rec.blob == BLOB and rec.staged_id == i1 and rec.label == "L1"
    assert store.staged_subject("other", "s1") is None
    with pytest.raises(AlreadyExists):  # a staged handle cannot go into a bin
        enroll(store, ["s2"])
    store.delete_staged("acme", "s2")
    with pytest.raises(NotFound):
        store.delete_staged("acme", "s2")
    bins, staged = store.search_view("acme", "k1", None)
    assert len(bins) == 1 and [r.handle for r in staged] == ["s1", "s3"]


def test_fold_moves_a_template_in_one_transaction(store: GalleryStore) -> None:
    tenant_with_key(store)
    staged_id = store.stage_template("acme", "k1", "", "s1", BLOB, 8)
    res = store.reserve("acme", "k1", "", 1, 8, 60.0)
    with pytest.raises(NotFound):
        store.commit_enroll(res, ["s1"], b"fold", staged_id + 99)  # not that staged template
    store.commit_enroll(res, ["s1"], b"fold", staged_id)
    assert store.staged_subject("acme", "s1") is None
    assert store.subject("acme", "s1").bin_id == res.bin_id
    bins, staged = store.search_view("acme", "k1", None)
    assert [b.bin_id for b in bins] == [res.bin_id] and staged == []


# -- bulk streams ----------------------------------------------------------------


def test_bulk_stream_is_invisible_until_activated(store: GalleryStore) -> None:
    tenant_with_key(store)
    b1 = store.stage_bin("acme", "k1", "L", "st1", ["a", "b"], [0, 1], BLOB)
    b2 = store.stage_bin("acme", "k1", "L", "st1", ["c"], [0], b"bin2")
    assert store.list_bins("acme", "k1", None) == [] and store.key_bins("acme", "k1") == []
    with pytest.raises(NotFound):
        store.bin_info("acme", b1)
    assert store.load_bin_data(b1).base == BLOB  # workers check a staged bin by reading it back
    assert store.activate_stream("st1", "acme") == ([b1, b2], 3)
    assert [b.bin_id for b in store.list_bins("acme", "k1", ["L"])] == [b1, b2]
    assert store.list_bins("acme", "k1", ["other"]) == [] and store.list_bins("acme", "k1", []) == []
    assert store.bin_info("acme", b1) .occupied == (0, 1)


def test_bulk_stream_handles_are_unique_at_activation(store: GalleryStore) -> None:
    """A handle taken before a chunk fails that chunk; one taken later (twice in the
    stream, or enrolled while the stream ran) fails the activation, importing nothing."""
    tenant_with_key(store)
    enroll(store, ["old"])
    store.stage_template("acme", "k1", "", "waiting", b"one", 8)
    for taken in ("old", "waiting"):
        with pytest.raises(AlreadyExists):
            store.stage_bin("acme", "k1", "", "st0", ["new", taken], [0, 1], BLOB)
        store.abort_stream("st0")
    store.stage_bin("acme", "k1", "", "st1", ["a", "b"], [0, 1], BLOB)
    store.stage_bin("acme", "k1", "", "st1", ["a"], [0], BLOB)  # twice in the stream
    with pytest.raises(AlreadyExists):
        store.activate_stream("st1", "acme")
    store.abort_stream("st1")
    store.stage_bin("acme", "k1", "", "st2", ["c"], [0], BLOB)
    store.stage_template("acme", "k1", "", "c", b"two", 8)  # enrolled while st2 runs
    with pytest.raises(AlreadyExists):
        store.activate_stream("st2", "acme")
    store.abort_stream("st2")
    for gone in ("a", "b"):
        with pytest.raises(NotFound):
            store.subject("acme", gone)
    assert store.gallery_usage(count_templates=True).templates == 1 + 2  # old; waiting and c
    assert [b.bin_id for b in store.key_bins("acme", "k1")] == [store.subject("acme", "old").bin_id]


def test_abort_stream(store: GalleryStore) -> None:
    tenant_with_key(store)
    enroll(store, ["kept"])
    b = store.stage_bin("acme", "k1", "", "st", ["a"], [0], BLOB)
    store.abort_stream("st")
    with pytest.raises(NotFound):
        store.load_bin_data(b)
    with pytest.raises(NotFound):
        store.subject("acme", "a")
    store.stage_bin("acme", "k1", "", "st2", ["a"], [0], BLOB)  # the handle is free again
    assert store.subject("acme", "kept").slot == 0


def test_repack_swaps_bins(store: GalleryStore) -> None:
    tenant_with_key(store)
    old = enroll(store, ["a", "b"])
    version = store.bin_info("acme", old).version
    new = store.stage_bin("acme", "k1", "", "rp", ["b", "a"], [0, 1], b"repacked", repack=True)
    assert store.subject("acme", "a").bin_id == old  # the old bin serves until activation
    bins, subjects = store.activate_stream("rp", "acme", [(old, version)])
    assert (bins, subjects) == ([new], 2)
    assert store.subject("acme", "a").bin_id == new and store.handles_for(new, [0, 1]) == ["b", "a"]
    with pytest.raises(NotFound):
        store.bin_info("acme", old)


def test_repack_refusals(store: GalleryStore) -> None:
    tenant_with_key(store)
    store.create_tenant("other", token("other"))
    old = enroll(store, ["a", "b"])
    with pytest.raises(InvalidArgument):
        store.stage_bin("acme", "k1", "", "dup", ["a", "a"], [0, 1], b"x", repack=True)
    store.stage_bin("acme", "k1", "", "r1", ["a", "b"], [0, 1], b"x", repack=True)
    with pytest.raises(FailedPrecondition):
        store.activate_stream("r1", "acme", [(old, 99)])  # stale version
    with pytest.raises(NotFound):
        store.activate_stream("r1", "other", [(old, 1)])  # not that tenant's bin
    store.stage_bin("acme", "k1", "", "r2", ["a"], [0], b"x", repack=True)
    with pytest.raises(FailedPrecondition):
        store.activate_stream("r2", "acme", [(old, 1)])  # leaves "b" out
    store.stage_bin("acme", "k1", "", "r3", ["new1"], [0], b"x", repack=True)
    with pytest.raises(FailedPrecondition):
        store.activate_stream("r3", "acme", [(old, 1)], renew_handles=True)  # 1 subject for 2
    assert store.bin_subjects(old) == [(0, "a"), (1, "b")]  # every refusal left the bin whole
    store.stage_bin("acme", "k1", "", "r4", ["n1", "n2"], [0, 1], b"x", repack=True)
    bins, subjects = store.activate_stream("r4", "acme", [(old, 1)], renew_handles=True)
    assert subjects == 2 and store.subject("acme", "n2").bin_id == bins[0]


def test_dead_stream_is_removed_at_open(store_url: str) -> None:
    s = open_store(store_url)
    tenant_with_key(s)
    enroll(s, ["kept"])
    staged = s.stage_bin("acme", "k1", "", "st", ["lost"], [0], BLOB)
    s.close()  # the server "died" before the stream ended
    s = open_store(store_url)
    try:
        with pytest.raises(NotFound):
            s.load_bin_data(staged)
        assert s.subject("acme", "kept").slot == 0
        s.stage_bin("acme", "k1", "", "st2", ["lost"], [0], BLOB)  # its handle is free
    finally:
        s.close()


# -- reads -----------------------------------------------------------------------


def test_bin_reads_are_tenant_scoped(store: GalleryStore) -> None:
    tenant_with_key(store)
    tenant_with_key(store, "other")
    mine = enroll(store, ["a"])
    theirs = enroll(store, ["a"], tenant="other")  # handles are per tenant
    empty = store.reserve("acme", "k1", "E", 1, 8, 60.0).bin_id  # no ciphertext yet
    assert [b.bin_id for b in store.list_bins("acme", "k1", None)] == [mine]
    assert [(b.bin_id, b.subjects) for b in store.key_bins("acme", "k1")] == [(mine, 1), (empty, 0)]
    assert store.bin_info("acme", mine, with_occupancy=False).occupied == ()
    with pytest.raises(NotFound):
        store.bin_info("acme", theirs)
    assert [b.bin_id for b in store.bin_infos("acme", [empty, mine])] == [empty, mine]
    with pytest.raises(NotFound):
        store.bin_infos("acme", [mine, theirs])
    assert store.bin_owner(theirs) == ("other", "k1")
    with pytest.raises(NotFound):
        store.bin_owner(10**12)
    with pytest.raises(NotFound):
        store.load_bin_data(10**12)
    assert store.occupancy([mine, 10**12]) == {mine: (0,), 10**12: ()}


def test_occupancy_of_many_bins(store: GalleryStore) -> None:
    tenant_with_key(store)
    ids = [enroll(store, [f"h{i}"], label=f"L{i}") for i in range(3)]
    many = ids + list(range(10**9, 10**9 + 1200))  # more ids than one IN list holds
    occ = store.occupancy(many)
    assert [occ[b] for b in ids] == [(0,), (0,), (0,)] and len(occ) == len(many)
    assert store.handles_for(ids[0], list(range(1200))) [:2] == ["h0", ""]


def test_reader_sees_what_the_store_wrote(store_url: str) -> None:
    s = open_store(store_url)
    reader = open_reader(store_url)
    try:
        tenant_with_key(s)
        s.set_center("acme", "k1", b"center")
        b = enroll(s, ["a"])
        assert reader.load(b) == s.load_bin_data(b)
        assert reader.version(b) == 1 and reader.version(10**12) is None
        assert reader.key_context("acme", "k1") == (b"ctx-" + BLOB, "fp-k1", b"center")
        with pytest.raises(NotFound):
            reader.key_context("acme", "nokey")
        enroll(s, ["b"])  # a later write is seen on the next read
        assert reader.version(b) == 2
    finally:
        reader.close()
        s.close()


# -- maintenance -----------------------------------------------------------------


def test_compact(store: GalleryStore) -> None:
    tenant_with_key(store)
    b = enroll(store, ["a"])
    enroll(store, ["b"])
    store.compact(b, b"merged", 2)
    data = store.load_bin_data(b)
    assert (data.base, data.base_seq, data.deltas, data.version) == (b"merged", 2, (), 2)
    store.compact(b, b"older", 1)  # already compacted further: no-op
    assert store.load_bin_data(b).base == b"merged"
    store.compact(10**12, b"x", 1)  # a bin that is gone: no-op


def test_repack_delete(store: GalleryStore) -> None:
    tenant_with_key(store)
    b = enroll(store, ["a", "b"])
    store.add_photo("acme", "a", b"sealed", "blur")
    with pytest.raises(FailedPrecondition):
        store.repack_delete("acme", "a", b, 7, b"x")  # stale version
    with pytest.raises(FailedPrecondition):
        store.repack_delete("acme", "a", b + 1, 1, b"x")  # not its bin
    with pytest.raises(NotFound):
        store.repack_delete("other", "a", b, 1, b"x")
    assert store.repack_delete("acme", "a", b, 1, b"without-a") == 2
    data = store.load_bin_data(b)
    assert (data.base, data.deltas, data.version) == (b"without-a", (), 2)
    assert store.bin_subjects(b) == [(1, "b")] and store.list_photos("acme", "a") == []


# -- photos ----------------------------------------------------------------------


def test_photos(store: GalleryStore) -> None:
    tenant_with_key(store)
    enroll(store, ["a"])
    store.stage_template("acme", "k1", "", "s", b"t", 8)
    with pytest.raises(NotFound):
        store.add_photo("acme", "nobody", b"x", "blur")
    p1 = store.add_photo("acme", "a", BLOB, "blur")
    p2 = store.add_photo("acme", "s", b"staged-photo", "mask")
    assert store.get_photo("acme", p1) == ("a", BLOB, "blur")
    with pytest.raises(NotFound):
        store.get_photo("other", p1)
    with pytest.raises(NotFound):
        store.add_photo("acme", "a", b"x", "blur", replaces="no-such-photo")
    p3 = store.add_photo("acme", "a", b"newer", "pixelate", replaces=p1)
    assert store.list_photos("acme", "a") == [p3]
    store.delete_staged("acme", "s")
    with pytest.raises(NotFound):
        store.get_photo("acme", p2)  # went with its staged subject


# -- durability ------------------------------------------------------------------


def test_acknowledged_writes_survive_reopening(store_url: str) -> None:
    s = open_store(store_url)
    tenant_with_key(s)
    b = enroll(s, ["a", "b"])
    s.stage_template("acme", "k1", "", "s", BLOB, 8)
    s.add_token(token("acme", 1), max_active=4)
    s.close()
    s = open_store(store_url)
    try:
        assert s.load_bin_data(b).deltas == ((1, b"delta:" + BLOB),)
        assert s.bin_subjects(b) == [(0, "a"), (1, "b")]
        staged = s.staged_subject("acme", "s")
        assert staged is not None and staged.blob == BLOB
        assert len(s.list_tokens("acme")) == 2
    finally:
        s.close()


def test_a_nul_character_is_refused_not_an_internal_error(store: GalleryStore) -> None:
    """PostgreSQL text cannot hold NUL: a lookup by such an id is InvalidArgument there, NotFound on SQLite."""
    tenant_with_key(store)
    for call in (
        lambda: store.get_reservation("acme", "r\x00"),
        lambda: store.get_photo("acme", "p\x00"),
        lambda: store.revoke_token("acme", "t\x00"),
        lambda: store.subject("acme", "h\x00"),
    ):
        with pytest.raises((NotFound, InvalidArgument)):
            call()
    assert store.tenant_exists("acme")  # the store still answers


def test_tokens_changed_since(store: GalleryStore) -> None:
    store.create_tenant("acme", token("acme", at=100.0))
    store.add_token(token("acme", 1, at=200.0), max_active=4)
    assert [t.token_id for t in store.tokens_changed_since(150.0)] == ["t_acme_1"]
    store.revoke_token("acme", "t_acme_0")  # revoked now: changed since 150 too
    changed = store.tokens_changed_since(150.0)
    assert [t.token_id for t in changed] == ["t_acme_1", "t_acme_0"]
    assert changed[1].revoked_at is not None
    assert store.tokens_changed_since(time.time() + 60) == []
