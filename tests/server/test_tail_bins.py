"""Shared tail bins over a real server: fewer bins, each template found, single enrollments fill them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.server.conftest import make_client, plaintext_top1
from veilface.bench.synthetic import SyntheticFaces
from veilface.client.tail_packing import group_tails
from veilface.server.launcher import LocalServer

pytestmark = pytest.mark.slow


def test_lists_share_their_tail_bin_and_every_template_is_still_found(server: LocalServer) -> None:
    emb, _ = SyntheticFaces().sample(9000, 2, seed=5)
    gallery, probes = emb[0::2], emb[1::2]
    names = [f"s{i}" for i in range(len(gallery))]
    with make_client(server, "tails", workers=2) as c:
        c.train_routing(gallery, nlist=2, seed=0)
        router = c.state.router
        assert router is not None
        x = (c.normalize(gallery) @ c._mix.T).astype(np.float32)
        sizes = np.bincount(router.assign(x), minlength=2)
        cap = c.layout.capacity
        assert (sizes > cap).all() and sizes.sum() % cap and (sizes % cap).sum() <= cap  # one full bin + tail each
        c.state.router = replace(router, tail_groups=tuple(int(g) for g in group_tails(sizes, cap, router.centroids)))
        c.enroll_many(names, gallery)
        key = {k.key_id: k for k in c.describe().keys}[c.state.key_id]
        assert key.bins == 3 and key.subjects == len(gallery)  # two full bins and one shared tail (not 4)
        lists = c.state.router.assign(x)
        for i in range(0, len(probes), 450):
            r = c.identify(probes[i], mode="routed", nprobe=1, k=0)
            assert r.stats.bins_preselected == 2  # its list's full bin and the shared tail
            if lists[plaintext_top1(gallery, probes[i])] == c.state.router.probe_lists(
                (c.normalize(probes[i : i + 1]) @ c._mix.T).astype(np.float32)[0], 1
            )[0]:
                assert r.subject_id == names[plaintext_top1(gallery, probes[i])]
            full = c.identify(probes[i], mode="routed", nprobe=2, k=0)  # both lists: everything
            assert full.stats.bins_preselected == 3
            assert full.subject_id == names[plaintext_top1(gallery, probes[i])]
        # a single enrollment goes into the shared tail's room: no new bin
        c.enroll("newcomer", probes[7], fold="now")
        key = {k.key_id: k for k in c.describe().keys}[c.state.key_id]
        assert key.bins == 3 and key.subjects == len(gallery) + 1
        assert c.identify(probes[7], mode="routed", nprobe=2, k=0).subject_id == "newcomer"
