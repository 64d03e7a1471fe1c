"""Gallery capacity (server/capacity.py): a gallery too large for the machine is refused at enrollment.

The end-to-end tests run one real server with a tiny memory budget (two
and a half n4096/128-d bins) and a small template cap, set through
``VEILFACE_*`` variables as an operator would. They run in file order on
that one server: the first two leave nothing behind (that is what they
check), the last one fills it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import numpy as np
import pytest

from tests.server.conftest import make_client
from veilface.bench.synthetic import SyntheticFaces
from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.params import get_param_set
from veilface.errors import InvalidArgument, ResourceExhausted
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.capacity import CapacityLimits, resident_bin_bytes
from veilface.server.config import ServerSettings
from veilface.server.launcher import LocalServer

# One n4096 bin of 128-d templates under layout 2: 128 ciphertexts + its center scores.
BIN = resident_bin_bytes("n4096", DiagonalLayout(128, get_param_set("n4096").slots, 0, 2))
MAX_TEMPLATES = 6000


def test_resident_bin_bytes_matches_what_a_loaded_bin_takes() -> None:
    # Measured: 20 loaded n4096/128-d bins grew a process by 7.94 MiB each.
    assert BIN == 129 * 64 * 1024
    assert 7.9 * 2**20 < BIN < 8.2 * 2**20


def test_default_budget_holds_a_million_on_a_24_gib_machine() -> None:
    limits = CapacityLimits.from_settings(ServerSettings(), machine_bytes=24 * 2**30)
    assert limits.max_gallery_bytes == 12 * 2**30 and limits.max_templates == 0
    assert "50% of this machine's 24.0 GiB" in limits.budget_source
    full = -(-1_000_000 // 4096)  # a million in full bins
    issue_12_routed = 976  # the lists the old defaults made at a million, a quarter full
    assert issue_12_routed * BIN < limits.max_gallery_bytes and full * BIN < limits.max_gallery_bytes
    # Set explicitly, or with the bins on a Ray cluster (no derived budget there).
    assert CapacityLimits.from_settings(ServerSettings(max_gallery_bytes=5)).max_gallery_bytes == 5
    assert CapacityLimits.from_settings(ServerSettings(scoring="ray")).max_gallery_bytes == 0


def test_capacity_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEILFACE_MAX_TEMPLATES", "-1")
    with pytest.raises(InvalidArgument, match="max_templates"):
        ServerSettings.from_env()
    monkeypatch.setenv("VEILFACE_MAX_TEMPLATES", "10")
    monkeypatch.setenv("VEILFACE_GALLERY_MEMORY_FRACTION", "1.5")
    with pytest.raises(InvalidArgument, match="gallery_memory_fraction"):
        ServerSettings.from_env()
    monkeypatch.setenv("VEILFACE_GALLERY_MEMORY_FRACTION", "0.25")
    got = ServerSettings.from_env()
    assert (got.max_templates, got.gallery_memory_fraction) == (10, 0.25)


# -- a real server with a tiny budget ------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    db = tmp_path_factory.mktemp("capacity") / "gallery.db"
    env = {
        "VEILFACE_MAX_GALLERY_BYTES": str(int(2.5 * BIN)),
        "VEILFACE_MAX_TEMPLATES": str(MAX_TEMPLATES),
    }
    with LocalServer(db, env=env) as srv:
        yield srv


def _faces(n: int, seed: int) -> np.ndarray:
    emb, _ = SyntheticFaces().sample(n, 1, seed=seed)
    return emb


def _bins_of(srv: LocalServer, tenant: str) -> int:
    with sqlite3.connect(srv.db_path) as db:
        (n,) = db.execute("SELECT COUNT(*) FROM bins WHERE tenant_id=?", (tenant,)).fetchone()
        (s,) = db.execute(
            "SELECT COUNT(*) FROM subjects s JOIN bins b ON s.bin_id=b.bin_id WHERE b.tenant_id=?",
            (tenant,),
        ).fetchone()
    return int(n) + int(s)


@pytest.mark.slow
def test_bulk_past_the_memory_budget_is_refused_before_anything_is_written(small: LocalServer) -> None:
    with make_client(small, "big") as c:
        x = _faces(2 * 4096 + 8, seed=1)  # three bins: 2.5 bins of budget hold two
        with pytest.raises(ResourceExhausted) as err:
            c.enroll_many([f"p{i}" for i in range(len(x))], x)
        msg = str(err.value)
        assert "max_gallery_bytes" in msg and "--max-gallery-mb" in msg
        assert "VEILFACE_MAX_GALLERY_BYTES" in msg and "8.1 MiB each" in msg
        assert c.describe().key("k1").subjects == 0  # type: ignore[union-attr]
        assert _bins_of(small, "big") == 0


@pytest.mark.slow
def test_bulk_past_the_template_cap_is_refused_mid_stream_and_aborted_whole(small: LocalServer) -> None:
    with make_client(small, "many") as c:
        x = _faces(MAX_TEMPLATES + 500, seed=2)  # two bins fit the budget; the second chunk passes the cap
        with pytest.raises(ResourceExhausted) as err:
            c.enroll_many([f"p{i}" for i in range(len(x))], x)
        msg = str(err.value)
        assert f"at most {MAX_TEMPLATES:,} templates (max_templates)" in msg
        assert "--max-templates" in msg and "VEILFACE_MAX_TEMPLATES" in msg
        assert c.describe().key("k1").subjects == 0  # type: ignore[union-attr]
        assert _bins_of(small, "many") == 0  # the first bin, written and checked, went with the stream


@pytest.mark.slow
def test_single_enrollment_needs_a_new_bin_only_when_none_has_room(small: LocalServer) -> None:
    with make_client(small, "fill") as c:
        x = _faces(4000, seed=3)
        c.enroll_many([f"p{i}" for i in range(len(x))], x)  # one bin (4,096 slots), 4,000 held
        tr = c.transport

        def reserve(label: str, count: int = 1) -> pb.ReserveSlotsResponse:
            req = pb.ReserveSlotsRequest(tenant_id="fill", key_id="k1", label=label, count=count)
            return tr.call(tr.enrollment.ReserveSlots, req)

        second = reserve("other")  # a second bin: 2 of 2.5
        with pytest.raises(ResourceExhausted, match="max_gallery_bytes"):
            reserve("third")  # a third bin would pass the budget
        assert reserve("other").bin_id == second.bin_id  # room in an existing bin: admitted
        assert reserve("").bin_id != second.bin_id  # the bulk bin (no routing: label "") has room
        # An enrollment through the SDK lands in a bin with room (or the staging area).
        c.enroll("late", _faces(1, seed=4)[0])
        assert c.describe().key("k1").subjects == 4001  # type: ignore[union-attr]
        with pytest.raises(ResourceExhausted, match="max_templates"):
            reserve("other", 2048)  # 4,001 held + 3 reserved + 2,048 > 6,000
