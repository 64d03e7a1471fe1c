"""Generators of ``veilface bench chaos`` that apply to every RPC, from the descriptors.

Requests are built by field name (``tenant_id``, ``key_id``, ``handle``...)
from the message descriptors, so an RPC added to the services later is
fuzzed without a change here: missing, garbage, foreign, admin, revoked and
query-only tokens; bytes that are not a message at all; random bytes; and
random field values (extreme integers, long and odd strings, huge repeated
counts, corrupted ciphertexts) on the attacker's own tenant.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor as _desc
from google.protobuf.message import Message

from veilface.bench.chaos_fuzz import (
    FAILING_CORRUPTIONS,
    LOADABLE_CORRUPTIONS,
    Call,
    Case,
    Expect,
    Gen,
    Rng,
    Rpc,
    Setup,
    bearer,
    corrupt,
    message_class,
    pick,
)
from veilface.bench.chaos_world import TENANT_A, TENANT_B, TENANT_X, World
from veilface.proto.v1 import veilface_pb2 as pb

FD = _desc.FieldDescriptor


# -- baseline requests, from the descriptors -------------------------------------------


def baseline(w: World, rpc: Rpc, key: str = "x.k1") -> Message:
    """A plausible request of ``rpc`` for one key's tenant, fields filled by their names.

    Good enough to pass authentication and reach the handler; the
    generators then break what they test.
    """
    ks = w.key(key)
    values: dict[str, Any] = {
        "tenant_id": ks.tenant_id,
        "key_id": ks.key_id,
        "handle": ks.handles[0],
        "handles": [ks.handles[0]],
        "photo_id": w.samples.photo_ids.get(ks.tenant_id, "p"),
        "probe_ciphertexts": list(w.samples.probes[key]),
        "center_ciphertexts": list(w.samples.probes[key]),
        "bin_id": ks.bins[0][0] if ks.bins else 1,
        "name": "chaos",
        "count": 1,
    }
    msg = message_class(rpc.input)()
    for f in rpc.input.fields:
        if f.name in values:
            try:
                value = values[f.name]
                if f.is_repeated:
                    getattr(msg, f.name).extend(value if isinstance(value, list) else [value])
                else:
                    setattr(msg, f.name, value)
            except (TypeError, ValueError, AttributeError):
                continue
        elif f.name == "mode" and f.enum_type is not None:
            setattr(msg, f.name, pb.SEARCH_MODE_STRICT)
        elif f.name == "scopes" and f.enum_type is not None:
            getattr(msg, f.name).append(1)
    return msg


def tenant_of(msg: Message) -> str | None:
    d = msg.DESCRIPTOR
    return str(msg.tenant_id) if "tenant_id" in d.fields_by_name else None


# -- random field values -------------------------------------------------------------

_STRINGS = (
    "", " ", "\x00", "../../etc/passwd", "é" * 300, "%s%s%n", "' OR 1=1 --", "k1", "chaos",
    TENANT_A, TENANT_B, "A" * 65, "A" * 513, "A" * 4096, "A" * 100_000,
)
_U64 = (0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1)
_U32 = (0, 1, 2**31, 2**32 - 1)
_I64 = (0, -1, -(2**63), 2**63 - 1)
_I32 = (0, -1, -(2**31), 2**31 - 1)
_DOUBLES = (float("nan"), float("inf"), float("-inf"), 1e308, -0.0)
_COUNTS = (0, 1, 2, 16, 300, 5000)


def _scalar(r: Rng, f: _desc.FieldDescriptor, w: World) -> Any:
    t = f.type
    if t == FD.TYPE_STRING:
        return pick(r, _STRINGS)
    if t == FD.TYPE_BYTES:
        valid = w.samples.probes["x.k1"][0]
        kind = pick(r, (*FAILING_CORRUPTIONS, *LOADABLE_CORRUPTIONS, "valid", "zeros"))
        if kind == "valid":
            return valid
        if kind == "zeros":
            return b"\0" * int(pick(r, (1, 1024, 1 << 20)))
        return corrupt(r, valid, kind)
    if t == FD.TYPE_BOOL:
        return bool(r.integers(2))
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return pick(r, _DOUBLES)
    if t == FD.TYPE_ENUM:
        return int(pick(r, (0, 1, 2, 3, 99, 2**31 - 1, -1)))
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return int(pick(r, _U64))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return int(pick(r, _U32))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return int(pick(r, _I64))
    return int(pick(r, _I32))


def mutate(r: Rng, msg: Message, w: World, *, depth: int = 0) -> list[str]:
    """Overwrite 1-3 fields of ``msg`` (recursively into messages) with hostile values.

    Returns the (dotted) names of the fields overwritten.
    """
    fields = list(msg.DESCRIPTOR.fields)
    names: list[str] = []
    if not fields:
        return names
    for _ in range(int(r.integers(1, 4))):
        f = pick(r, fields)
        names.append(f.name)
        if f.type == FD.TYPE_MESSAGE:
            if depth >= 2:
                continue
            if f.is_repeated:
                rep = getattr(msg, f.name)
                del rep[:]
                for _ in range(int(pick(r, _COUNTS[:5]))):
                    names += [f"{f.name}.{n}" for n in mutate(r, rep.add(), w, depth=depth + 1)]
            else:
                names += [f"{f.name}.{n}" for n in mutate(r, getattr(msg, f.name), w, depth=depth + 1)]
            continue
        if f.is_repeated:
            rep = getattr(msg, f.name)
            del rep[:]
            n = int(pick(r, _COUNTS))
            if f.type == FD.TYPE_BYTES:
                n = min(n, 300)
            one = _scalar(r, f, w)
            if f.type == FD.TYPE_STRING and n * len(one) > 8_000_000:
                n = 8_000_000 // max(1, len(one))
            rep.extend([one] * n if r.integers(2) else [_scalar(r, f, w) for _ in range(min(n, 300))])
        else:
            setattr(msg, f.name, _scalar(r, f, w))
    return names


# -- generic generators: every method -------------------------------------------------


def _send(rpc: Rpc, msgs: list[Message] | Message) -> bytes | list[bytes]:
    if rpc.streaming:
        seq = msgs if isinstance(msgs, list) else [msgs]
        return [m.SerializeToString() for m in seq]
    one = msgs[0] if isinstance(msgs, list) else msgs
    return bytes(one.SerializeToString())


def g_no_token(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    return Case("no_token", [Call(rpc.path, _send(rpc, baseline(w, rpc, "a.k1")), None, Expect.FAIL)])


def g_bad_token(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    real = w.tokens[TENANT_A]
    auth = pick(
        r,
        (
            "Bearer ", "Bearer vf_" + r.bytes(32).hex(), "Basic " + real, "Bearer  ",
            "Bearer vfadmin_" + r.bytes(24).hex(), real, "Bearer " + real[:-1],
            "Bearer " + real + "x", "Bearer " + "A" * 6000,
        ),
    )
    note = auth.split(" ", 1)[0] + f" ({len(auth)} chars)"
    return Case("bad_token", [Call(rpc.path, _send(rpc, baseline(w, rpc, "a.k1")), auth, Expect.FAIL, note=note)])


def g_foreign_token(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """A request naming tenant A (or B) with another tenant's token."""
    victim, thief = pick(r, (("a.k1", TENANT_B), ("a.k1", TENANT_X), ("b.k1", TENANT_A), ("b.k1", TENANT_X)))
    msg = baseline(w, rpc, victim)
    expect = Expect.FAIL if tenant_of(msg) is not None or rpc.name == "CreateTenant" else Expect.ANY
    call = Call(rpc.path, _send(rpc, msg), bearer(w.tokens[thief]), expect, note=f"{victim} by {thief}")
    return Case("foreign_token", [call])


