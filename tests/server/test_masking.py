"""Responses carry only the scores they need: every other slot is masked (issue 10, item 3).

A real server; the tenant's own key decrypts what comes back and the
plaintext model of the kernel (``DiagonalLayout.plain_scores``) says what
each slot would hold unmasked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from tests.server.conftest import create_tenant
from veilface.client.transport import Transport
from veilface.crypto.keys import TenantKeys
from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer

FloatArray = npt.NDArray[np.float64]
N_SUBJECTS = 300
TENANT = "masking"


@dataclass
class Gallery:
    """One tenant key with one bulk-enrolled bin and one staged template, in plaintext too."""

    transport: Transport
    keys: TenantKeys
    crypto: TenantCrypto
    center: FloatArray
    templates: FloatArray  # [N_SUBJECTS, 128] at slots 0..N_SUBJECTS-1 of `bin_id`
    bin_id: int
    staged: FloatArray  # [128], handle "staged-0"

    @property
    def layout(self) -> DiagonalLayout:
        return self.keys.layout

    def plain(self, probe: FloatArray, stage: str = "full") -> FloatArray:
        """What each slot of the bin's score holds before masking: float64 [slots]."""
        diag = self.layout.pack(self.templates, np.arange(N_SUBJECTS))
        return self.layout.plain_scores(diag, probe, stage)

    def decrypt(self, msg: pb.BinScores) -> FloatArray:
        parts = [msg.scores] if msg.scores else list(msg.score_parts)
        return np.asarray(np.sum([self.crypto.decrypt_scores(p) for p in parts], axis=0))

    def call(self, method: str, request: object) -> pb.ScoresResponse:
        return self.transport.call(getattr(self.transport.identification, method), request)


def _unit(rng: np.random.Generator, n: int) -> FloatArray:
    x = rng.normal(size=(n, 128))
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def gallery(server: LocalServer) -> Iterator[Gallery]:
    token = create_tenant(server, TENANT)
    t = Transport(server.target, token=token)
    keys = TenantKeys.generate(128)
    tc = TenantCrypto(keys)
    rng = np.random.default_rng(7)
    x, staged = _unit(rng, N_SUBJECTS), _unit(rng, 1)[0]
    center = 0.3 * _unit(rng, 1)[0]
    t.call(
        t.tenants.RegisterKey,
        pb.RegisterKeyRequest(tenant_id=TENANT, key_id="k1", public_context=keys.public_context_bytes()),
    )
    t.call(
        t.tenants.RegisterCenter,
        pb.RegisterCenterRequest(
            tenant_id=TENANT, key_id="k1", center_ciphertexts=tc.encrypt_probe(center)
        ),
    )
    chunk = pb.BulkEnrollChunk(
        total_bins=1,
        tenant_id=TENANT,
        key_id="k1",
        label="lab",
        handles=[f"subject-{i}" for i in range(N_SUBJECTS)],
        slots=list(range(N_SUBJECTS)),
        ciphertexts=tc.encrypt_contribution(x, np.arange(N_SUBJECTS)),
    )
    (bin_id,) = t.call(t.enrollment.BulkEnroll, iter([chunk])).bin_ids
    t.call(
        t.enrollment.EnrollStaged,
        pb.EnrollStagedRequest(
            tenant_id=TENANT,
            key_id="k1",
            label="lab",
            handle="staged-0",
            ciphertext=tc.encrypt_staged(staged),
        ),
    )
    yield Gallery(t, keys, tc, center, x, int(bin_id), staged)
    t.close()


def _masked(values: FloatArray, truth: FloatArray) -> None:
    """Slots that look nothing like the scores they hide."""
    assert np.median(np.abs(values)) > 100 * max(1.0, float(np.abs(truth).max()))
    assert abs(float(np.corrcoef(values, truth)[0, 1])) < 0.25


def _verify(g: Gallery, handle: str, probe: FloatArray) -> pb.VerifyResponse:
    return g.transport.call(
        g.transport.identification.Verify,
        pb.VerifyRequest(
            tenant_id=TENANT, key_id="k1", handle=handle, probe_ciphertexts=g.crypto.encrypt_probe(probe)
        ),
    )


def test_verify_carries_only_the_claimed_score(gallery: Gallery) -> None:
    g = gallery
    claimed = 123
    probe = _unit(np.random.default_rng(1), 1)[0]
    resp = _verify(g, f"subject-{claimed}", probe)
    assert resp.slot == claimed
    got = g.crypto.decrypt_scores(resp.scores)
    truth = g.plain(probe)
    assert abs(got[claimed] - truth[claimed]) < 1e-3
    assert abs(got[claimed] - g.templates[claimed] @ probe) < 1e-3
    others = np.setdiff1d(np.arange(N_SUBJECTS), [claimed])
    _masked(got[others], truth[others])
    # fresh masks per response: the same request gives other values
    again = g.crypto.decrypt_scores(_verify(g, f"subject-{claimed}", probe).scores)
    assert abs(again[claimed] - truth[claimed]) < 1e-3
    assert np.median(np.abs(again[others] - got[others])) > 100


