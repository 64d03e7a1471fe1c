"""Several server addresses: one channel balanced round-robin (client/targets.py)."""

from __future__ import annotations

import pytest

from veilface.client.targets import channel_target
from veilface.client.transport import ChannelMode, Transport
from veilface.errors import InvalidArgument

LB = ("grpc.lb_policy_name", "round_robin")


def test_one_address_is_left_as_it_is() -> None:
    for t in ("127.0.0.1:5001", "localhost:5", "dns:///db.example:1", "unix:/tmp/s", ["h:1"]):
        got = channel_target(t)
        assert got.options == ()
        assert got.target == (t[0] if isinstance(t, list) else t)


def test_a_list_becomes_an_ipv4_target_balanced_round_robin() -> None:
    for t in ("127.0.0.1:5001,127.0.0.1:5002", ["127.0.0.1:5001", "127.0.0.1:5002"]):
        got = channel_target(t)
        assert got.target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
        assert got.options == (LB,)
    assert channel_target(["[::1]:5", "[::1]:6"]).target == "ipv6:[::1]:5,[::1]:6"
    assert channel_target("ipv4:127.0.0.1:1,127.0.0.1:2").options == (LB,)


def test_names_are_resolved_and_tls_checks_the_first_name() -> None:
    got = channel_target(["localhost:7001", "localhost:7002"])
    assert got.target == "ipv4:127.0.0.1:7001,127.0.0.1:7002"
    assert dict(got.options)["grpc.default_authority"] == "localhost:7001"


def test_bad_lists_are_refused() -> None:
    for bad in ([], ["127.0.0.1", "127.0.0.1:2"], ["127.0.0.1:1", "[::1]:2"], "127.0.0.1:1,nohost.invalid:2"):
        with pytest.raises(InvalidArgument):
            channel_target(bad)


def test_a_loopback_list_is_plaintext_another_is_tls() -> None:
    t = Transport(["127.0.0.1:7001", "127.0.0.1:7002"], token="x")
    try:
        assert t.security.mode is ChannelMode.PLAINTEXT and t.target.startswith("ipv4:")
    finally:
        t.close()
    t = Transport("127.0.0.1:7001,192.0.2.10:7002", token="x")
    try:
        assert t.security.mode is ChannelMode.TLS_SYSTEM_ROOTS  # one address leaves the machine
    finally:
        t.close()
