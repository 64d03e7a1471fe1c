"""The public key a key registers: checked at RegisterKey; keys registered without one.

A key registered before response re-randomization (a context without a
public key) is served for everything but scores: every score RPC answers
FAILED_PRECONDITION, naming the fix, until the tenant registers the same
key again, which adds the public key to it (bins and subjects kept).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.server.conftest import create_tenant, make_client
from veilface.client.sdk import VeilClient
from veilface.client.tenant_state import TenantState
from veilface.crypto import seal_io
from veilface.crypto.keys import TenantKeys
from veilface.crypto.public_context import MAGIC, encode_public_context, has_public_key
from veilface.errors import AlreadyExists, FailedPrecondition, VeilfaceError
from veilface.proto.v1 import veilface_pb2 as pb
from veilface.server.launcher import LocalServer


def _sections(blob: bytes) -> dict[str, bytes]:
    (hlen,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    off = len(MAGIC) + 4 + hlen
    out = {}
    for name, size in json.loads(blob[len(MAGIC) + 4 : off])["sections"]:
        out[name], off = blob[off : off + size], off + size
    return out


def _context_with_public_key(keys: TenantKeys, public_key: bytes) -> bytes:
    parts = _sections(keys.public_context_bytes())
    return encode_public_context(
        keys.param_set,
        keys.layout,
        parts["params"],
        parts["relin_keys"],
        parts["galois_keys"],
        public_key,
    )


def _register(client: VeilClient, context: bytes) -> pb.RegisterKeyResponse:
    return client.transport.call(
        client.transport.tenants.RegisterKey,
        pb.RegisterKeyRequest(
            tenant_id=client.state.tenant_id, key_id=client.state.key_id, public_context=context
        ),
    )


def test_new_contexts_carry_a_public_key() -> None:
    assert has_public_key(TenantKeys.generate(128).public_context_bytes())


@pytest.mark.parametrize("kind", ["garbage", "relin_keys_as_public_key", "truncated", "oversized"])
def test_malformed_public_key_refused_at_registration(server: LocalServer, kind: str) -> None:
    client = make_client(server, f"badpk-{kind.replace('_', '-')}")
    keys = client.state.keys()
    parts = _sections(keys.public_context_bytes())
    public_key = {
        "garbage": parts["public_key"][:16] + bytes(len(parts["public_key"]) - 16),
        "relin_keys_as_public_key": parts["relin_keys"],
        "truncated": parts["public_key"][: len(parts["public_key"]) // 2],
        "oversized": parts["public_key"] * 3,
    }[kind]
    with pytest.raises(VeilfaceError) as err:
        _register(client, _context_with_public_key(keys, public_key))
    # An oversized section is RESOURCE_EXHAUSTED, as for the other key sections.
    assert err.value.status == ("RESOURCE_EXHAUSTED" if kind == "oversized" else "INVALID_ARGUMENT")
    client.close()


def test_a_key_without_public_key_answers_no_score_until_registered_again(
    server: LocalServer, faces: tuple[np.ndarray, list[str], np.ndarray]
) -> None:
    gallery, names, probes = faces
    token = create_tenant(server, "oldkey")
    state = TenantState.new("oldkey", dim=128)
    client = VeilClient(server.target, state, token=token)
    try:
        resp = _register(client, state.keys().public_context_bytes(with_public_key=False))
        assert resp.key.key_id == state.key_id
        for i in range(4):  # enrollment still works for the old key
            client.enroll(names[i], gallery[i], fold="now")
        with pytest.raises(FailedPrecondition, match="register the key again"):
            client.identify(probes[1], mode="strict")
        with pytest.raises(FailedPrecondition, match="public key"):
            client.verify(names[2], probes[2])
        # The fix the message names: registering the key again adds the public key.
        client.register_key()
        r = client.identify(probes[1], mode="strict")
        assert r.subject_id == names[1]
        assert client.verify(names[2], probes[2]).score > 0.5
        # Once it has one, the key cannot be replaced by another context.
        with pytest.raises(AlreadyExists):
            _register(client, state.keys().public_context_bytes())
        with pytest.raises(AlreadyExists):  # nor go back to one without
            _register(client, state.keys().public_context_bytes(with_public_key=False))
    finally:
        client.close()


def test_public_key_section_is_a_seal_public_key() -> None:
    keys = TenantKeys.generate(128)
    pk = seal_io.load_public_key(keys.context, _sections(keys.public_context_bytes())["public_key"])
    assert pk.parms_id() == keys.context.key_parms_id()


def test_adding_the_public_key_needs_the_tenants_own_manage_token(server: LocalServer) -> None:
    """The upgrade path is RegisterKey: a query or enroll token, or another tenant, cannot use it."""
    from veilface.client.admin import AdminClient
    from veilface.errors import PermissionDenied

    token = create_tenant(server, "oldkey-scopes")
    other = create_tenant(server, "oldkey-other")
    state = TenantState.new("oldkey-scopes", dim=128)
    owner = VeilClient(server.target, state, token=token)
    with AdminClient(server.target, token=token) as mgr:
        narrow = {s: mgr.create_token("oldkey-scopes", name=s, scopes=[s]).api_token for s in ("query", "enroll")}
    clients = [VeilClient(server.target, state, token=t) for t in (*narrow.values(), other)]
    try:
        _register(owner, state.keys().public_context_bytes(with_public_key=False))
        for c in clients:
            with pytest.raises(VeilfaceError) as err:
                _register(c, state.keys().public_context_bytes())
            assert isinstance(err.value, PermissionDenied), err.value.status
        # still the old key: scores refused until the owner's manage token adds the public key
        owner.register_key()
    finally:
        for c in (owner, *clients):
            c.close()
