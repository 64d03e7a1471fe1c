"""Encryption spread over worker processes (tenant side).

SEAL's encryptor holds the GIL, so a bin contribution (``d_pad``
ciphertexts) or a probe (``g1``) is split across processes. Each worker
holds the tenant's secret key: the pool runs only in the tenant's trusted
zone, like the rest of :mod:`veilface.crypto.tenant_crypto`.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from veilface.crypto import seal_io

_worker: tuple[seal.CKKSEncoder, seal.Encryptor, float] | None = None


def _init(param_set: str, secret: bytes) -> None:
    global _worker
    from veilface.crypto.params import get_param_set

    ps = get_param_set(param_set)
    ctx = ps.seal_context()
    sk = seal_io.load_secret_key(ctx, secret)
    _worker = (seal.CKKSEncoder(ctx), seal.Encryptor(ctx, sk), ps.scale)


def _ping() -> bool:
    return _worker is not None


def encrypt_rows(
    rows: npt.NDArray[np.float64] | npt.NDArray[np.complex128], seeded: bool = True
) -> list[bytes]:
    """Encode and encrypt each row, real or complex (symmetric; see :func:`encrypt_row`)."""
    if _worker is None:
        raise RuntimeError("encryption worker not initialised")
    encoder, encryptor, scale = _worker
    pt = seal.Plaintext()
    return [encrypt_row(encoder, encryptor, scale, row, pt, seeded) for row in rows]


def encrypt_row(
    encoder: seal.CKKSEncoder,
    encryptor: seal.Encryptor,
    scale: float,
    row: npt.NDArray[Any],
    pt: seal.Plaintext,
    seeded: bool,
) -> bytes:
    """One row encoded and encrypted under the secret key, serialized.

    ``seeded``: SEAL writes the seed of the ciphertext's uniform half instead
    of the half itself: half the bytes, and 0.1 ms less to serialize. The
    full form is there for tests and for measuring the trade-off (the
    server reads both, :meth:`veilface.crypto.packed.Packer.parse`).
    """
    encoder.encode(row.tolist(), scale, pt)
    if seeded:
        return seal_io.to_bytes(encryptor.encrypt_symmetric(pt))
    ct = seal.Ciphertext()
    encryptor.encrypt_symmetric(pt, ct)
    return seal_io.to_bytes(ct)


class EncryptPool:
    """``workers`` processes that encrypt rows under one secret key."""

    def __init__(self, param_set: str, secret: bytes, workers: int = 2) -> None:
        # fork: no re-import of the caller's __main__ (spawn would run an
        # unguarded script again). The SDK builds the pool before it opens
        # any gRPC channel, so no gRPC state is forked.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        self.workers = workers
        self._ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(param_set, secret))
        for f in [self._ex.submit(_ping) for _ in range(workers)]:
            f.result()

    def encrypt_rows(
        self, rows: npt.NDArray[np.float64] | npt.NDArray[np.complex128], seeded: bool = True
    ) -> list[bytes]:
        parts: list[npt.NDArray[Any]] = np.array_split(rows, self.workers)
        futures: list[Future[list[bytes]]] = [
            self._ex.submit(encrypt_rows, p, seeded) for p in parts if len(p)
        ]
        out: list[bytes] = []
        for f in futures:
            out.extend(f.result())
        return out

    def close(self) -> None:
        self._ex.shutdown(wait=False, cancel_futures=True)
