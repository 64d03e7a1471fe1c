"""BulkEnroll and Enroll are all-or-nothing when the client dies, cancels or its iterator raises.

A real server; the streams are cut after their first message was staged on
the server (seen in the database), which is the moment a cut stream used to
be mistaken for a clean end and committed.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.server.conftest import eventually, make_client
from veilface.client.sdk import VeilClient
from veilface.client.transport import RemoteError
from veilface.errors import InvalidArgument, NotFound, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow

BULK = "/veilface.v1.Enrollment/BulkEnroll"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    db = tmp_path_factory.mktemp("atomic") / "g.db"
    with LocalServer(db) as s:
        yield s


def _staged_bins(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT COUNT(*) FROM bins WHERE state='staged'").fetchone()[0])
    finally:
        con.close()


def _chunks(
    c: VeilClient, x: np.ndarray, prefix: str, n: int = 3, total: int | None = 3
) -> list[pb.BulkEnrollChunk]:
    """``n`` one-bin chunks of 4 subjects each; the first declares ``total`` bins."""
    out = []
    for i in range(n):
        rows = c.prepare(x[4 * i : 4 * i + 4])
        msg = pb.BulkEnrollChunk(
            tenant_id=c.state.tenant_id,
            key_id=c.state.key_id,
            label="",
            handles=[f"{prefix}-{i}-{j}" for j in range(4)],
            slots=list(range(4)),
            ciphertexts=c.crypto.encrypt_contribution(rows, list(range(4))),
        )
        if i == 0 and total is not None:
            msg.total_bins = total
        out.append(msg)
    return out


def _assert_nothing_visible(
    c: VeilClient, subjects: int, bins: int, probe: np.ndarray, name: str
) -> None:
    key = c.describe().keys[0]
    assert (key.subjects, key.bins) == (subjects, bins)
    assert c.identify(probe).subject_id == name  # a cut stream's subject never wins


@pytest.fixture(scope="module")
def tenant(srv: LocalServer, faces) -> Iterator[VeilClient]:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    with make_client(srv, "atomic") as c:
        c.enroll_many(names[:8], gallery[:8])
        yield c


_CHILD = textwrap.dedent(
    """
    import sys, time, grpc
    target, token, path = sys.argv[1:4]
    data = open(path, "rb").read()
    msgs, off = [], 0
    while off < len(data):
        n = int.from_bytes(data[off:off + 4], "big"); msgs.append(data[off + 4:off + 4 + n]); off += 4 + n
    ch = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    call = ch.stream_unary("BULK")
    def gen():
        yield msgs[0]
        print("sent", flush=True)
        time.sleep(3600)  # never sends chunks 2 and 3: SIGKILLed here
        yield from msgs[1:]
    call(gen(), metadata=[("authorization", "Bearer " + token)])
    """
).replace("BULK", BULK)


def test_bulk_client_sigkilled_after_chunk_one(srv, tenant, faces, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    before = tenant.describe().keys[0]
    for trial in range(4):
        msgs = _chunks(tenant, gallery[100 + 12 * trial :], f"kill{trial}")
        blob = b"".join(
            len(m.SerializeToString()).to_bytes(4, "big") + m.SerializeToString() for m in msgs
        )
        (tmp_path / "msgs").write_bytes(blob)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                srv.target,
                tenant.transport._metadata[0][1][7:],
                str(tmp_path / "msgs"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "sent"
            assert eventually(lambda: _staged_bins(srv.db_path) >= 1), "chunk 1 was never staged"
            time.sleep(0.1 * trial)
        finally:
            child.kill()
            child.wait()
        assert eventually(lambda: _staged_bins(srv.db_path) == 0), (
            "the cut stream's bins were not removed"
        )
        _assert_nothing_visible(tenant, before.subjects, before.bins, gallery[3], names[3])


def test_bulk_cancelled_in_process(srv, tenant, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    before = tenant.describe().keys[0]
    msgs = _chunks(tenant, gallery[160:], "cancel")
    release = threading.Event()

    def gen() -> Iterator[pb.BulkEnrollChunk]:
        yield msgs[0]
        release.wait(30)
        yield from msgs[1:]

    tr = tenant.transport
    fut = tr.enrollment.BulkEnroll.future(gen(), metadata=tr._metadata, timeout=60)
    assert eventually(lambda: _staged_bins(srv.db_path) >= 1)
    fut.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        fut.result()
    assert eventually(lambda: _staged_bins(srv.db_path) == 0)
    _assert_nothing_visible(tenant, before.subjects, before.bins, gallery[4], names[4])


def test_bulk_iterator_raises(srv, tenant, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    before = tenant.describe().keys[0]
    msgs = _chunks(tenant, gallery[180:], "raise")

    def gen() -> Iterator[pb.BulkEnrollChunk]:
        yield msgs[0]
        eventually(lambda: _staged_bins(srv.db_path) >= 1)
        raise RuntimeError("the client's source of templates failed")

    with pytest.raises(RemoteError):
        tenant.transport.call(tenant.transport.enrollment.BulkEnroll, gen())
    assert eventually(lambda: _staged_bins(srv.db_path) == 0)
    _assert_nothing_visible(tenant, before.subjects, before.bins, gallery[5], names[5])


def test_bulk_declared_count_is_enforced(srv, tenant, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, _ = faces
    before = tenant.describe().keys[0]
    tr = tenant.transport
    msgs = _chunks(tenant, gallery[200:], "count")
    for stream in (msgs[:2], msgs + _chunks(tenant, gallery[220:], "extra", n=1, total=None)):
        with pytest.raises(InvalidArgument):  # ends early (cleanly), or runs past its count
            tr.call(tr.enrollment.BulkEnroll, iter(stream))
    no_count = _chunks(tenant, gallery[200:], "count", total=None)
    with pytest.raises(InvalidArgument):
        tr.call(tr.enrollment.BulkEnroll, iter(no_count))
    huge = _chunks(tenant, gallery[200:], "count", n=1, total=100_000)
    with pytest.raises(ResourceExhausted):
        tr.call(tr.enrollment.BulkEnroll, iter(huge))
    _assert_nothing_visible(tenant, before.subjects, before.bins, gallery[6], names[6])
    # the same stream, whole, goes in
    resp = tr.call(tr.enrollment.BulkEnroll, iter(msgs))
    assert (resp.bins, resp.subjects) == (3, 12)


def test_enroll_cut_before_all_ciphertexts_commits_nothing(srv, tenant, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, _, _ = faces
    before = tenant.describe().keys[0]
    tr = tenant.transport
    res = tr.call(
        tr.enrollment.ReserveSlots,
        pb.ReserveSlotsRequest(tenant_id="atomic", key_id="k1", label="", count=1),
    )
    cts = tenant.crypto.encrypt_contribution(tenant.prepare(gallery[250:251]), list(res.slots))
    half = len(cts) // 2
    first = pb.EnrollRequest(
        tenant_id="atomic",
        key_id="k1",
        reservation_id=res.reservation_id,
        handles=["cut-enroll"],
        ciphertexts=cts[:half],
    )

    def raising() -> Iterator[pb.EnrollRequest]:
        yield first
        time.sleep(0.3)
        raise RuntimeError("client dies")

    with pytest.raises(RemoteError):
        tr.call(tr.enrollment.Enroll, raising())
    release = threading.Event()

    def blocked() -> Iterator[pb.EnrollRequest]:
        yield first
        release.wait(30)

    fut = tr.enrollment.Enroll.future(blocked(), metadata=tr._metadata, timeout=60)
    time.sleep(0.5)
    fut.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        fut.result()
    with pytest.raises(InvalidArgument):  # a clean end before n_ciphertexts
        tr.call(tr.enrollment.Enroll, iter([first]))
    time.sleep(0.3)
    key = tenant.describe().keys[0]
    assert (key.subjects, key.bins) == (before.subjects, before.bins)
    probe = tenant.crypto.encrypt_probe(tenant.prepare_probe(gallery[250])[0])
    with pytest.raises(NotFound):
        tr.call(
            tr.identification.Verify,
            pb.VerifyRequest(
                tenant_id="atomic", key_id="k1", handle="cut-enroll", probe_ciphertexts=probe
            ),
        )
