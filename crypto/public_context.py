"""The public evaluation context a tenant registers with the server.

Wire format (all integers big-endian)::

    b"VFPC1\\n" | u32 header_len | header JSON | sections

The header names the parameter set, template dimension, layout and the
sections with their lengths. Exactly three section kinds exist:
``params``, ``relin_keys`` and ``galois_keys``. There is no field a secret
key could travel in, and :meth:`PublicContext.from_bytes` rejects any other
section, any mismatch with the named parameter set and any missing Galois
key: a server that loads a context can evaluate but never decrypt.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import tenseal.sealapi as seal

from veilface.crypto import seal_io
from veilface.crypto.layout import DiagonalLayout
from veilface.crypto.params import ParamSet, get_param_set
from veilface.errors import InvalidContext

MAGIC = b"VFPC1\n"
SECTIONS = ("params", "relin_keys", "galois_keys")
MAX_CONTEXT_BYTES = 64 * 1024 * 1024


def encode_public_context(
    param_set: ParamSet,
    layout: DiagonalLayout,
    params: bytes,
    relin_keys: bytes,
    galois_keys: bytes,
) -> bytes:
    blobs = {"params": params, "relin_keys": relin_keys, "galois_keys": galois_keys}
    header = {
        "format": "veilface-public-context/1",
        "param_set": param_set.name,
        "dim": layout.dim,
        "presel_dims": layout.m,
        "sections": [[name, len(blobs[name])] for name in SECTIONS],
    }
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs[n] for n in SECTIONS)


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

    @classmethod
    def from_bytes(cls, blob: bytes) -> PublicContext:
        if len(blob) > MAX_CONTEXT_BYTES:
            raise InvalidContext(f"public context larger than {MAX_CONTEXT_BYTES} bytes")
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
            raise InvalidContext("not a veilface public context (bad magic)")
        (hlen,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        if hlen > 4096 or start + hlen > len(blob):
            raise InvalidContext("public context header is truncated")
        try:
            header = json.loads(blob[start : start + hlen])
            sections = [(str(n), int(size)) for n, size in header["sections"]]
            param_set = get_param_set(str(header["param_set"]))
            layout = DiagonalLayout(
                int(header["dim"]), param_set.slots, int(header.get("presel_dims", 0))
            )
        except InvalidContext:
            raise
        except Exception as exc:
            raise InvalidContext(f"public context header is invalid: {exc}") from None
        if [n for n, _ in sections] != list(SECTIONS):
            raise InvalidContext(
                f"public context must carry exactly the sections {list(SECTIONS)}, "
                f"got {[n for n, _ in sections]}"
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

        try:
            parms = seal_io.load_parameters(parts["params"])
        except Exception:
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
        except Exception:
            raise InvalidContext("public context keys are malformed or not for these parameters") from None
        tool = context.key_context_data().galois_tool()
        for step in layout.galois_steps:
            if not galois.has_key(tool.get_elt_from_step(step)):
                raise InvalidContext(f"public context lacks the Galois key for rotation {step}")
        # Contexts made before staged enrollment existed lack its rotations:
        # they still serve bins, and single enrollments go straight to bins.
        staging = all(galois.has_key(tool.get_elt_from_step(s)) for s in layout.staged_steps)
        fingerprint = hashlib.sha256(blob).hexdigest()[:32]
        return cls(param_set, layout, context, relin, galois, fingerprint, staging)
