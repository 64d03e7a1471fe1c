"""CKKS parameter sets.

One parameter set is used per tenant key. The default, ``n4096``, is chosen
for the diagonal template layout (see :mod:`veilface.crypto.layout`): a score is
one ciphertext-ciphertext product summed over the diagonals, with no rescale,
so one 60-bit data prime carries it:

- polynomial degree N = 4096, 2048 slots;
- coefficient modulus [60, 49] bits: one data prime plus the special prime
  used for key switching (relinearization and rotations), 109 bits in all,
  the maximum SEAL allows at N = 4096 for 128-bit security (HE standard);
- templates and probes are encoded at scale 2^26, so a product has scale
  2^52 and leaves 8 bits of headroom under the data prime for |score| < 128
  (cosine scores are in [-1, 1]).

Precision: fresh-encryption noise at this scale is about 5e-5 per slot;
summing up to 2048 single-template contributions into one bin multiplies
it by at most about 45, and the resulting score error stays near 1e-4
(measured in tests/crypto/test_kernel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import tenseal.sealapi as seal

from veilface.errors import InvalidArgument


@dataclass(frozen=True)
class ParamSet:
    """A named CKKS parameter set."""

    name: str
    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    log_scale: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.log_scale)

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound on a serialized fresh (two-component) ciphertext of this set.

        Two polynomials of N 64-bit words per data prime (the last prime is the
        key-switching prime, absent from ciphertexts), plus SEAL's header; used
        to refuse an oversized blob the moment it arrives, before any parsing.
        """
        data_primes = len(self.coeff_modulus_bits) - 1
        return 2 * self.poly_modulus_degree * data_primes * 8 + 1024

    @property
    def resident_ciphertext_bytes(self) -> int:
        """Memory one loaded (deserialized) two-component ciphertext of this set takes.

        SEAL keeps two polynomials of N 64-bit coefficients per data prime,
        uncompressed: 64 KiB at n4096 (measured: a loaded 128-ciphertext bin
        of n4096 grows a process by 7.94 MiB). What the server's scoring
        workers hold per ciphertext of every bin (server/capacity.py).
        """
        data_primes = len(self.coeff_modulus_bits) - 1
        return 2 * self.poly_modulus_degree * data_primes * 8

    def seal_parameters(self) -> seal.EncryptionParameters:
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        parms.set_coeff_modulus(
            seal.CoeffModulus.Create(self.poly_modulus_degree, list(self.coeff_modulus_bits))
        )
        return parms

    def seal_context(self) -> seal.SEALContext:
        """A SEAL context that enforces 128-bit security for these parameters."""
        ctx = seal.SEALContext(self.seal_parameters(), True, seal.SEC_LEVEL_TYPE.TC128)
        if not ctx.parameters_set():
            raise InvalidArgument(f"parameter set {self.name!r} is not valid in SEAL")
        return ctx


PARAM_SETS: dict[str, ParamSet] = {
    "n4096": ParamSet("n4096", 4096, (60, 49), 26),
    # Twice the slots per bin, twice the cost per bin; for galleries whose
    # lists hold more than 2048 templates each.
    "n8192": ParamSet("n8192", 8192, (60, 60), 26),
}

DEFAULT_PARAM_SET = "n4096"


def get_param_set(name: str) -> ParamSet:
    try:
        return PARAM_SETS[name]
    except KeyError:
        known = ", ".join(sorted(PARAM_SETS))
        raise InvalidArgument(f"unknown CKKS parameter set {name!r}; use one of: {known}") from None
