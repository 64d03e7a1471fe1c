"""The public evaluation context a tenant registers with the server.

Wire format (all integers big-endian)::

    b"VFPC1\\n" | u32 header_len | header JSON | sections

The header names the parameter set, template dimension, layout (its
preselection window and, since complex packing, ``layout_version``: a
header without it is a version-1 key, see :mod:`veilface.crypto.layout`)
and the sections with their lengths. Exactly four section kinds exist:
``params``, ``relin_keys``, ``galois_keys`` and ``public_key`` (an
encryption key, with which the server re-randomizes every score response:
:mod:`veilface.crypto.rerandomize`). Contexts made before it lack the
``public_key`` section; they still load (``PublicContext.public_key`` is
None) but the server answers no score for them (docs/protocol.md, "The
ciphertext beneath the masks"). There is no field a secret key could
travel in, and :meth:`PublicContext.from_bytes` rejects any other section,
any mismatch with the named parameter set and any missing Galois key: a
server that loads a context can evaluate but never decrypt.

The context must also carry nothing more than the layout needs, checked
before SEAL parses anything: each key section is a SEAL serialization,
usually zstd-compressed, and a few hundred KiB of compressed all-zero keys
expand to gigabytes in every process that loads them. So the size a section
can expand to is bounded first (:func:`_content_bound`: from the zstd block
headers, without decompressing; a zlib stream is inflated up to the bound
and no further) against what the needed number of keys takes at these
parameters; after loading, the Galois keys must be exactly the rotations of
the layout (with or without those of staged scoring), the
relinearization keys exactly one key and the public key one key at the
key level of these parameters.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass

import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.layout import LEGACY_LAYOUT_VERSION, DiagonalLayout
from veilface.crypto.params import ParamSet, get_param_set
from veilface.errors import InvalidContext, ResourceExhausted

MAGIC = b"VFPC1\n"
SECTIONS = ("params", "relin_keys", "galois_keys", "public_key")
# A context registered before response re-randomization: no public key.
LEGACY_SECTIONS = SECTIONS[:3]
# Refused before the header is read: more than any parameter set's keys take
# (n8192 with 512-d templates: 20 Galois keys, about 5.3 MB uncompressed).
MAX_CONTEXT_BYTES = 16 * 1024 * 1024
MAX_PARAMS_BYTES = 64 * 1024

_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version, compression, reserved, size
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 * 1024


def key_bytes(param_set: ParamSet) -> int:
    """Upper bound on one serialized key-switching key (a Galois key, the relin key).

    SEAL keeps one public key per data prime, each a two-polynomial
    ciphertext over every prime (the special prime included), plus headers.
    """
    primes = len(param_set.coeff_modulus_bits)
    return int((primes - 1) * (2 * param_set.poly_modulus_degree * primes * 8 + 256))


def public_key_bound(param_set: ParamSet) -> int:
    """Bytes a serialized public key can take, uncompressed: two polynomials over every prime."""
    primes = len(param_set.coeff_modulus_bits)
    return int(2 * param_set.poly_modulus_degree * primes * 8 + 1024)


def keys_section_bound(param_set: ParamSet, n_keys: int) -> int:
    """Bytes a serialized set of ``n_keys`` key-switching keys can take, uncompressed.

    SEAL's Galois keys hold one (possibly empty) entry per polynomial
    coefficient index, 8 bytes each when empty; the rest is the keys.
    """
    return int(1024 + 8 * param_set.poly_modulus_degree + n_keys * (key_bytes(param_set) + 8))


def _zstd_content_bound(data: memoryview, limit: int, what: str) -> int:
    """Most bytes a zstd frame can decompress to, read from its block headers (RFC 8878).

    A compressed block decompresses to at most the block maximum (128 KiB or
    the window, if smaller), a raw or RLE block to its stated size. The walk
    stops as soon as the bound passes ``limit``.
    """
    if len(data) < 6 or int.from_bytes(data[:4], "little") != _ZSTD_MAGIC:
        raise InvalidContext(f"public context {what} is not a zstd stream")
    fhd = data[4]
    fcs_flag, single, reserved = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1
    checksum, did_flag = (fhd >> 2) & 1, fhd & 3
    if reserved:
        raise InvalidContext(f"public context {what} has a malformed zstd frame")
    pos = 5
    window = _ZSTD_BLOCK_MAX
    if not single:
        wd = data[pos]
        pos += 1
        base = 1 << (10 + (wd >> 3))
        window = base + (base // 8) * (wd & 7)
    pos += (0, 1, 2, 4)[did_flag]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    content_size: int | None = None
    if fcs_size:
        if pos + fcs_size > len(data):
            raise InvalidContext(f"public context {what} has a truncated zstd frame")
        content_size = int.from_bytes(data[pos : pos + fcs_size], "little")
        content_size += 256 if fcs_size == 2 else 0  # the 2-byte field is offset by 256
        pos += fcs_size
        if single:
            window = content_size
        if content_size > limit:
            raise ResourceExhausted(f"public context {what} would expand past {limit} bytes")
    block_max = min(window, _ZSTD_BLOCK_MAX)
    total = 0
    while True:
        if pos + 3 > len(data):
            raise InvalidContext(f"public context {what} has a truncated zstd frame")
        head = int.from_bytes(data[pos : pos + 3], "little")
        pos += 3
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 0:  # raw
            total, pos = total + size, pos + size
        elif kind == 1:  # RLE: one byte repeated ``size`` times
            total, pos = total + size, pos + 1
        elif kind == 2 and size <= block_max:  # compressed
            total, pos = total + block_max, pos + size
        else:
            raise InvalidContext(f"public context {what} has a malformed zstd block")
        if total > limit and (content_size is None or content_size > limit):
            raise ResourceExhausted(f"public context {what} would expand past {limit} bytes")
        if last:
            break
    pos += 4 * checksum
    if pos != len(data):
        raise InvalidContext(f"public context {what}: bytes after its zstd frame")
    return total if content_size is None else min(total, content_size)


def _content_bound(section: bytes, limit: int, what: str) -> int:
    """Check a SEAL serialization's header and that its content fits ``limit`` bytes.

    Raises :class:`ResourceExhausted` if the content could expand past
    ``limit``, :class:`InvalidContext` if the header or the compressed
    stream is malformed. Never decompresses more than ``limit`` bytes.
    """
    if len(section) < _SEAL_HEADER.size:
        raise InvalidContext(f"public context {what} is truncated")
    magic, header_size, _, _, compr, _, size = _SEAL_HEADER.unpack_from(section)
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or size != len(section):
        raise InvalidContext(
            f"public context {what} is not a SEAL serialization of its stated size"
        )
    body = memoryview(section)[_SEAL_HEADER.size :]
    if compr == _COMPR_NONE:
        if len(body) > limit:
            raise ResourceExhausted(f"public context {what} is {len(body)} bytes; at most {limit}")
        return len(body)
    if compr == _COMPR_ZSTD:
        return _zstd_content_bound(body, limit, what)
    if compr == _COMPR_ZLIB:
        inflate = zlib.decompressobj()
        try:
            out = len(inflate.decompress(body, limit + 1))
        except zlib.error:
            raise InvalidContext(f"public context {what} has a malformed zlib stream") from None
        if out > limit or inflate.unconsumed_tail:
            raise ResourceExhausted(f"public context {what} would expand past {limit} bytes")
        return out
    raise InvalidContext(f"public context {what} uses an unknown compression ({compr})")


def encode_public_context(
    param_set: ParamSet,
    layout: DiagonalLayout,
    params: bytes,
    relin_keys: bytes,
    galois_keys: bytes,
    public_key: bytes | None,
) -> bytes:
    """The wire form; ``public_key=None`` makes a legacy context (for tests of old keys only)."""
    blobs = {"params": params, "relin_keys": relin_keys, "galois_keys": galois_keys}
    names = LEGACY_SECTIONS if public_key is None else SECTIONS
    if public_key is not None:
        blobs["public_key"] = public_key
    header = {
        "format": "veilface-public-context/1",
        "param_set": param_set.name,
        "dim": layout.dim,
        "presel_dims": layout.m,
        "layout_version": layout.version,
        "sections": [[name, len(blobs[name])] for name in names],
    }
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs[n] for n in names)


def _header_layout(header: dict[str, object]) -> tuple[ParamSet, DiagonalLayout]:
    param_set = get_param_set(str(header["param_set"]))
    layout = DiagonalLayout(
        int(str(header["dim"])),
        param_set.slots,
        int(str(header.get("presel_dims", 0))),
        int(str(header.get("layout_version", LEGACY_LAYOUT_VERSION))),
    )
    return param_set, layout


def _read_header(blob: bytes) -> dict[str, object]:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise InvalidContext("not a veilface public context (bad magic)")
    (hlen,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start : start + hlen])
    except Exception as exc:  # noqa: BLE001 - any malformed header
        raise InvalidContext(f"public context header is invalid: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidContext("public context header is invalid: not an object")
    return header


def read_layout(blob: bytes) -> DiagonalLayout:
    """The bin layout a public context names, from its header only (no key is parsed).

    For a context the store already holds (validated by
    :meth:`PublicContext.from_bytes` when it was registered): what the
    server needs to check slot numbers and counts without loading any key.
    """
    header = _read_header(blob)
    try:
        return _header_layout(header)[1]
    except InvalidContext:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed header field
        raise InvalidContext(f"public context header is invalid: {exc}") from None


def has_public_key(blob: bytes) -> bool:
    """Whether a stored public context carries a public key, from its header only."""
    sections = _read_header(blob).get("sections")
    return isinstance(sections, list) and any(
        isinstance(s, list) and s[:1] == ["public_key"] for s in sections
    )


@dataclass
class PublicContext:
    """A validated public context, ready to evaluate (server side)."""

    param_set: ParamSet
    layout: DiagonalLayout
    context: seal.SEALContext
    relin_keys: seal.RelinKeys
    galois_keys: seal.GaloisKeys
    fingerprint: str
    supports_staging: bool = False
    # None: a context registered before response re-randomization (no score is answered).
    public_key: seal.PublicKey | None = None

    @classmethod
    def from_bytes(cls, blob: bytes, *, max_dim: int | None = None) -> PublicContext:
        """Parse and check a public context; ``max_dim``: the largest template dimension allowed.

        Raises :class:`InvalidContext` for anything malformed, missing or
        extra, :class:`ResourceExhausted` for a context over the limits
        (checked before any key is parsed).
        """
        if len(blob) > MAX_CONTEXT_BYTES:
            raise ResourceExhausted(f"public context larger than {MAX_CONTEXT_BYTES} bytes")
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
            raise InvalidContext("not a veilface public context (bad magic)")
        (hlen,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        if hlen > 4096 or start + hlen > len(blob):
            raise InvalidContext("public context header is truncated")
        try:
            header = json.loads(blob[start : start + hlen])
            sections = [(str(n), int(size)) for n, size in header["sections"]]
            param_set, layout = _header_layout(header)
        except InvalidContext:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed header field is the caller's
            raise InvalidContext(f"public context header is invalid: {exc}") from None
        names = tuple(n for n, _ in sections)
        if names not in (SECTIONS, LEGACY_SECTIONS):
            raise InvalidContext(
                f"public context must carry exactly the sections {list(SECTIONS)}, "
                f"got {list(names)}"
            )
        if max_dim is not None and layout.dim > max_dim:
            raise ResourceExhausted(
                f"template dimension {layout.dim} is over this server's limit of {max_dim}"
            )
        n_keys = len(layout.key_steps)
        limits = {
            "params": MAX_PARAMS_BYTES,
            "relin_keys": keys_section_bound(param_set, 1),
            "galois_keys": keys_section_bound(param_set, n_keys),
            "public_key": public_key_bound(param_set),
        }
        for name, size in sections:
            # A compressed stream is at most a little larger than its content.
            if size > limits[name] + limits[name] // 64 + 4096:
                raise ResourceExhausted(
                    f"public context section {name!r} is {size} bytes; the keys this layout "
                    f"needs take at most {limits[name]}"
                )
        offset = start + hlen
        parts: dict[str, bytes] = {}
        for name, size in sections:
            if size <= 0 or offset + size > len(blob):
                raise InvalidContext(f"public context section {name!r} is truncated")
            parts[name] = blob[offset : offset + size]
            offset += size
        if offset != len(blob):
            raise InvalidContext("trailing bytes after the public context sections")
        for name in names:  # before SEAL inflates anything
            _content_bound(parts[name], limits[name], name.replace("_", " "))

        try:
            parms = seal_io.load_parameters(parts["params"])
        except Exception:  # noqa: BLE001 - SEAL's loaders raise arbitrary types on bad input
            raise InvalidContext("public context parameters are malformed") from None
        expected = param_set.seal_parameters()
        if (
            parms.poly_modulus_degree() != expected.poly_modulus_degree()
            or [m.value() for m in parms.coeff_modulus()]
            != [m.value() for m in expected.coeff_modulus()]
        ):
            raise InvalidContext(f"parameters do not match the parameter set {param_set.name!r}")
        context = param_set.seal_context()
        try:
            relin = seal_io.load_relin_keys(context, parts["relin_keys"])
            galois = seal_io.load_galois_keys(context, parts["galois_keys"])
            public_key = (
                seal_io.load_public_key(context, parts["public_key"]) if "public_key" in parts else None
            )
        except Exception:  # noqa: BLE001 - SEAL's loaders raise arbitrary types on bad input
            raise InvalidContext("public context keys are malformed or not for these parameters") from None
        if relin.size() != 1:
            raise InvalidContext(
                f"public context carries {relin.size()} relinearization keys; exactly 1"
            )
        tool = context.key_context_data().galois_tool()
        for step in layout.galois_steps:
            if not galois.has_key(tool.get_elt_from_step(step)):
                raise InvalidContext(f"public context lacks the Galois key for rotation {step}")
        # Contexts made before staged enrollment existed lack its rotations:
        # they still serve bins, and single enrollments go straight to bins.
        staging = all(galois.has_key(tool.get_elt_from_step(s)) for s in layout.staged_steps)
        steps = layout.key_steps if staging else layout.galois_steps
        needed = {tool.get_elt_from_step(s) for s in steps}
        if galois.size() != len(needed):
            uses = "its rotations and staged scoring" if staging else "its rotations"
            raise InvalidContext(
                f"public context carries {galois.size()} Galois keys; this layout uses "
                f"exactly {len(needed)} ({uses}), no others"
            )
        if public_key is not None:
            _check_public_key(context, public_key)
        fingerprint = hashlib.sha256(blob).hexdigest()[:32]
        return cls(param_set, layout, context, relin, galois, fingerprint, staging, public_key)


def _check_public_key(context: seal.SEALContext, public_key: seal.PublicKey) -> None:
    """A public key must be one two-polynomial key at the key level, in NTT form.

    SEAL's load has checked that its coefficients are reduced and its
    parameters id belongs to the context; what it lets through is a key at
    another level or of another size, which the encryptor would misuse.
    """
    data = public_key.data()
    if (
        public_key.parms_id() != context.key_parms_id()
        or data.size() != 2
        or not data.is_ntt_form()
        or data.coeff_modulus_size() != len(context.key_context_data().parms().coeff_modulus())
    ):
        raise InvalidContext(
            "public context's public key is not one key at the key level of these parameters"
        )
