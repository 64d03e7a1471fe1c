"""Re-randomized score responses: the second-component leak, closed; honest scores unchanged.

The attack (a key holder with the tenant's secret key and its public
context, sending crafted probes) works at the kernel level on one share of
a bin's giant steps (``range(0, 1)``, what a worker scores for a share of a
split bin or a one-giant preselection), where no rotation mixes the
diagonals: with trivial probe ciphertexts whose components the attacker
chose, the unmasked second component of two responses gives one diagonal
ciphertext of the bin exactly, which the secret key decrypts into
coordinate ``t`` of every template of the bin.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.kernel import BinKernel
from veilface.crypto.keys import TenantKeys
from veilface.crypto.layout import CURRENT_LAYOUT_VERSION, LEGACY_LAYOUT_VERSION
from veilface.crypto.public_context import PublicContext
from veilface.crypto.rerandomize import Rerandomizer
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import FailedPrecondition

Tenant = tuple[TenantKeys, TenantCrypto, BinKernel, PublicContext]


@pytest.fixture(scope="module", params=[LEGACY_LAYOUT_VERSION, CURRENT_LAYOUT_VERSION])
def tenant(request: pytest.FixtureRequest) -> Tenant:
    keys = TenantKeys.generate(128, layout_version=request.param)
    public = PublicContext.from_bytes(keys.public_context_bytes())
    return keys, TenantCrypto(keys), BinKernel(public), public


def _unit(rng: np.random.Generator, n: int, d: int = 128) -> npt.NDArray[np.float64]:
    x = rng.normal(size=(n, d))
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


# -- raw access to a ciphertext's polynomials (one data prime, NTT form) -------------------------
# sealapi reads a ciphertext's words but cannot write them: a crafted ciphertext is written as
# SEAL's uncompressed serialization (the header, the ciphertext's fields, its DynArray).

_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, -, size


def _poly(ct: seal.Ciphertext, i: int) -> npt.NDArray[np.uint64]:
    """Component ``i`` (N words mod q) of a one-prime ciphertext, copied out."""
    n = ct.poly_modulus_degree()
    assert ct.coeff_modulus_size() == 1
    words = ct.dyn_array()
    return np.array([words.at(i * n + k) for k in range(n)], dtype=np.uint64)


def _like(ctx: seal.SEALContext, template: seal.Ciphertext, *polys: npt.NDArray[np.uint64]) -> seal.Ciphertext:
    """A ciphertext with two-component ``template``'s level, scale and NTT form, and ``polys``."""
    magic, hsize, major, minor, _, _, _ = _HEADER.unpack_from(seal_io.to_bytes(template))

    def sealed(body: bytes) -> bytes:
        return _HEADER.pack(magic, hsize, major, minor, 0, 0, _HEADER.size + len(body)) + body

    data = np.concatenate(polys).astype("<u8")
    fields = struct.pack("<4QB", *template.parms_id(), 1) + struct.pack(
        "<QQQdQ", len(polys), template.poly_modulus_degree(), 1, template.scale, 1
    )
    return seal_io.load_ciphertext(
        ctx, sealed(fields + sealed(struct.pack("<Q", data.size) + data.tobytes()))
    )