ADMIN_MAY = frozenset({"Tokens"})


def g_admin_token(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """The operator's token on tenant data: refused except where the admin is meant to act."""
    msg = baseline(w, rpc, "a.k1")
    expect = Expect.ANY if rpc.service in ADMIN_MAY else Expect.FAIL
    return Case("admin_token", [Call(rpc.path, _send(rpc, msg), bearer(w.admin_token), expect)])


def g_revoked_token(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """A token revoked at set-up: refused from the next call on, for every method."""
    token = w.revoked_token or "vf_revoked-" + r.bytes(16).hex()
    return Case("revoked_token", [Call(rpc.path, _send(rpc, baseline(w, rpc)), bearer(token), Expect.FAIL)])


# A query-scope token may identify, verify and describe its tenant, nothing else.
QUERY_MAY = frozenset({"Identification"})
QUERY_MAY_METHODS = frozenset({"DescribeTenant"})


def g_query_scope(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """The attacker's query-only (kiosk) token on every method."""
    token = w.query_token or w.tokens[TENANT_X]
    may = w.query_token is None or rpc.service in QUERY_MAY or rpc.name in QUERY_MAY_METHODS
    expect = Expect.ANY if may else Expect.FAIL
    return Case("query_scope", [Call(rpc.path, _send(rpc, baseline(w, rpc)), bearer(token), expect)])


def _first_string_field(d: _desc.Descriptor) -> int | None:
    for f in d.fields:
        if f.type == FD.TYPE_STRING:
            return int(f.number)
    return None


def malformed_bytes(r: Rng, d: _desc.Descriptor) -> tuple[str, bytes]:
    """Bytes that no protobuf parser may accept as a message of type ``d``, and their kind."""
    kinds = ["truncated_len", "field_zero", "overlong_varint", "end_group"]
    sf = _first_string_field(d)
    if sf is not None:
        kinds.append("bad_utf8")
    kind = pick(r, kinds)
    if kind == "truncated_len":
        return kind, b"\x0a\x64" + r.bytes(int(r.integers(0, 50)))
    if kind == "field_zero":
        return kind, b"\x00\x01"
    if kind == "overlong_varint":
        return kind, b"\x08" + b"\xff" * 11
    if kind == "end_group":
        return kind, b"\x0c"
    assert sf is not None
    tag = bytes([(sf << 3) | 2]) if sf < 16 else b"\x0a"
    return kind, tag + b"\x03\xff\xfe\xfd"


def g_malformed(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """Not a message at all; in a stream, as the first or a later message."""
    kind, bad = malformed_bytes(r, rpc.input)
    payload: bytes | list[bytes]
    if rpc.streaming:
        first = baseline(w, rpc).SerializeToString()
        later = bool(r.integers(2))
        payload = [first, bad] if later else [bad]
        kind += " (second message)" if later else " (first message)"
    else:
        payload = bad
    return Case("malformed", [Call(rpc.path, payload, bearer(w.tokens[TENANT_X]), Expect.FAIL, note=kind)])


def g_random_bytes(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """Random bytes: may happen to parse (as unknown fields), so either outcome is fine."""
    blob = r.bytes(int(pick(r, (1, 7, 64, 4096))))
    payload: bytes | list[bytes] = [blob] if rpc.streaming else blob
    return Case("random_bytes", [Call(rpc.path, payload, bearer(w.tokens[TENANT_X]), Expect.ANY)])


def g_mutate(r: Rng, w: World, rpc: Rpc, s: Setup) -> Case:
    """Random field values on the attacker's own tenant; a foreign tenant id must fail."""
    msgs = [baseline(w, rpc, pick(r, ("x.k1", "x.k2")))]
    if rpc.streaming:
        msgs += [baseline(w, rpc) for _ in range(int(r.integers(0, 3)))]
    changed = sorted({n for m in msgs for n in mutate(r, m, w)})
    tenants = {tenant_of(m) for m in msgs}
    foreign = any(t is not None and t != TENANT_X for t in tenants) or rpc.name == "CreateTenant"
    expect = Expect.FAIL if foreign else Expect.ANY
    return Case("mutate", [Call(rpc.path, _send(rpc, msgs), bearer(w.tokens[TENANT_X]), expect,
                                note=",".join(changed[:6]))])


GENERIC: dict[str, tuple[Gen, float]] = {
    "no_token": (g_no_token, 1.0),
    "bad_token": (g_bad_token, 1.0),
    "foreign_token": (g_foreign_token, 1.5),
    "admin_token": (g_admin_token, 0.5),
    "revoked_token": (g_revoked_token, 0.5),
    "query_scope": (g_query_scope, 0.7),
    "malformed": (g_malformed, 1.0),
    "random_bytes": (g_random_bytes, 0.5),
    "mutate": (g_mutate, 3.0),
}