def test_crafted_probe_reveals_no_other_coordinate(
    gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-periodic one-hot probe reads coordinates off the plaintext model, not off a response."""
    g = gallery
    lay = g.layout
    claimed = 5
    targets = np.array([17, 64, 201, 299])  # other subjects' slots
    rows = np.zeros((lay.g1, lay.slots))
    rows[0, targets] = 1.0  # slot u reads coordinate u % 128 of the template at u
    rows[0, claimed] = 1.0
    monkeypatch.setattr(DiagonalLayout, "probe_vectors", lambda self, probe: rows)
    crafted = np.zeros(128)  # ignored: probe_vectors is replaced
    truth = g.plain(crafted)
    # the plaintext model gives the coordinates away ...
    np.testing.assert_allclose(truth[targets], g.templates[targets, targets % 128], atol=1e-12)
    resp = _verify(g, f"subject-{claimed}", crafted)
    got = g.crypto.decrypt_scores(resp.scores)
    # ... the response gives the claimed subject's own value only
    assert abs(got[claimed] - truth[claimed]) < 1e-3
    assert np.all(np.abs(got[targets] - truth[targets]) > 1e-3)
    close = np.abs(got - truth) < 1e-2
    close[claimed] = False
    assert close.sum() <= 2  # chance level: a uniform mask of ~585 lands within 1e-2 rarely
    # the same probe through ScoreCandidates, asking for one slot
    req = pb.ScoreCandidatesRequest(
        tenant_id=TENANT,
        key_id="k1",
        candidates=[pb.CandidateSlots(bin_id=g.bin_id, slots=[claimed])],
        probe_ciphertexts=g.crypto.encrypt_probe(crafted),
    )
    (b,) = g.call("ScoreCandidates", req).bins
    rest = g.decrypt(b)
    expected = g.plain(crafted, "rest")
    monkeypatch.undo()
    expected = expected + g.plain(g.center)  # re-ranking adds the center's scores
    assert abs(rest[claimed] - expected[claimed]) < 1e-3
    assert np.all(np.abs(rest[targets] - expected[targets]) > 1e-3)


def test_preselect_and_score_candidates_carry_only_needed_slots(gallery: Gallery) -> None:
    g = gallery
    probe = _unit(np.random.default_rng(2), 1)[0] - g.center  # centered, as identification sends it
    pre = g.call(
        "Preselect",
        pb.PreselectRequest(
            tenant_id=TENANT,
            key_id="k1",
            mode=pb.SEARCH_MODE_STRICT,
            probe_ciphertexts=g.crypto.encrypt_probe(probe),
        ),
    )
    (b,) = pre.bins
    presel = g.decrypt(b)
    occupied = np.arange(N_SUBJECTS)
    np.testing.assert_allclose(presel[occupied], g.plain(probe, "presel")[occupied], atol=1e-3)
    assert np.median(np.abs(presel[N_SUBJECTS:])) > 100  # unoccupied slots are masked too

    wanted = [3, 150, 299]
    req = pb.ScoreCandidatesRequest(
        tenant_id=TENANT,
        key_id="k1",
        candidates=[pb.CandidateSlots(bin_id=g.bin_id, slots=wanted)],
        query_id=pre.query_id,
    )
    (r,) = g.call("ScoreCandidates", req).bins
    assert list(r.slots) == wanted
    rest = g.decrypt(r)
    truth = g.plain(probe, "rest") + g.plain(g.center)
    np.testing.assert_allclose(rest[wanted], truth[wanted], atol=1e-3)
    full = presel[wanted] + rest[wanted]
    np.testing.assert_allclose(full, g.templates[wanted] @ (probe + g.center), atol=1e-3)
    others = np.setdiff1d(occupied, wanted)
    _masked(rest[others], truth[others])
    for part in r.score_parts:  # a bin split over workers: each part is masked on its own
        one = g.crypto.decrypt_scores(part)
        assert np.median(np.abs(one[others])) > 100
    # no slot requested (a decoy bin): everything masked
    req.candidates[0].ClearField("slots")
    (empty,) = g.call("ScoreCandidates", req).bins
    assert np.median(np.abs(g.decrypt(empty)[occupied])) > 100


def test_staged_scores_keep_only_what_is_read(gallery: Gallery) -> None:
    g = gallery
    probe = _unit(np.random.default_rng(3), 1)[0]
    pre = g.call(
        "Preselect",
        pb.PreselectRequest(
            tenant_id=TENANT,
            key_id="k1",
            mode=pb.SEARCH_MODE_STRICT,
            probe_ciphertexts=g.crypto.encrypt_probe(probe),
        ),
    )
    (st,) = pre.staged
    values = g.crypto.decrypt_staged_scores(st.scores)  # staged templates are real
    truth = float(g.staged @ (probe + g.center))
    assert abs(values.mean() - truth) < 1e-3  # identification reads the mean over the slots
    assert np.median(np.abs(values)) > 100  # each slot alone (one window sum) is drowned
    resp = _verify(g, "staged-0", probe)
    got = g.crypto.decrypt_scores(resp.scores)
    assert resp.slot == 0 and abs(got[0] - g.staged @ probe) < 1e-3
    assert np.median(np.abs(got[1:])) > 100
