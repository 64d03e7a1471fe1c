"""The SDK's search parameters over a real server: stored, used, overridden, retuned; too few: strict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server.conftest import make_client, plaintext_top1
from veilface.client.sdk import VeilClient
from veilface.client.search import SearchMode, SearchOptions
from veilface.client.tenant_state import TenantState
from veilface.errors import FailedPrecondition
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def _spy(c: VeilClient) -> list[SearchOptions]:
    """Record the options of every query the client's searcher runs."""
    seen: list[SearchOptions] = []
    inner = c._search.identify

    def identify(probe: Any, offset: Any, x_route: Any, opts: SearchOptions, **kw: Any) -> Any:
        seen.append(opts)
        return inner(probe, offset, x_route, opts, **kw)

    c._search.identify = identify  # type: ignore[method-assign]
    return seen


def test_tuned_parameters_are_stored_used_and_overridden(server: LocalServer, faces, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "tuned") as c:
        chosen = c.train_routing(gallery, nlist=4, seed=1)  # 75 per list: routed, nprobe and k measured
        assert chosen.routed and not chosen.auto and chosen.nlist == 4 and c.state.search == chosen
        assert chosen.gallery == 300 and chosen.recall >= 0.95 and chosen.nprobe >= 1
        assert chosen.k == 0 or chosen.k >= chosen.nprobe  # 0: the probed lists scored whole, one stage
        c.enroll_many(names, gallery)
        seen = _spy(c)
        r = c.identify(probes[0], mode="routed")
        assert r.mode is SearchMode.ROUTED and r.fallback == ""
        assert (seen[-1].nprobe, seen[-1].k) == (chosen.nprobe, chosen.k)
        c.identify(probes[0], mode="routed", nprobe=3, k=5)  # explicit arguments win
        assert (seen[-1].nprobe, seen[-1].k) == (3, 5)
        hits = sum(
            c.identify(probes[i], mode="routed").subject_id == names[plaintext_top1(gallery, probes[i])]
            for i in range(0, 300, 15)
        )
        assert hits >= 19
        # kept sealed in the state file, and in a kiosk's export
        path = tmp_path / "tuned.vfk"
        c.state.save(path, passphrase="pw", scrypt_n=2**4)
        assert TenantState.load(path, passphrase="pw").search == chosen
        assert c.state.export_kiosk().search == chosen
        # retraining over enrolled subjects is refused; a re-pack measures again on the gallery
        with pytest.raises(FailedPrecondition):
            c.train_routing(gallery)
        c.delete(names[0])
        c.repack()
        again = c.state.search
        assert again is not None and again.gallery == 299 and again.nlist == 4  # the caller's nlist kept


def test_too_few_templates_fall_back_to_strict_and_say_so(server: LocalServer, faces, caplog) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "few") as c:
        with caplog.at_level("WARNING"):
            chosen = c.train_routing(gallery[:40], nlist=2)
        assert not chosen.routed and "39 per list" in chosen.reason and "run strict" in caplog.text
        assert c.state.router is not None and c.state.router.nlist == 2  # trained as asked
        c.enroll_many(names, gallery)
        caplog.clear()
        with caplog.at_level("WARNING"):
            r = c.identify(probes[5], mode="routed", nprobe=2)
            c.identify(probes[6], mode="routed")
        assert r.mode is SearchMode.STRICT and "39 per list" in r.fallback
        assert r.subject_id == names[plaintext_top1(gallery, probes[5])]
        assert caplog.text.count("routed queries run strict") == 1  # warned once per client
        assert c.identify(probes[5]).fallback == ""  # strict asked, nothing to say
        # allow_small keeps routing on a small set (protocol tests, demos)
        small = c.train_routing(gallery[:40], nlist=2, force=True, allow_small=True)
        assert small.routed and small.nlist == 2


def test_automatic_choice_on_a_small_gallery_is_strict_and_a_repack_chooses_again(server: LocalServer, faces) -> None:  # type: ignore[no-untyped-def]
    gallery, names, probes = faces
    with make_client(server, "auto") as c:
        chosen = c.train_routing(gallery[:100])
        assert chosen.auto and not chosen.routed and c.state.router is None
        assert "does not pay" in chosen.reason
        c.enroll_many(names, gallery)
        r = c.identify(probes[1], mode="routed")
        assert r.mode is SearchMode.STRICT and r.fallback == chosen.reason
        assert r.subject_id == names[plaintext_top1(gallery, probes[1])]
        report = c.repack()  # no nlist, no target: the SDK chooses again, on the 300
        assert report.subjects == 300
        again = c.state.search
        assert again is not None and again.auto and again.gallery == 300 and not again.routed
        assert c.identify(gallery[7], mode="routed").subject_id == names[7]
        # an explicit nlist at the re-pack overrides the choice
        c.repack(nlist=3)
        assert c.state.router is not None and c.state.router.nlist == 3
        assert c.state.search is not None and c.state.search.routed and not c.state.search.auto
        r = c.identify(gallery[8], mode="routed")
        assert r.mode is SearchMode.ROUTED and r.subject_id == names[8]
        assert np.isfinite(r.score)
