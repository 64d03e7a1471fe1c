"""Memory bombs and killed clients of ``veilface bench chaos`` (issue 10, item 1).

The bombs are requests a careless or hostile tenant can send with its own
valid token and that cost the server far more memory than their size on
the wire: probes of random bytes near the message limit (cached unparsed
when no bin matches), a public context stuffed with thousands of all-zero
Galois keys (about 2.6 MB compressed, 512 MiB once loaded, in every worker
that loads it), enrollment streams of huge blobs, a bulk stream of many
valid bins cut before its end. Each must be refused (or, for the stream,
leave nothing) without the server's memory growing for good.

A stuffed context is built here without any SEAL call: the SEAL
serialization of a ``GaloisKeys`` object is written directly (uncompressed
members, then zlib), with the parameters id of the tenant's context and the
SEAL version of the tenant's own serialized keys.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from veilface.bench.chaos_world import KeySet

log = logging.getLogger(__name__)

_CTX_MAGIC = b"VFPC1\n"
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB = 0, 1


# -- public contexts ------------------------------------------------------------------


@dataclass(frozen=True)
class ContextParts:
    """A veilface public context split into its JSON header and sections."""

    header: dict[str, object]
    sections: dict[str, bytes]

    @classmethod
    def parse(cls, blob: bytes) -> ContextParts:
        if not blob.startswith(_CTX_MAGIC):
            raise ValueError("not a veilface public context")
        start = len(_CTX_MAGIC) + 4
        (hlen,) = struct.unpack(">I", blob[len(_CTX_MAGIC) : start])
        header = json.loads(blob[start : start + hlen])
        offset, sections = start + hlen, {}
        for name, size in header["sections"]:
            sections[str(name)] = blob[offset : offset + int(size)]
            offset += int(size)
        return cls(header, sections)

    def encode(self, *, header: dict[str, object] | None = None) -> bytes:
        """Re-encode, with the section sizes recomputed unless ``header`` is given as is."""
        if header is None:
            header = dict(self.header)
            header["sections"] = [[n, len(b)] for n, b in self.sections.items()]
        head = json.dumps(header, sort_keys=True).encode()
        return _CTX_MAGIC + struct.pack(">I", len(head)) + head + b"".join(self.sections.values())

    def with_section(self, name: str, blob: bytes) -> ContextParts:
        return ContextParts(self.header, {**self.sections, name: blob})


def galois_element(step: int, poly_degree: int) -> int:
    """SEAL's Galois element of a left rotation by ``step`` slots (CKKS): ``3^step mod 2N``."""
    if step == 0:
        return 2 * poly_degree - 1
    if step < 0:
        step += poly_degree // 2
    return pow(3, step, 2 * poly_degree)


def _seal_header(version: bytes, compr: int, size: int) -> bytes:
    return struct.pack("<HB", _SEAL_MAGIC, 16) + version + struct.pack("<BHQ", compr, 0, size)


def zero_galois_keys(
    *,
    parms_id: Sequence[int],
    version: bytes,
    poly_degree: int,
    coeff_moduli: int,
    elements: Iterable[int],
) -> bytes:
    """A serialized SEAL ``GaloisKeys`` with an all-zero key for each Galois element.

    Zero polynomials are reduced modulo every prime, so SEAL's validity
    check passes; each key is ``2 * coeff_moduli * poly_degree`` words in
    memory (128 KiB at N = 4096), and compresses to almost nothing.
    """
    wanted = {(int(e) - 1) >> 1 for e in elements}
    pid = struct.pack("<4Q", *[int(p) for p in parms_id])
    words = 2 * poly_degree * coeff_moduli
    dyn = struct.pack("<Q", words) + b"\0" * (8 * words)
    dyn = _seal_header(version, _COMPR_NONE, 16 + len(dyn)) + dyn
    ct = pid + b"\x01" + struct.pack("<QQQdQ", 2, poly_degree, coeff_moduli, 1.0, 1) + dyn
    key = struct.pack("<Q", 1) + _seal_header(version, _COMPR_NONE, 16 + len(ct)) + ct
    comp = zlib.compressobj(6)
    parts = [comp.compress(pid + struct.pack("<Q", poly_degree))]
    for index in range(poly_degree):
        parts.append(comp.compress(key if index in wanted else struct.pack("<Q", 0)))
    parts.append(comp.flush())
    body = b"".join(parts)
    return _seal_header(version, _COMPR_ZLIB, 16 + len(body)) + body


def crafted_context(ks: KeySet, context: bytes, *, steps: Iterable[int] = (), elements: Iterable[int] = ()) -> bytes:
    """``context`` (of key ``ks``) with its Galois keys replaced by zero keys.

    One key per rotation in ``steps`` and per raw Galois element in ``elements``.
    """
    keys = ks.state.keys()
    parts = ContextParts.parse(context)
    n = keys.param_set.poly_modulus_degree
    galois = zero_galois_keys(
        parms_id=keys.context.key_parms_id(),
        version=parts.sections["galois_keys"][3:5],
        poly_degree=n,
        coeff_moduli=len(keys.param_set.coeff_modulus_bits),
        elements=[galois_element(s, n) for s in steps] + list(elements),
    )
    return parts.with_section("galois_keys", galois).encode()


def stuffed_context(ks: KeySet, context: bytes, *, keys: int = 4096) -> bytes:
    """A context with the needed rotations among ``keys`` Galois keys in all (the item-1 bomb).

    At N = 4096 there are 4,096 Galois elements (the odd residues mod 2N).
    """
    n = ks.state.keys().param_set.poly_modulus_degree
    needed = {galois_element(s, n) for s in ks.state.keys().layout.key_steps}
    others = [e for e in range(1, 2 * n, 2) if e not in needed]
    return crafted_context(ks, context, elements=sorted(needed) + others[: max(0, keys - len(needed))])


# -- killed clients -----------------------------------------------------------------

_CHILD = r"""
import os, struct, sys, threading, grpc
target, method, path = sys.argv[1:4]
data = open(path, "rb").read()
msgs, i = [], 0
while i < len(data):
    (n,) = struct.unpack(">I", data[i:i + 4]); msgs.append(data[i + 4:i + 4 + n]); i += 4 + n
def gen():
    yield msgs[0]
    print("sent", flush=True)
    threading.Event().wait(3600)  # the parent kills us here
    yield from msgs[1:]
ch = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)])
md = (("authorization", "Bearer " + os.environ["VEILFACE_CHAOS_TOKEN"]),)
try:
    ch.stream_unary(method)(gen(), metadata=md, timeout=3600)
except grpc.RpcError as e:
    print("status", e.code().name, flush=True)
"""


@dataclass(frozen=True)
class KilledClient:
    reached_server: bool  # the child said it handed over its first message
    elapsed_s: float


def run_killed_client(
    target: str, method: str, token: str, messages: Sequence[bytes], rng: np.random.Generator
) -> KilledClient:
    """A child process starts a client stream, sends the first message and is SIGKILLed.

    The kill lands 20-400 ms (drawn from ``rng``) after the child handed
    the first message to gRPC; the rest of the stream never leaves.
    """
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile(prefix="veilface-chaos-", delete=False) as fh:
        for m in messages:
            fh.write(struct.pack(">I", len(m)) + m)
        path = fh.name
    env = {**os.environ, "VEILFACE_CHAOS_TOKEN": token}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, target, method, path],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    reached = False
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("sent"):
                reached = True
                break
        time.sleep(float(rng.uniform(0.02, 0.4)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        Path(path).unlink(missing_ok=True)
    return KilledClient(reached, time.perf_counter() - t0)