def _attack(
    kern: BinKernel,
    public: PublicContext,
    bin_cts: list[seal.Ciphertext],
    probe_template: seal.Ciphertext,
    t: int,
) -> seal.Ciphertext:
    """What the key holder rebuilds as bin diagonal ``t`` (``t < g1``) from four masked responses.

    Probe ciphertexts are trivial: ``(x, 0)`` or ``(0, x)`` with ``x`` the
    constant 1 (2 for diagonal ``t``; in NTT form a constant is the same
    word everywhere). SEAL refuses a product that is all zero ("transparent"),
    so no probe ciphertext is zero; differences of two responses cancel the
    other diagonals. With ``a0_b, a1_b`` the components of diagonal ``b``:
    ``(x, 0)`` gives ``c1 = sum_b x_b a1_b`` (the product's third component
    is zero, relinearization adds nothing); ``(0, x)`` gives
    ``c1 = sum_b x_b a0_b + ks1(sum_b x_b a1_b)``, where the key switch
    ``ks1`` is public: the attacker relinearizes ``(0, 0, v)`` itself.
    """
    ctx = public.context
    q = int(ctx.first_context_data().parms().coeff_modulus()[0].value())
    n = probe_template.poly_modulus_degree()
    zero = np.zeros(n, dtype=np.uint64)

    def const(c: int) -> npt.NDArray[np.uint64]:
        return np.full(n, c, dtype=np.uint64)

    def response_c1(component: int, bump: bool) -> npt.NDArray[np.uint64]:
        def one(b: int) -> seal.Ciphertext:
            x = const(2 if bump and b == t else 1)
            return _like(ctx, probe_template, *((x, zero) if component == 0 else (zero, x)))

        ct = kern.score_giants(bin_cts, [one(b) for b in range(kern.layout.g1)], range(1))
        kern.mask(ct, [])  # nothing requested: every slot masked
        return _poly(ct, 1)

    ev = seal.Evaluator(ctx)

    def ks1(v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        d = seal.Ciphertext()
        ev.multiply(_like(ctx, probe_template, zero, v), _like(ctx, probe_template, zero, const(1)), d)
        ev.relinearize_inplace(d, public.relin_keys)
        return _poly(d, 1)

    def sub(u: npt.NDArray[np.uint64], v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        return np.where(u >= v, u - v, u + (np.uint64(q) - v))

    def add(u: npt.NDArray[np.uint64], v: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        return sub(u, sub(zero, v))

    s1 = response_c1(0, False)  # sum_b a1_b
    a1 = sub(response_c1(0, True), s1)
    a0 = sub(
        sub(response_c1(1, True), ks1(add(s1, a1))),
        sub(response_c1(1, False), ks1(s1)),
    )
    return _like(ctx, bin_cts[t], a0, a1)


def _decode_row(keys: TenantKeys, ct: seal.Ciphertext) -> npt.NDArray[np.complex128]:
    pt = seal.Plaintext()
    seal.Decryptor(keys.context, keys.secret_key).decrypt(ct, pt)
    return np.asarray(seal.CKKSEncoder(keys.context).decode_complex(pt))


def _recover(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch, *, rerandomize: bool
) -> tuple[npt.NDArray[np.complex128], npt.NDArray[np.complex128]]:
    keys, tc, kern, public = tenant
    rng = np.random.default_rng(11)
    cap = kern.layout.capacity
    x = _unit(rng, cap)
    bin_cts = kern.load_bin(tc.encrypt_contribution(x, np.arange(cap)))
    probe_template = kern.load_probe(tc.encrypt_probe(_unit(rng, 1)[0]))[0]
    t = 3
    truth = kern.layout.pack(x, np.arange(cap))[t]  # what diagonal t encodes, slot by slot
    if not rerandomize:
        assert kern._rerandomizer is not None
        monkeypatch.setattr(kern._rerandomizer, "apply", lambda ct: None)
    got = _decode_row(keys, _attack(kern, public, bin_cts, probe_template, t))
    return got, np.asarray(truth, dtype=np.complex128)


def test_without_rerandomization_the_second_component_leaks_a_diagonal(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, truth = _recover(tenant, monkeypatch, rerandomize=False)
    # Coordinate t of every template of the bin (both halves of a slot in layout 2), to
    # the precision of a fresh encryption: no slot was requested.
    np.testing.assert_allclose(got.real, truth.real, atol=1e-5)
    np.testing.assert_allclose(got.imag, truth.imag, atol=1e-5)


def test_with_rerandomization_the_same_attack_recovers_nothing(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, truth = _recover(tenant, monkeypatch, rerandomize=True)
    # Garbage: uniform mod q, so about 2^34 in slot units, uncorrelated with the truth.
    assert np.median(np.abs(got.real)) > 1e6
    corr = np.corrcoef(got.real, truth.real)[0, 1]
    assert abs(corr) < 0.15
    if np.abs(truth.imag).max() > 0:
        assert abs(np.corrcoef(got.imag, truth.imag)[0, 1]) < 0.15


def _scored(tenant: Tenant) -> tuple[seal.Ciphertext, npt.NDArray[np.float64]]:
    _, tc, kern, _ = tenant
    rng = np.random.default_rng(5)
    cap = kern.layout.capacity
    x = _unit(rng, cap)
    p = _unit(rng, 1)[0]
    b = kern.load_bin(tc.encrypt_contribution(x, np.arange(cap)))
    return kern.score(b, kern.load_probe(tc.encrypt_probe(p)), "full"), x @ p


@pytest.mark.parametrize("kept", [0, 777, -1])
def test_honest_masked_responses_still_decrypt_to_the_scores(tenant: Tenant, kept: int) -> None:
    _, tc, kern, _ = tenant
    scored, truth = _scored(tenant)
    kept = kept % kern.layout.capacity
    ct = seal_io.load_ciphertext(kern.public.context, seal_io.to_bytes(scored))
    before = _poly(ct, 1).copy()
    kern.mask(ct, [kept])
    assert not np.array_equal(_poly(ct, 1), before)  # the second component is fresh
    got = tc.decrypt_scores(seal_io.to_bytes(ct))
    assert abs(got[kept] - truth[kept]) < 1e-3
    assert np.median(np.abs(np.delete(got - truth, kept))) > 50


def test_staged_mean_survives_rerandomization(tenant: Tenant) -> None:
    _, tc, kern, _ = tenant
    rng = np.random.default_rng(6)
    x, p = _unit(rng, 1)[0], _unit(rng, 1)[0]
    staged = kern.load_staged(tc.encrypt_staged(x))
    ct = kern.score_staged(staged, kern.load_probe(tc.encrypt_probe(p)))
    kern.mask_keep_mean(ct)
    assert abs(tc.decrypt_staged_scores(seal_io.to_bytes(ct)).mean() - x @ p) < 1e-3


def test_added_error_is_negligible(tenant: Tenant) -> None:
    """The fresh encryption of zero adds about 1e-13 per slot (rms), far under the scores' 1e-4."""
    keys, _, _, public = tenant
    assert public.public_key is not None
    scored, _ = _scored(tenant)
    plain = _decode_row(keys, scored)
    rr = Rerandomizer(public.context, public.public_key)
    diffs = []
    for _ in range(3):
        ct = seal_io.load_ciphertext(public.context, seal_io.to_bytes(scored))
        rr.apply(ct)
        assert ct.scale == scored.scale and ct.parms_id() == scored.parms_id()
        diffs.append(np.abs(_decode_row(keys, ct) - plain).max())
    assert max(diffs) < 1e-9


def test_a_key_without_public_key_gets_no_masked_response(tenant: Tenant) -> None:
    keys, _, _, _ = tenant
    old = PublicContext.from_bytes(keys.public_context_bytes(with_public_key=False))
    assert old.public_key is None
    kern = BinKernel(old)
    scored, _ = _scored(tenant)
    ct = seal_io.load_ciphertext(old.context, seal_io.to_bytes(scored))
    mask_calls: list[Callable[[seal.Ciphertext], None]] = [
        lambda c: kern.mask(c, [0]),
        kern.mask_keep_mean,
    ]
    for call in mask_calls:
        with pytest.raises(FailedPrecondition, match="register the key again"):
            call(ct)


def test_pooled_zeros_are_used_once_and_rerandomize_alike(tenant: Tenant) -> None:
    _keys, tc, _kern, public = tenant
    assert public.public_key is not None
    pool = Rerandomizer(public.context, public.public_key, pool_size=3)
    assert [pool.refill_one() for _ in range(4)] == [True, True, True, False]  # full at 3
    assert pool.pooled == 3
    kern = BinKernel(public, zero_pool=3)
    x = _unit(np.random.default_rng(7), 16)
    b = kern.load_bin(tc.encrypt_contribution(x, np.arange(16)))
    probe = kern.load_probe(tc.encrypt_probe(x[3]))
    ct = kern.score(b, probe, "full")
    zeros = [pool.zero_like(ct) for _ in range(4)]  # three from the pool, then one made now
    assert pool.pooled == 0
    assert all(z.scale == ct.scale for z in zeros)
    words = {tuple(_poly(z, 1)[:8].tolist()) for z in zeros}
    assert len(words) == 4  # no zero was handed out twice
    for z in zeros:
        out = seal.Ciphertext()
        seal.Evaluator(public.context).add(ct, z, out)
        np.testing.assert_allclose(
            tc.decrypt_scores(seal_io.to_bytes(out))[:16], x @ x[3], atol=2e-4
        )
