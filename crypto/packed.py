"""Bins as arrays of NTT coefficients, scored by a compiled product kernel.

Products are most of a bin's arithmetic (docs/architecture.md, "Kernel
roofline"): 128 ciphertext-ciphertext products per layout-2 bin, against 4
relinearizations and 3 rotations. SEAL reduces every product and every sum
modulo the prime; :mod:`veilface.crypto._products` accumulates a giant
step's products in 128 bits and reduces each output coefficient once, for
the same bits (tested against SEAL). ``tenseal.sealapi`` gives no access to
a ciphertext's memory, so the coefficients move through SEAL's own
serialization: a loaded ciphertext is saved (SEAL compresses it with zstd),
decompressed and parsed here; a giant step's result goes back as an
uncompressed serialization that SEAL loads and validates. Key switching
(relinearization, rotations) stays in SEAL.

A :class:`PackedBin` holds a bin's ciphertexts as one ``uint64`` array of
shape ``(ciphertexts, 2, N)``: the same 64 KiB per ciphertext SEAL would hold
at n4096. Only parameter sets with one data prime are packed (both of ours);
without the compiled kernel (a build without a C compiler) or with
``VEILFACE_PRODUCTS=seal`` everything stays in SEAL's form.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal
import zstandard

from veilface.crypto import seal_io
from veilface.crypto.ciphertext_checks import MAX_CIPHERTEXT_BYTES, load_checked

log = logging.getLogger(__name__)

U64Array = npt.NDArray[np.uint64]

_SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct(
    "<HBBBBHQ"
)  # magic, header size, version major/minor, compression, -, total size
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# Ciphertext members after the header: parms_id (4 x u64), is_ntt_form (u8), size,
# poly_modulus_degree, coeff_modulus_size (u64 each), scale (f64), correction factor (u64);
# then the coefficients as a nested serialization (header, u64 count, data).
_MEMBERS = struct.Struct("<4QBQQQdQ")
_DATA_OFFSET = _MEMBERS.size + _HEADER.size + 8
# A seeded ciphertext ends with its PRNG's description: a header, the PRNG type, the seed.
_SEED_INFO = struct.Struct("<HBBBBHQB64x")
_PRNG_BLAKE2XB = 1  # SEAL's default PRNG (prng_type::blake2xb)


def _load_extension() -> ModuleType | None:
    if os.environ.get("VEILFACE_PRODUCTS", "").lower() == "seal":
        return None
    try:
        import importlib

        module = importlib.import_module("veilface.crypto._products")
    except ImportError:
        log.warning(
            "veilface.crypto._products is not built (no C compiler at install?): "
            "bins are scored with SEAL's products, 2-5x slower"
        )
        return None
    return module


_products = _load_extension()


@dataclass
class PackedBin:
    """A bin's (or a probe's) ciphertexts as NTT coefficients, one data prime.

    ``data[i, c]`` is component ``c`` of ciphertext ``i``: ``N`` coefficients
    below the prime, in NTT form, at the context's top data level.
    """

    data: U64Array
    scale: float

    def __len__(self) -> int:
        return int(self.data.shape[0])


class Packer:
    """Moves ciphertexts of one context between SEAL's form and :class:`PackedBin`."""

    def __init__(self, context: seal.SEALContext) -> None:
        self._ctx = context
        parms = context.first_context_data().parms()
        self.n = int(parms.poly_modulus_degree())
        moduli = parms.coeff_modulus()
        self.q = int(moduli[0].value())
        self._parms_id = tuple(int(x) for x in context.first_parms_id())
        self.available = _products is not None and len(moduli) == 1
        self._zstd = zstandard.ZstdDecompressor()
        # the format version this SEAL writes (and the only one :meth:`parse` reads)
        major, minor = _HEADER.unpack_from(seal_io.to_bytes(seal.Ciphertext(context)))[2:4]
        self._version: tuple[int, int] = (major, minor)

    # -- SEAL -> arrays ----------------------------------------------------------------------

    def coefficients(self, ct: seal.Ciphertext) -> U64Array:
        """A copy of a ciphertext's coefficients, shape ``(size, N)``."""
        blob = seal_io.to_bytes(ct)
        magic, header_size, major, minor, compression, _, total = _HEADER.unpack_from(blob)
        if (
            magic != _SEAL_MAGIC
            or header_size != _HEADER.size
            or total != len(blob)
            or (major, minor) != self._version
        ):
            raise RuntimeError("SEAL wrote a serialization this parser does not know")
        size = int(ct.size())
        expected = _DATA_OFFSET + 8 * size * self.n
        if compression == _COMPR_ZSTD:
            body = self._zstd.decompress(blob[_HEADER.size :], max_output_size=expected)
        elif compression == _COMPR_NONE:
            body = blob[_HEADER.size :]
        else:
            raise RuntimeError(f"SEAL serialization with compression mode {compression}")
        fields = _MEMBERS.unpack_from(body)
        count = struct.unpack_from("<Q", body, _MEMBERS.size + _HEADER.size)[0]
        if (
            len(body) != expected
            or fields[5] != size
            or fields[6] != self.n
            or count != size * self.n
        ):
            raise RuntimeError("unexpected ciphertext layout in SEAL's serialization")
        return np.frombuffer(
            body, dtype=np.uint64, offset=_DATA_OFFSET, count=size * self.n
        ).reshape(size, self.n)

    def parse(self, blob: bytes, scale: float) -> U64Array | None:
        """A fresh ciphertext's coefficients straight from its bytes, or None.

        Reads the two forms SEAL writes for a two-component ciphertext: full,
        and seeded (the first component and the 64-byte seed of the second,
        which :func:`_products.expand_seed` expands exactly as SEAL's load
        does). Only a ciphertext at the top data level and the given scale,
        with every coefficient below the prime, is accepted: the checks SEAL's
        ``load`` and :func:`~veilface.crypto.ciphertext_checks.load_checked`
        make, done on the bytes. Anything else (another PRNG or version of
        SEAL's format, a malformed blob) returns None and goes through SEAL,
        which raises the precise error. Decompression is bounded by the
        size the frame declares, which must be one a valid blob can have.
        """
        if len(blob) < _HEADER.size:
            return None
        magic, header_size, major, minor, compression, _, total = _HEADER.unpack_from(blob)
        if magic != _SEAL_MAGIC or header_size != _HEADER.size or total != len(blob):
            return None
        if (major, minor) != self._version:
            return None
        full, seeded = _DATA_OFFSET + 16 * self.n, _DATA_OFFSET + 8 * self.n + _SEED_INFO.size
        if compression == _COMPR_ZSTD:
            payload = blob[_HEADER.size :]
            try:
                # SEAL declares the frame's size: only the two a valid blob can have are
                # decompressed (a declared 200 MB took 0.16 s to refuse through max_output_size)
                if zstandard.frame_content_size(payload) not in (full, seeded):
                    return None
                body = self._zstd.decompress(payload, max_output_size=full)
            except zstandard.ZstdError:
                return None
        elif compression == _COMPR_NONE:
            body = blob[_HEADER.size :]
        else:
            return None
        if len(body) not in (full, seeded):
            return None
        *parms_id, ntt, size, degree, moduli, ct_scale, correction = _MEMBERS.unpack_from(body)
        if (
            tuple(parms_id) != self._parms_id
            or (ntt, size, degree, moduli, correction) != (1, 2, self.n, 1, 1)
            or ct_scale != scale
        ):
            return None
        words = 2 * self.n if len(body) == full else self.n
        n_magic, n_header, n_major, n_minor, n_compression, _, n_total = _HEADER.unpack_from(
            body, _MEMBERS.size
        )
        count = struct.unpack_from("<Q", body, _MEMBERS.size + _HEADER.size)[0]
        if (
            (n_magic, n_header, n_major, n_minor, n_compression)
            != (_SEAL_MAGIC, _HEADER.size, major, minor, _COMPR_NONE)
            or n_total != _HEADER.size + 8 + 8 * words
            or count != words
        ):
            return None
        coefficients = np.empty((2, self.n), dtype=np.uint64)
        coefficients.reshape(-1)[:words] = np.frombuffer(
            body, dtype=np.uint64, offset=_DATA_OFFSET, count=words
        )
        if words == self.n:  # seeded: the second component from its seed
            if _products is None:
                return None
            s_magic, s_header, s_major, s_minor, s_compression, _, s_total, prng = (
                _SEED_INFO.unpack_from(body, _DATA_OFFSET + 8 * self.n)
            )
            if (s_magic, s_header, s_major, s_minor, s_compression, s_total, prng) != (
                _SEAL_MAGIC,
                _HEADER.size,
                major,
                minor,
                _COMPR_NONE,
                _SEED_INFO.size,
                _PRNG_BLAKE2XB,
            ):
                return None
            seed = body[len(body) - 64 :]
            ext: Any = _products
            ext.expand_seed(seed, self.n, self.q, coefficients[1])
        if int(coefficients.max()) >= self.q:
            return None
        return coefficients

    def load(self, blobs: Sequence[bytes], *, scale: float, what: str) -> PackedBin:
        """Validated ciphertexts as one packed array: :meth:`parse`, else SEAL's checked load."""
        data = np.empty((len(blobs), 2, self.n), dtype=np.uint64)
        for i, blob in enumerate(blobs):
            coefficients = self.parse(blob, scale) if len(blob) <= MAX_CIPHERTEXT_BYTES else None
            if coefficients is None:
                ct = load_checked(self._ctx, blob, scale=scale, what=f"{what} ciphertext {i}")
                coefficients = self.coefficients(ct)
            data[i] = coefficients
        return PackedBin(data, scale)

    def pack(self, cts: Sequence[seal.Ciphertext]) -> PackedBin:
        """Two-component ciphertexts of one scale, at the top data level, as one array."""
        if not cts:
            raise ValueError("nothing to pack")
        data = np.empty((len(cts), 2, self.n), dtype=np.uint64)
        scale = float(cts[0].scale)
        for i, ct in enumerate(cts):
            if ct.size() != 2 or float(ct.scale) != scale:
                raise ValueError("only two-component ciphertexts of one scale are packed")
            data[i] = self.coefficients(ct)
        return PackedBin(data, scale)

    # -- arrays -> SEAL ----------------------------------------------------------------------

    def ciphertext(self, coefficients: U64Array, scale: float) -> seal.Ciphertext:
        """A SEAL ciphertext from ``(size, N)`` coefficients (validated by SEAL's load)."""
        return seal_io.load_ciphertext(
            self._ctx, self.uncompressed(coefficients, scale), "packed ciphertext"
        )

    def uncompressed(self, coefficients: U64Array, scale: float) -> bytes:
        """SEAL's serialization, without compression, of a ciphertext at the top data level."""
        size = int(coefficients.shape[0])
        if (
            coefficients.ndim != 2
            or coefficients.shape[1] != self.n
            or coefficients.dtype != np.uint64
        ):
            raise ValueError(f"expected (size, {self.n}) uint64 coefficients")
        major, minor = self._version
        data_bytes = 8 * size * self.n
        nested = _HEADER.pack(
            _SEAL_MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, _HEADER.size + 8 + data_bytes
        )
        members = _MEMBERS.pack(*self._parms_id, 1, size, self.n, 1, scale, 1)
        total = _HEADER.size + len(members) + len(nested) + 8 + data_bytes
        outer = _HEADER.pack(_SEAL_MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, total)
        return b"".join(
            (
                outer,
                members,
                nested,
                struct.pack("<Q", size * self.n),
                np.ascontiguousarray(coefficients).tobytes(),
            )
        )

    def unpack(self, packed: PackedBin) -> list[seal.Ciphertext]:
        return [self.ciphertext(packed.data[i], packed.scale) for i in range(len(packed))]

    # -- arithmetic --------------------------------------------------------------------------

    def add_into(self, acc: PackedBin, other: PackedBin) -> None:
        """``acc += other`` coefficient-wise mod q (SEAL's ``add_inplace``, same bits)."""
        if acc.data.shape != other.data.shape or acc.scale != other.scale:
            raise ValueError("packed bins of different shapes or scales")
        q = np.uint64(self.q)
        np.add(acc.data, other.data, out=acc.data)  # both < q < 2^61: no overflow
        np.subtract(acc.data, q, out=acc.data, where=acc.data >= q)

    def giant_products(self, bin_: PackedBin, probe: PackedBin, first: int, out: U64Array) -> None:
        """``out`` (3, N) = sum over b of ``bin_[first + b] x probe[b]`` for every probe ciphertext."""
        ext: Any = _products
        if ext is None:
            raise RuntimeError("the compiled product kernel is not available")
        ext.giant(bin_.data, probe.data, first, len(probe), self.n, self.q, out)
