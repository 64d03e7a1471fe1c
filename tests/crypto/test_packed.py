"""The compiled product kernel (crypto/packed.py) against SEAL's own products, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal
import zstandard

from veilface.crypto import packed, seal_io
from veilface.crypto.kernel import BinKernel
from veilface.crypto.keys import TenantKeys
from veilface.crypto.packed import PackedBin
from veilface.crypto.public_context import PublicContext
from veilface.crypto.tenant_crypto import TenantCrypto
from veilface.errors import InvalidCiphertext

pytestmark = pytest.mark.skipif(
    packed._products is None,
    reason="veilface.crypto._products is not built (pip install -e . builds it with gcc)",
)


@pytest.fixture(scope="module")
def tenant() -> tuple[TenantCrypto, BinKernel]:
    keys = TenantKeys.generate(128)
    return TenantCrypto(keys), BinKernel(PublicContext.from_bytes(keys.public_context_bytes()))


def _unit(rng: np.random.Generator, n: int, d: int = 128) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _coefficients(kern: BinKernel, ct: seal.Ciphertext) -> np.ndarray:
    return kern.packer.coefficients(ct).copy()


def test_packed_scores_are_seals_bits(tenant) -> None:  # type: ignore[no-untyped-def]
    tc, kern = tenant
    rng = np.random.default_rng(0)
    x = _unit(rng, 3000)
    cts = kern.load_bin(tc.encrypt_contribution(x, np.arange(3000)))
    p = _unit(rng, 1)[0]
    probe = kern.load_probe(tc.encrypt_probe(p))
    packed_bin, packed_probe = kern.packer.pack(cts), kern.packer.pack(probe)
    assert packed_bin.data.shape == (len(cts), 2, kern.packer.n)
    for stage in ("presel", "rest", "full"):
        want = kern.score(cts, probe, stage)
        got = kern.score(packed_bin, packed_probe, stage)
        assert got.size() == want.size() == 2 and got.scale == want.scale
        np.testing.assert_array_equal(_coefficients(kern, got), _coefficients(kern, want))
    # a packed bin against a probe in SEAL's form (and the reverse) takes the same path
    mixed = kern.score(packed_bin, probe, "full")
    np.testing.assert_array_equal(
        _coefficients(kern, mixed), _coefficients(kern, kern.score(cts, probe, "full"))
    )
    scores = tc.decrypt_scores(seal_io.to_bytes(kern.score(packed_bin, packed_probe, "full")))
    np.testing.assert_allclose(scores[:3000], x @ p, atol=2e-4)


def test_packed_enrollment_adds_like_seal(tenant) -> None:  # type: ignore[no-untyped-def]
    tc, kern = tenant
    rng = np.random.default_rng(1)
    x = _unit(rng, 40)
    base = kern.load_bin(tc.encrypt_contribution(x[:30], np.arange(30)))
    held = kern.packer.pack(base)
    for s in range(30, 40):
        one = tc.encrypt_contribution(x[s : s + 1], [s])
        kern.add_into(base, kern.load_bin(one))
        kern.add_into(held, kern.load_bin(one))
    assert isinstance(held, PackedBin)
    for got, want in zip(kern.packer.unpack(held), base, strict=True):
        np.testing.assert_array_equal(_coefficients(kern, got), _coefficients(kern, want))
    # and serialized back, the bin decrypts to its templates
    back = tc.decrypt_bin(kern.serialize_bin(held), np.arange(40))
    np.testing.assert_allclose(back, x, atol=1e-4)
    probe = kern.load_probe(tc.encrypt_probe(x[35]))
    scores = tc.decrypt_scores(seal_io.to_bytes(kern.score(held, probe, "full")))
    np.testing.assert_allclose(scores[:40], x @ x[35], atol=2e-4)


def test_a_coefficient_past_the_prime_is_refused_by_seal(tenant) -> None:  # type: ignore[no-untyped-def]
    _tc, kern = tenant
    bad = np.zeros((2, kern.packer.n), dtype=np.uint64)
    bad[1, 7] = kern.packer.q  # not reduced: SEAL's load validates every coefficient
    with pytest.raises(InvalidCiphertext):
        kern.packer.ciphertext(bad, 2.0**26)
    with pytest.raises(ValueError, match="uint64"):
        kern.packer.ciphertext(bad.astype(np.int64), 2.0**26)


def test_the_extension_checks_its_buffers(tenant) -> None:  # type: ignore[no-untyped-def]
    _tc, kern = tenant
    n, q = kern.packer.n, kern.packer.q
    ext = packed._products
    small = np.zeros((1, 2, n), dtype=np.uint64)
    out = np.zeros((3, n), dtype=np.uint64)
    with pytest.raises(ValueError, match="smaller than its shape"):
        ext.giant(small, small, 0, 2, n, q, out)  # two terms, one ciphertext each
    with pytest.raises(ValueError, match="smaller than its shape"):
        ext.giant(small, small, 1, 1, n, q, out)  # past the bin's end
    with pytest.raises(ValueError, match="bad sizes or modulus"):
        ext.giant(small, small, 0, 33, n, q, out)  # over 32 terms the sums could overflow
    with pytest.raises(ValueError, match="bad sizes or modulus"):
        ext.giant(small, small, 0, 1, n, 1 << 62, out)
    with pytest.raises(TypeError):
        ext.giant(small, small, 0, 1, n, q, out.tobytes())  # out must be writable


def test_an_unseeded_probe_is_read_from_its_bytes(tenant) -> None:  # type: ignore[no-untyped-def]
    tc, kern = tenant
    p = _unit(np.random.default_rng(3), 1)[0]
    blobs = tc.encrypt_probe(p, seeded=False)  # the full form
    scale = kern.public.param_set.scale
    for blob in blobs:
        got = kern.packer.parse(blob, scale)
        assert got is not None
        want = kern.packer.coefficients(kern.load_staged(blob))
        np.testing.assert_array_equal(got, want)
    resident = kern.load_resident_probe(blobs)
    assert isinstance(resident, PackedBin) and len(resident) == kern.layout.g1
    # a seeded probe (the default): its second half expanded from the seed as SEAL does
    seeded = tc.encrypt_probe(p, seeded=True)
    assert len(seeded[0]) < len(blobs[0]) // 2 + 1024
    from_seal = kern.packer.pack(kern.load_probe(seeded))
    for i, blob in enumerate(seeded):
        np.testing.assert_array_equal(kern.packer.parse(blob, scale), from_seal.data[i])
    np.testing.assert_array_equal(kern.load_resident_probe(seeded).data, from_seal.data)


def _zstd_blob(original: bytes, body: bytes) -> bytes:
    """SEAL's header of ``original`` over ``body`` as one zstd frame (its size declared)."""
    frame = zstandard.ZstdCompressor().compress(body)
    header = bytearray(original[:16])
    header[8:16] = (16 + len(frame)).to_bytes(8, "little")
    return bytes(header) + frame


