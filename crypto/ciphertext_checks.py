"""Validation of ciphertexts received from the other party.

Beyond SEAL's own ``load`` checks (well-formed, coefficients reduced, a
parameters id of this context) a ciphertext must be at the level, size and
scale the protocol expects, so that a foreign or crafted ciphertext cannot
make the evaluator throw, overflow the modulus or be silently misread.
"""

from __future__ import annotations

from collections.abc import Sequence

import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.errors import InvalidCiphertext, ResourceExhausted

# A fresh ciphertext at N=8192 with one data prime is about 131 KB; a
# size-3 product about 200 KB. Anything much larger is not ours.
MAX_CIPHERTEXT_BYTES = 512 * 1024


def load_checked(
    context: seal.SEALContext,
    blob: bytes,
    *,
    scale: float,
    max_size: int = 2,
    what: str = "ciphertext",
) -> seal.Ciphertext:
    if len(blob) > MAX_CIPHERTEXT_BYTES:
        raise ResourceExhausted(f"{what} is {len(blob)} bytes; at most {MAX_CIPHERTEXT_BYTES}")
    ct = seal_io.load_ciphertext(context, blob, what)
    if ct.parms_id() != context.first_parms_id():
        raise InvalidCiphertext(f"{what} is not at the top data level of the tenant's context")
    if not 2 <= ct.size() <= max_size:
        raise InvalidCiphertext(f"{what} has {ct.size()} components; expected at most {max_size}")
    if not ct.is_ntt_form():
        raise InvalidCiphertext(f"{what} is not in NTT form (not a CKKS ciphertext)")
    if ct.scale != scale:
        raise InvalidCiphertext(f"{what} has scale 2^{_log2(ct.scale):.1f}; expected 2^{_log2(scale):.0f}")
    return ct


def check_count(blobs: Sequence[bytes], expected: int, what: str) -> None:
    """InvalidCiphertext unless there are exactly ``expected`` ciphertexts (a bin's, a probe's)."""
    if len(blobs) != expected:
        raise InvalidCiphertext(f"expected {expected} {what} ciphertexts, got {len(blobs)}")


def load_many(
    context: seal.SEALContext,
    blobs: Sequence[bytes],
    *,
    expected: int,
    scale: float,
    what: str,
) -> list[seal.Ciphertext]:
    check_count(blobs, expected, what)
    return [
        load_checked(context, b, scale=scale, what=f"{what} ciphertext {i}")
        for i, b in enumerate(blobs)
    ]


def _log2(x: float) -> float:
    import math

    return math.log2(x) if x > 0 else float("-inf")
