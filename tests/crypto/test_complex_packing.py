"""Layout 2: two templates per slot (real and imaginary parts), against exact oracles.

Virtual slot ``v < slots`` is the real part of slot ``v``; ``v >= slots`` the
imaginary part of slot ``v - slots`` (crypto/layout.py). Layout 1 (one
template per slot) is what keys made before complex packing keep.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.kernel import BinKernel
from veilface.crypto.keys import TenantKeys
from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.public_context import MAGIC, PublicContext, read_layout
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import InvalidArgument


@pytest.fixture(scope="module")
def tenant() -> tuple[TenantKeys, TenantCrypto, BinKernel]:
    keys = TenantKeys.generate(128)
    return keys, TenantCrypto(keys), BinKernel(PublicContext.from_bytes(keys.public_context_bytes()))


def _unit(rng: np.random.Generator, n: int, d: int = 128) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _decode(tc: TenantCrypto, ct: seal.Ciphertext) -> np.ndarray:
    pt = seal.Plaintext()
    tc._decryptor.decrypt(ct, pt)
    return np.asarray(tc._encoder.decode_complex(pt))


def test_new_keys_hold_two_templates_per_slot(tenant) -> None:  # type: ignore[no-untyped-def]
    keys, _, kern = tenant
    lay = keys.layout
    assert (lay.version, lay.per_slot, lay.capacity, lay.g1, lay.g2) == (2, 2, 4096, 32, 4)
    # the server reads the same layout from the public context
    for seen in (kern.layout, read_layout(keys.public_context_bytes())):
        assert (seen.version, seen.capacity, seen.g1, seen.m) == (2, 4096, 32, lay.m)


def test_plaintext_model_of_both_halves() -> None:
    lay = DiagonalLayout(100, 2048, 0, 2)
    rng = np.random.default_rng(0)
    v = rng.choice(lay.capacity, size=300, replace=False)
    x = _unit(rng, 300, 100)
    p = _unit(rng, 1, 100)[0]
    diag = lay.pack(x, v)
    assert diag.dtype == np.complex128
    full = lay.plain_scores(diag, p)
    np.testing.assert_allclose(full[v], x @ p, atol=1e-12)
    np.testing.assert_allclose(np.delete(full, v), 0, atol=1e-12)
    pre, rest = lay.plain_scores(diag, p, "presel"), lay.plain_scores(diag, p, "rest")
    np.testing.assert_allclose(pre + rest, full, atol=1e-12)
    np.testing.assert_allclose(lay.unpack(diag, v), x, atol=1e-12)
    with pytest.raises(InvalidArgument):
        lay.pack(x[:1], [lay.capacity])


def test_both_components_score_right_in_a_full_bin(tenant) -> None:  # type: ignore[no-untyped-def]
    _, tc, kern = tenant
    rng = np.random.default_rng(1)
    x = _unit(rng, 4096)
    b = kern.load_bin(tc.encrypt_contribution(x, np.arange(4096)))
    for _ in range(2):
        p = _unit(rng, 1)[0]
        probe = kern.load_probe(tc.encrypt_probe(p))
        full = tc.decrypt_scores(seal_io.to_bytes(kern.score(b, probe, "full")))
        assert full.shape == (4096,)
        np.testing.assert_allclose(full, x @ p, atol=2e-4)  # real half and imaginary half
        pre = tc.decrypt_scores(seal_io.to_bytes(kern.score(b, probe, "presel")))
        rest = tc.decrypt_scores(seal_io.to_bytes(kern.score(b, probe, "rest")))
        np.testing.assert_allclose(pre + rest, full, atol=2e-4)
        # the encrypted top-1 is the plaintext one, or tied with it within the CKKS error
        # (this gallery's first probe has two templates 9e-5 apart)
        assert (x @ p)[int(np.argmax(full))] >= (x @ p).max() - 4e-4
    np.testing.assert_allclose(tc.decrypt_bin(tc.encrypt_contribution(x[:8], [1, 2050, 7, 4095, 0, 2048, 3000, 9]), [1, 2050, 7, 4095, 0, 2048, 3000, 9]), x[:8], atol=1e-5)


def test_single_enrollment_folds_into_the_imaginary_half(tenant) -> None:  # type: ignore[no-untyped-def]
    """A contribution of one template at v >= slots: one imaginary value per diagonal."""
    _, tc, kern = tenant
    rng = np.random.default_rng(2)
    x = _unit(rng, 2100)
    b = kern.load_bin(tc.encrypt_contribution(x[:2000], np.arange(2000)))
    singles = [2048, 2049, 4095, 2000, 3333]
    for i, v in enumerate(singles):
        one = tc.encrypt_contribution(x[2000 + i : 2001 + i], [v])
        kern.add_into(b, kern.load_bin(one))
    p = _unit(rng, 1)[0]
    full = tc.decrypt_scores(seal_io.to_bytes(kern.score(b, kern.load_probe(tc.encrypt_probe(p)), "full")))
    np.testing.assert_allclose(full[:2000], x[:2000] @ p, atol=2e-4)
    np.testing.assert_allclose(full[singles], x[2000:2005] @ p, atol=2e-4)
    empty = np.setdiff1d(np.arange(4096), np.r_[np.arange(2000), singles])
    assert np.abs(full[empty]).max() < 2e-4
    back = tc.decrypt_bin(kern.serialize(b), singles)
    np.testing.assert_allclose(back, x[2000:2005], atol=1e-4)


@pytest.mark.parametrize("kept", [10, 2048 + 10, 4095])
def test_mask_keeps_exactly_the_named_component(tenant, kept: int) -> None:  # type: ignore[no-untyped-def]
    """The kept virtual slot's component only; its slot's other component is masked like the rest."""
    _, tc, kern = tenant
    rng = np.random.default_rng(3)
    x = _unit(rng, 4096)
    p = _unit(rng, 1)[0]
    b = kern.load_bin(tc.encrypt_contribution(x, np.arange(4096)))
    scored = kern.score(b, kern.load_probe(tc.encrypt_probe(p)), "full")
    truth = x @ p
    slots = kern.layout.slots
    for _ in range(5):
        ct = seal_io.load_ciphertext(kern.public.context, seal_io.to_bytes(scored))
        kern.mask(ct, [kept])
        z = _decode(tc, ct)
        got = kern.layout.slot_values(z)
        assert abs(got[kept] - truth[kept]) < 1e-3
        twin = kept - slots if kept >= slots else kept + slots  # same slot, other component
        others = np.delete(np.arange(4096), kept)
        assert np.median(np.abs(got[others] - truth[others])) > 50
        assert abs(got[twin] - truth[twin]) > 1e-2  # drowned (P(|mask| < 0.01) = 1.7e-5)
        assert np.abs(got - truth).max() <= kern.mask_magnitude + 1e-3


def test_masks_uniform_over_both_components(tenant) -> None:  # type: ignore[no-untyped-def]
    _, tc, kern = tenant
    rng = np.random.default_rng(4)
    x = _unit(rng, 4096)
    p = _unit(rng, 1)[0]
    b = kern.load_bin(tc.encrypt_contribution(x, np.arange(4096)))
    scored = kern.score(b, kern.load_probe(tc.encrypt_probe(p)), "presel")
    truth = tc.decrypt_scores(seal_io.to_bytes(scored))
    keep = rng.choice(4096, size=300, replace=False)
    worst, noise = 0.0, []
    for _ in range(20):
        ct = seal_io.load_ciphertext(kern.public.context, seal_io.to_bytes(scored))
        kern.mask(ct, keep)
        got = tc.decrypt_scores(seal_io.to_bytes(ct))
        worst = max(worst, float(np.abs(got[keep] - truth[keep]).max()))
        noise.append(np.delete(got - truth, keep))
    assert worst < 1e-3
    n = np.concatenate(noise)
    m = kern.mask_magnitude
    assert abs(n.std() / (m / np.sqrt(3)) - 1) < 0.05
    assert np.abs(n).max() <= m + 1e-3


def _strip_layout_version(blob: bytes) -> bytes:
    """The public context as keys made before complex packing wrote it (no layout_version)."""
    (hlen,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(blob[start : start + hlen])
    assert header.pop("layout_version") == 1
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + blob[start + hlen :]


def test_old_layout_keys_keep_their_layout() -> None:
    keys = TenantKeys.generate(128, layout_version=1)
    old_blob = _strip_layout_version(keys.public_context_bytes())
    public = PublicContext.from_bytes(old_blob)
    lay = public.layout
    assert (lay.version, lay.capacity, lay.g1, lay.g2) == (1, 2048, 16, 8)
    assert read_layout(old_blob) == lay
    assert lay.m == 32
    # a stored secret key without a version reads as layout 1
    again = TenantKeys.from_secret_bytes(keys.secret_key_bytes(), dim=128, param_set="n4096")
    assert (again.layout.version, again.layout.capacity, again.layout.g1) == (1, 2048, 16)
    tc, kern = TenantCrypto(again), BinKernel(public)
    rng = np.random.default_rng(5)
    x = _unit(rng, 2048)
    p = _unit(rng, 1)[0]
    b = kern.load_bin(tc.encrypt_contribution(x, np.arange(2048)))
    full = tc.decrypt_scores(seal_io.to_bytes(kern.score(b, kern.load_probe(tc.encrypt_probe(p)), "full")))
    assert full.shape == (2048,)
    np.testing.assert_allclose(full, x @ p, atol=2e-4)
    with pytest.raises(InvalidArgument):
        lay.check_slots([2048])
    # layout 1 masks now keep the real part only (the imaginary part is drowned too)
    ct = kern.score(b, kern.load_probe(tc.encrypt_probe(p)), "full")
    kern.mask(ct, [5])
    z = _decode(tc, ct)
    assert abs(z.real[5] - x[5] @ p) < 1e-3
    assert abs(z.imag[5]) > 1e-2


def test_unknown_layout_version_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="layout version"):
        DiagonalLayout(128, 2048, 0, 3)