def _uncompressed_blob(original: bytes, body: bytes) -> bytes:
    """SEAL's header of ``original`` over an uncompressed body."""
    header = bytearray(original[:16])
    header[5] = 0  # compr_mode_type::none
    header[8:16] = (16 + len(body)).to_bytes(8, "little")
    return bytes(header) + body


def test_a_stored_bin_is_read_and_expanded_like_seal(tenant) -> None:  # type: ignore[no-untyped-def]
    tc, kern = tenant
    x = _unit(np.random.default_rng(5), 300)
    blobs = tc.encrypt_contribution(x, np.arange(300))  # seeded, as a bulk import stores them
    held = kern.load_resident_bin(blobs)
    assert isinstance(held, PackedBin)
    np.testing.assert_array_equal(held.data, kern.packer.pack(kern.load_bin(blobs)).data)
    scale = held.scale
    # the same bytes uncompressed, with a flipped seed bit, or naming SEAL's other PRNG: read
    # exactly as SEAL reads them, by the parser or (another PRNG) by SEAL itself
    body = bytearray(zstandard.ZstdDecompressor().decompress(blobs[0][16:], max_output_size=1 << 20))
    flipped = bytearray(body)
    flipped[-1] ^= 1
    shake = bytearray(body)
    shake[-65] = 2  # prng_type::shake256
    for variant, parsed in ((body, True), (flipped, True), (shake, False)):
        blob = _uncompressed_blob(blobs[0], bytes(variant))
        assert (kern.packer.parse(blob, scale) is not None) == parsed
        want = kern.packer.coefficients(kern.load_staged(blob))
        np.testing.assert_array_equal(kern.load_resident_bin([blob, *blobs[1:]]).data[0], want)
    with pytest.raises(InvalidCiphertext, match="expected 128 bin ciphertexts"):
        kern.load_resident_bin(blobs[:-1])


def test_hostile_probe_bytes_get_seals_errors(tenant) -> None:  # type: ignore[no-untyped-def]
    tc, kern = tenant
    scale = kern.public.param_set.scale
    blobs = tc.encrypt_probe(_unit(np.random.default_rng(4), 1)[0], seeded=False)
    good = kern.packer.parse(blobs[0], scale)
    assert good is not None

    def as_probe(bad: bytes) -> list[bytes]:
        return [bad, *blobs[1:]]

    unreduced = good.copy()
    unreduced[0, 5] = kern.packer.q
    wrong_scale = kern.packer.uncompressed(good, scale * 2)
    three = kern.packer.uncompressed(np.vstack([good, good[:1]]), scale)
    cases = {
        "unreduced coefficient": kern.packer.uncompressed(unreduced, scale),
        "wrong scale": wrong_scale,
        "three components": three,
        "truncated": blobs[0][: len(blobs[0]) // 2],
        "flipped zstd byte": blobs[0][:100] + bytes([blobs[0][100] ^ 0xFF]) + blobs[0][101:],
        "empty": b"",
        "a declared 64 MB zstd frame": _zstd_blob(blobs[0], b"\0" * (64 << 20)),
    }
    for name, bad in cases.items():
        assert kern.packer.parse(bad, scale) is None, name
        with pytest.raises(InvalidCiphertext):
            kern.load_resident_probe(as_probe(bad))
    # the uncompressed form of a valid ciphertext is read like the compressed one
    plain = kern.packer.uncompressed(good, scale)
    np.testing.assert_array_equal(kern.packer.parse(plain, scale), good)
    with pytest.raises(InvalidCiphertext, match="expected 32 probe ciphertexts"):
        kern.load_resident_probe(blobs[:-1])
