"""The client's channel choice (never silent plaintext off the machine) and its status map."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest

from veilface import errors
from veilface.client import transport
from veilface.client.transport import (
    ChannelMode,
    RemoteError,
    Transport,
    choose_channel_security,
    error_from_rpc,
    is_loopback_target,
    status_map,
)
from veilface.server.errors_map import status_of

# -- channel choice ---------------------------------------------------------------

LOOPBACK = [
    "127.0.0.1:50051",
    "127.8.9.10:1",
    "localhost:50051",
    "localhost",
    "[::1]:50051",
    "dns:///localhost:50051",
    "dns://8.8.8.8/127.0.0.1:50051",
    "ipv4:127.0.0.1:1,127.0.0.2:2",
    "ipv6:[::1]:1",
    "unix:/tmp/veilface.sock",
]
REMOTE = [
    "203.0.113.7:50051",
    "10.0.0.5:443",
    "[2001:db8::1]:50051",
    "0.0.0.0:50051",
    "dns:///203.0.113.7:50051",
    "ipv4:127.0.0.1:1,203.0.113.7:2",  # one remote address is enough
    "xds:///veilface",
]


@pytest.mark.parametrize("target", LOOPBACK)
def test_loopback_targets(target: str) -> None:
    assert is_loopback_target(target)
    assert choose_channel_security(target).mode is ChannelMode.PLAINTEXT


@pytest.mark.parametrize("target", REMOTE)
def test_remote_target_without_root_cert_gets_tls_with_system_roots(target: str) -> None:
    assert not is_loopback_target(target)
    sec = choose_channel_security(target)
    assert sec.mode is ChannelMode.TLS_SYSTEM_ROOTS and sec.root_cert is None


def test_names_resolve_and_unresolvable_names_are_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: dict[str, list[str]] = {
        "kiosk.lan": ["127.0.1.1"],
        "mixed.lan": ["127.0.0.1", "192.0.2.4"],
    }

    def fake_getaddrinfo(host: str, *a: Any, **k: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert is_loopback_target("kiosk.lan:1")
    assert not is_loopback_target("mixed.lan:1")
    assert not is_loopback_target("nowhere.invalid:1")
    assert choose_channel_security("nowhere.invalid:1").mode is ChannelMode.TLS_SYSTEM_ROOTS


def test_root_cert_wins_everywhere(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    for target in ("127.0.0.1:1", "203.0.113.7:1"):
        sec = choose_channel_security(target, root_cert=ca, insecure=True)
        assert sec.mode is ChannelMode.TLS_ROOT_CERT and sec.root_cert == ca


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """Record which grpc channel constructors a Transport calls."""
    rec = _Recorder()
    real_secure, real_insecure, real_creds = (
        grpc.secure_channel, grpc.insecure_channel, grpc.ssl_channel_credentials
    )

    def insecure(target: str, *a: Any, **k: Any) -> grpc.Channel:
        rec.calls.append(("insecure_channel", target))
        return real_insecure(target, *a, **k)

    def secure(target: str, *a: Any, **k: Any) -> grpc.Channel:
        rec.calls.append(("secure_channel", target))
        return real_secure(target, *a, **k)

    def creds(*a: Any, **k: Any) -> grpc.ChannelCredentials:
        rec.calls.append(("ssl_channel_credentials", k.get("root_certificates")))
        return real_creds(*a, **k)

    monkeypatch.setattr(grpc, "insecure_channel", insecure)
    monkeypatch.setattr(grpc, "secure_channel", secure)
    monkeypatch.setattr(grpc, "ssl_channel_credentials", creds)
    return rec


def test_transport_never_opens_plaintext_to_a_remote_target(channels: _Recorder) -> None:
    tr = Transport("203.0.113.7:50051", token="t")  # channels connect lazily: no traffic
    tr.close()
    assert ("insecure_channel", "203.0.113.7:50051") not in channels.calls
    assert channels.calls == [
        ("ssl_channel_credentials", None),  # the system roots
        ("secure_channel", "203.0.113.7:50051"),
    ]


def test_insecure_allows_plaintext_to_a_remote_target_with_a_warning(
    channels: _Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=transport.__name__):
        tr = Transport("203.0.113.7:50051", token="t", insecure=True)
        tr.close()
    assert channels.calls == [("insecure_channel", "203.0.113.7:50051")]
    assert tr.security.mode is ChannelMode.PLAINTEXT
    assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)


def test_loopback_stays_plaintext_without_a_warning(
    channels: _Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=transport.__name__):
        Transport("127.0.0.1:50051", token="t").close()
    assert channels.calls == [("insecure_channel", "127.0.0.1:50051")]
    assert not caplog.records


# -- status map -------------------------------------------------------------------


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _tree() -> list[type[errors.VeilfaceError]]:
    return [
        c for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.VeilfaceError)
        and c is not errors.VeilfaceError and c.__module__ == errors.__name__
    ]


def test_status_map_picks_the_most_general_class() -> None:
    by_status = status_map()
    assert by_status[grpc.StatusCode.INVALID_ARGUMENT] is errors.InvalidArgument
    assert by_status[grpc.StatusCode.FAILED_PRECONDITION] is errors.FailedPrecondition
    assert by_status[grpc.StatusCode.NOT_FOUND] is errors.NotFound
    assert grpc.StatusCode.INTERNAL not in by_status  # base class: RemoteError instead


@pytest.mark.parametrize("cls", _tree(), ids=lambda c: c.__name__)
def test_every_status_of_the_tree_round_trips(cls: type[errors.VeilfaceError]) -> None:
    """Server raises cls -> status -> client class with the same status, the most general."""
    code = status_of(cls("boom"))
    assert code.name == cls.status
    got = error_from_rpc(_FakeRpcError(code, "boom"))
    assert type(got) is status_map()[code]
    assert got.status == cls.status and got.message == "boom"
    assert status_of(got) == code
    general = type(got)
    assert not any(
        issubclass(b, errors.VeilfaceError) and b is not errors.VeilfaceError
        and b.status == general.status
        for b in general.__mro__[1:]
    )


def test_a_class_added_to_the_tree_is_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    new = type("DataLoss", (errors.VeilfaceError,), {"status": "DATA_LOSS"})
    new.__module__ = errors.__name__
    monkeypatch.setattr(errors, "DataLoss", new, raising=False)
    assert status_map()[grpc.StatusCode.DATA_LOSS] is new


def test_unavailable_is_the_domain_error() -> None:
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"))
    assert isinstance(err, errors.Unavailable) and str(err) == "down"


def test_unmapped_status_is_a_remote_error() -> None:
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.DATA_LOSS, "gone"))
    assert isinstance(err, RemoteError) and err.status == "DATA_LOSS"
