"""Tenant-side encryption and decryption (runs only where the secret key is).

Encryption is symmetric (the tenant holds the secret key), which lets SEAL
serialize a fresh ciphertext with a seed in place of its uniform half: the
upload is half the size of a public-key encryption, for the same security.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from veilface.crypto.ciphertext_checks import load_checked
from veilface.crypto.encrypt_pool import EncryptPool, encrypt_row
from veilface.crypto.keys import TenantKeys

FloatArray = npt.NDArray[np.float64]
Rows = npt.NDArray[np.float64] | npt.NDArray[np.complex128]


class TenantCrypto:
    """Encrypt bin contributions and probes; decrypt score ciphertexts."""

    def __init__(self, keys: TenantKeys, *, workers: int = 0) -> None:
        """``workers`` > 1 spreads encryption over that many processes."""
        self.keys = keys
        self.layout = keys.layout
        self._ctx = keys.context
        self._scale = keys.param_set.scale
        self._encoder = seal.CKKSEncoder(self._ctx)
        self._encryptor = seal.Encryptor(self._ctx, keys.secret_key)
        self._decryptor = seal.Decryptor(self._ctx, keys.secret_key)
        self._pool: EncryptPool | None = None
        if workers > 1:
            self._pool = EncryptPool(keys.param_set.name, keys.secret_key_bytes(), workers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _encrypt_rows(self, rows: Rows, *, seeded: bool = True) -> list[bytes]:
        """Encode and encrypt each row: real rows, or complex ones (two templates per slot)."""
        if self._pool is not None and len(rows) >= 8:
            return self._pool.encrypt_rows(rows, seeded)
        pt = seal.Plaintext()
        return [
            encrypt_row(self._encoder, self._encryptor, self._scale, row, pt, seeded) for row in rows
        ]

    def encrypt_contribution(
        self, templates: npt.ArrayLike, slot_idx: npt.ArrayLike
    ) -> list[bytes]:
        """``d_pad`` ciphertexts that add the templates into their slots of a bin.

        A single template is encrypted on its own (zero everywhere else) and
        the server adds it homomorphically (PFIP's flexible enrollment); a
        bulk import packs up to ``slots`` templates in one contribution.
        """
        return self._encrypt_rows(self.layout.pack(templates, slot_idx))

    def encrypt_contribution_chunks(
        self, templates: npt.ArrayLike, slot_idx: npt.ArrayLike, *, chunk: int = 64
    ) -> Iterator[list[bytes]]:
        """:meth:`encrypt_contribution` in order, ``chunk`` ciphertexts at a time (for streaming)."""
        rows = self.layout.pack(templates, slot_idx)
        for start in range(0, len(rows), chunk):
            yield self._encrypt_rows(rows[start : start + chunk])

    def encrypt_staged(self, template: npt.ArrayLike) -> bytes:
        """One ciphertext holding a template for the staging area (fast single enrollment)."""
        return self._encrypt_rows(self.layout.pack_staged(template)[None, :])[0]

    def decrypt_staged(self, blob: bytes) -> FloatArray:
        """Recover a staged template: float64 [dim] (to fold leftovers into a bin)."""
        ct = load_checked(self._ctx, blob, scale=self._scale, what="staged template")
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return self.layout.unpack_staged(self._encoder.decode_double(pt))

    def encrypt_probe(self, probe: npt.ArrayLike, *, seeded: bool = True) -> list[bytes]:
        """The ``g1`` baby-step rotations of the probe, each a fresh ciphertext.

        Seeded by default (1.06 MB for 32 ciphertexts at n4096, half the
        full form): the bytes cross the client's encryption processes, the
        network and the server's pipes to each scoring worker, and a worker
        expands a seed in 0.15 ms (:meth:`veilface.crypto.packed.Packer.parse`).
        Measured here, the full form's extra megabyte cost more than that.
        """
        return self._encrypt_rows(self.layout.probe_vectors(probe), seeded=seeded)

    def _decrypt_score_plain(self, blob: bytes) -> seal.Plaintext:
        ct = load_checked(
            self._ctx, blob, scale=self._scale * self._scale, max_size=3, what="score ciphertext"
        )
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return pt

    def decrypt_scores(self, blob: bytes) -> FloatArray:
        """Decrypt one bin's score ciphertext: float64 [capacity], one score per virtual slot."""
        pt = self._decrypt_score_plain(blob)
        if self.layout.per_slot == 1:
            return np.asarray(self._encoder.decode_double(pt), dtype=np.float64)
        return self.layout.slot_values(np.asarray(self._encoder.decode_complex(pt)))

    def decrypt_staged_scores(self, blob: bytes) -> FloatArray:
        """Decrypt a staged template's score ciphertext: float64 [slots], the real parts.

        Staged templates are real in every layout; the tenant reads their
        mean (identification) or slot 0 (verification).
        """
        return np.asarray(self._encoder.decode_double(self._decrypt_score_plain(blob)), dtype=np.float64)

    def decrypt_bin(self, blobs: Sequence[bytes], slot_idx: npt.ArrayLike) -> FloatArray:
        """Recover the templates in the given slots of a bin (re-pack, key rotation)."""
        if len(blobs) != self.layout.n_ciphertexts:
            from veilface.errors import InvalidCiphertext

            raise InvalidCiphertext(
                f"a bin has {self.layout.n_ciphertexts} ciphertexts, got {len(blobs)}"
            )
        complex_rows = self.layout.per_slot == 2
        rows = np.zeros(
            (self.layout.n_ciphertexts, self.layout.slots),
            dtype=np.complex128 if complex_rows else np.float64,
        )
        pt = seal.Plaintext()
        for k, blob in enumerate(blobs):
            ct = load_checked(self._ctx, blob, scale=self._scale, what=f"bin ciphertext {k}")
            self._decryptor.decrypt(ct, pt)
            rows[k] = self._encoder.decode_complex(pt) if complex_rows else self._encoder.decode_double(pt)
        return self.layout.unpack(rows, slot_idx)
