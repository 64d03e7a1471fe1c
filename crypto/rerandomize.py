"""Re-randomization of score responses with a fresh public-key encryption of zero.

A score ciphertext ``(c0, c1)`` is a deterministic function of the bins'
ciphertexts and of the probe ciphertexts, which the querying key holder
chose. The mask (:meth:`veilface.crypto.kernel.BinKernel.mask`) is a
plaintext and changes ``c0`` only, so ``c1`` would tell a key holder who
sends crafted probes (trivial encryptions such as ``(1, 0)`` or ``(0, 1)``)
the bins' ciphertext polynomials themselves, and with them the templates
of every slot (tests/crypto/test_rerandomize.py shows it). Adding a fresh
encryption of zero under the tenant's public key,

    (c0, c1) + (b u + e0, a u + e1),  u ternary, e0, e1 Gaussian (sigma 3.2),

makes ``c1`` an RLWE sample (``a u + e1`` is pseudorandom under RLWE) and
the response a fresh encryption of its plaintext: the masked scores plus
the response's own noise plus ``e0 + e1 s + e u`` (``e``: the public
key's error).

Added error: a coefficient of ``e0 + e1 s + e u`` has standard deviation
about ``3.2 * sqrt(1 + 4N/3)`` = 240 at N = 4096, i.e. 5e-14 of the score
scale 2^52. Measured per slot (tests/crypto/test_rerandomize.py, both
layouts): rms 1.5e-13, at most 1.6e-12 in slot units, eight orders of
magnitude under the scores' own CKKS error (1e-4).

No noise flooding: a flooding term must exceed the response's noise by
2^lambda (lambda = 40 for statistical smudging), i.e. about 2^73 in
coefficient units for a noise of 1e-4 at scale 2^52, over the 60-bit data
prime; the whole room left under the decryption bound (about 60 slot
units, :func:`veilface.crypto.kernel.mask_magnitude`) is 2^58. What a key
holder still sees is the decryption noise of the kept slots
(docs/protocol.md, "The ciphertext beneath the masks").

Cost: one public-key encryption of zero (SEAL samples it at the key level,
over both primes, then divides by the special prime) and one addition per
response: 0.79 ms of one core at N = 4096, the encryption 0.72 of it
(docs/architecture.md, "Kernel roofline").
"""

from __future__ import annotations

from collections import deque

import tenseal.sealapi as seal


class Rerandomizer:
    """Add a fresh encryption of zero under one tenant public key to ciphertexts.

    ``pool_size`` > 0 keeps up to that many encryptions of zero at the top
    data level (where every score response is), made ahead of use by
    :meth:`refill_one` in a worker's idle time
    (:mod:`veilface.server.idle_work`): a response then costs an addition,
    not a public-key encryption (1.3 ms of a 9 ms bin on this machine). Each
    pooled zero is taken once and dropped, so no two responses share one; an
    empty pool falls back to encrypting on the spot. 64 KiB per pooled zero
    at n4096.
    """

    def __init__(
        self, context: seal.SEALContext, public_key: seal.PublicKey, *, pool_size: int = 0
    ) -> None:
        self._encryptor = seal.Encryptor(context, public_key)
        self._evaluator = seal.Evaluator(context)
        self._top = context.first_parms_id()
        self.pool_size = pool_size
        self._pool: deque[seal.Ciphertext] = deque()  # append and popleft are atomic

    @property
    def pooled(self) -> int:
        return len(self._pool)

    def refill_one(self) -> bool:
        """Encrypt one zero into the pool; False (and no work) when it is full."""
        if len(self._pool) >= self.pool_size:
            return False
        zero = seal.Ciphertext()
        self._encryptor.encrypt_zero(self._top, zero)
        self._pool.append(zero)
        return True

    def zero_like(self, ct: seal.Ciphertext) -> seal.Ciphertext:
        """A fresh encryption of zero at ``ct``'s level (parms id) and scale, used once."""
        zero: seal.Ciphertext | None = None
        if self._pool and ct.parms_id() == self._top:
            try:
                zero = self._pool.popleft()
            except IndexError:  # taken meanwhile
                zero = None
        if zero is None:
            zero = seal.Ciphertext()
            # SEAL encrypts zero directly at any level of the modulus chain.
            self._encryptor.encrypt_zero(ct.parms_id(), zero)
        zero.scale = ct.scale
        return zero

    def apply(self, ct: seal.Ciphertext) -> None:
        """Re-randomize a two-component ciphertext in place (it decrypts to the same plaintext)."""
        if ct.size() != 2:
            raise ValueError(f"only a relinearized ciphertext is re-randomized (size {ct.size()})")
        self._evaluator.add_inplace(ct, self.zero_like(ct))
