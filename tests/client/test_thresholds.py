"""The 1:N threshold (client/thresholds.py): set for a target FPIR at the gallery's size.

Unit tests of the rule on the shipped dlib calibration, then identify on a
real server: the calibrated threshold by default (recorded in the result),
an explicit one winning, and the tenant's own as a floor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise

import numpy as np
import pytest

from tests.server.conftest import make_client
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.sdk import VeilClient
from veilface.client.search import Identification, QueryStats
from veilface.client.thresholds import (
    DEFAULT_TARGET_FPIR,
    GPDTail,
    ImpostorCalibration,
    ThresholdPolicy,
    load_calibration,
)
from veilface.errors import InvalidArgument
from veilface.server.launcher import LocalServer

# -- the rule ---------------------------------------------------------------------------------


def test_shipped_dlib_calibration_loads() -> None:
    cal = load_calibration("dlib")
    assert cal.model == "dlib" and cal.dim == 128 and "LFW" in cal.source
    assert -1.0 < cal.tail.xi < 0.5 and cal.tail.sigma > 0


def test_threshold_grows_with_the_gallery() -> None:
    cal = load_calibration("dlib")
    ts = [cal.threshold(n) for n in (1, 200, 1_000, 100_000, 1_000_000)]
    assert all(a < b for a, b in pairwise(ts)), ts
    assert all(0.8 < t < 1.0 for t in ts)
    for n in (200, 1_000, 100_000):  # the model's FPIR at threshold(N) is the target
        assert cal.fpir(n, cal.threshold(n)) == pytest.approx(DEFAULT_TARGET_FPIR, rel=0.02)
    assert cal.threshold(1_000, 0.001) > cal.threshold(1_000, 0.01)  # a stricter target, higher
    with pytest.raises(InvalidArgument):
        cal.threshold(100, 1.5)


def test_fmr_and_its_inverse_agree_on_the_table_and_the_tail() -> None:
    cal = load_calibration("dlib")
    for f in (0.1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8):
        assert cal.fmr(cal.threshold_for_fmr(f)) == pytest.approx(f, rel=0.05)


def test_gpd_tail_inverse() -> None:
    tail = GPDTail(u=0.93, p_u=1e-3, xi=-0.2, sigma=0.005)
    for f in (1e-4, 1e-6):
        assert tail.fmr(tail.inverse(f)) == pytest.approx(f, rel=1e-9)
    assert tail.fmr(0.93 + 0.005 / 0.2 + 0.01) == 0.0  # bounded: nothing past u - sigma/xi


def test_a_table_out_of_order_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="increasing"):
        ImpostorCalibration.from_dict(
            {"model": "m", "dim": 4, "table": [[0.9, 0.1], [0.8, 0.01]],
             "tail": {"u": 0.9, "p_u": 0.01, "xi": -0.1, "sigma": 0.01}}
        )


def test_explicit_wins_and_the_tenant_threshold_is_a_floor() -> None:
    pol = ThresholdPolicy(128)
    t200 = load_calibration("dlib").threshold(200)
    assert pol.choose(0.5, 0.3, gallery_size=200).source == "explicit"
    assert pol.choose(0.5, 0.3, gallery_size=200).value == 0.3
    got = pol.choose(0.5, None, gallery_size=200)
    assert (got.source, got.value) == ("calibrated", pytest.approx(t200))
    assert pol.choose(0.99, None, gallery_size=200).source == "tenant"  # stricter than the model's
    assert pol.choose(0.5, None, gallery_size=0).source == "tenant"  # size not known yet
    # no calibration for this dimension (e.g. a 512-d ArcFace key): the tenant's threshold
    assert ThresholdPolicy(512).choose(0.4, None, gallery_size=10_000).value == 0.4
    with pytest.raises(InvalidArgument, match="calibration is for 128-d"):
        ThresholdPolicy(64, model="dlib")


def test_decide_records_what_it_used() -> None:
    pol = ThresholdPolicy(128)
    t = load_calibration("dlib").threshold(200)
    r = Identification("x", t - 1e-4, True, stats=QueryStats(searched_templates=200))
    pol.decide(r, tenant_threshold=0.5, explicit=None, strict=True, gallery_size=lambda: 0)
    assert not r.match and r.threshold == pytest.approx(t) and r.threshold_source == "calibrated"
    assert r.gallery_size == 200
    asked: list[int] = []
    r2 = Identification("x", 0.99, False, stats=QueryStats(searched_templates=8))
    pol.decide(r2, tenant_threshold=0.5, explicit=None, strict=False, gallery_size=lambda: asked.append(1) or 9)
    assert r2.match and r2.gallery_size == 200 and not asked  # routed: the known size, still fresh
    empty = Identification(None, -math.inf, False)
    pol.decide(empty, tenant_threshold=0.5, explicit=0.1, strict=True, gallery_size=lambda: 0)
    assert not empty.match and empty.threshold_source == "explicit"


# -- identify on a real server ----------------------------------------------------------------


Enrolled = tuple[VeilClient, np.ndarray, list[str], np.ndarray]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with LocalServer(tmp_path_factory.mktemp("thr") / "gallery.db") as s:
        yield s


@pytest.fixture(scope="module")
def enrolled(srv: LocalServer) -> Iterator[Enrolled]:
    emb, labels = SyntheticFaces().sample(200, 2, seed=7)  # the demo's faces
    gal, probes = emb[0::2], emb[1::2]
    names = [str(x) for x in labels[0::2]]
    with make_client(srv, "thr") as c:
        c.state.threshold = 0.92
        c.train_routing(gal, nlist=3)
        c.enroll_many(names, gal)
        yield c, gal, names, probes


@pytest.mark.slow
def test_identify_uses_the_threshold_for_the_gallery_size(enrolled: Enrolled) -> None:
    c, _gal, names, probes = enrolled
    t200 = load_calibration("dlib").threshold(200)
    r = c.identify(probes[1])
    assert r.subject_id == names[1]
    assert (r.threshold_source, r.gallery_size) == ("calibrated", 200)
    assert r.threshold == pytest.approx(t200) and r.threshold > 0.92
    assert r.match == (r.score >= t200)
    routed = c.identify(probes[1], mode="routed", nprobe=1)
    assert routed.threshold_source == "calibrated" and routed.gallery_size == 200


@pytest.mark.slow
def test_an_explicit_threshold_still_wins(enrolled: Enrolled) -> None:
    c, _gal, names, probes = enrolled
    r = c.identify(probes[2], threshold=0.5)
    assert (r.threshold, r.threshold_source, r.match) == (0.5, "explicit", True)
    r = c.identify(probes[2], threshold=0.9999)
    assert (r.threshold_source, r.match) == ("explicit", False)
    v = c.verify(names[2], probes[2])  # 1:1 keeps the tenant's threshold
    assert v.match == (v.score >= 0.92)


@pytest.mark.slow
def test_a_deleted_subjects_probe_no_longer_matches_someone_else(enrolled: Enrolled) -> None:
    """The end of ``veilface demo``: probe 0's best impostor scores 0.934, over the old 0.92."""
    c, _gal, names, probes = enrolled
    c.delete(names[0])
    after = c.identify(probes[0])
    assert after.subject_id != names[0] and 0.92 < after.score < after.threshold
    assert not after.match and after.gallery_size == 199
    assert c.identify(probes[0], threshold=0.92).match  # what the single threshold did


@pytest.mark.slow
def test_demo_prints_the_threshold_it_used() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "veilface.cli.main", "demo", "--probes", "4"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert out.returncode == 0, out.stderr
    last = next(line for line in out.stdout.splitlines() if line.startswith("7. deleted"))
    assert "-> no match" in last and "FPIR for 199 subjects" in last, last
