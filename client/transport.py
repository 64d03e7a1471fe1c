"""The client's gRPC channel: TLS, the API token, message limits, error mapping.

Which channel (see docs/protocol.md, "Network"):

- a ``root_cert`` given: TLS verified against it;
- else a loopback target (127.0.0.0/8, ``::1``, ``localhost``, a Unix
  socket): plaintext, the bytes never leave the machine;
- else plaintext only with ``insecure=True`` (logged as a warning);
- else TLS verified against the system's roots. Never a silent plaintext
  channel to another machine: the bearer token rides on every call.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from veilface import errors
from veilface.client.targets import channel_target
from veilface.loopback import is_loopback_host
from veilface.proto.v1 import veilface_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


# -- statuses -> the error tree ---------------------------------------------------


def _camel(status: str) -> str:
    return "".join(part.capitalize() for part in status.split("_"))


def status_map() -> dict[grpc.StatusCode, type[errors.VeilfaceError]]:
    """``grpc.StatusCode`` -> the most general class of ``veilface.errors`` carrying it.

    Derived from each class's ``status``, so a class added to the tree is
    mapped without touching this module. Per status the candidates are the
    classes that introduce it (no base of theirs has it: ``InvalidArgument``,
    not its subclass ``InvalidCiphertext``); among several such roots the
    class named after the status wins (``FailedPrecondition`` over
    ``KeystoreError``, ``InvalidArgument`` over ``FaceError``), else the
    first by name. The base class (INTERNAL) is left out: unmapped statuses
    become :class:`RemoteError`.
    """
    by_status: dict[str, list[type[errors.VeilfaceError]]] = {}
    for obj in vars(errors).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, errors.VeilfaceError)
            and obj is not errors.VeilfaceError
            and obj.__module__ == errors.__name__
        ):
            by_status.setdefault(obj.status, []).append(obj)
    out: dict[grpc.StatusCode, type[errors.VeilfaceError]] = {}
    for status, classes in by_status.items():
        code = getattr(grpc.StatusCode, status, None)
        if code is None:
            log.error("veilface.errors names an unknown gRPC status %r", status)
            continue
        roots = [
            c
            for c in classes
            if not any(
                issubclass(b, errors.VeilfaceError) and b is not errors.VeilfaceError
                and b.status == status
                for b in c.__mro__[1:]
            )
        ]
        named = [c for c in roots if c.__name__ == _camel(status)]
        out[code] = (named or sorted(roots, key=lambda c: c.__name__))[0]
    return out


_BY_STATUS = status_map()


class RemoteError(errors.VeilfaceError):
    """A status without a closer class (DEADLINE_EXCEEDED, INTERNAL, DATA_LOSS...)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def error_from_rpc(err: grpc.RpcError) -> errors.VeilfaceError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_STATUS.get(code)
    if cls is not None:
        return cls(detail or code.name)
    return RemoteError(f"{code.name}: {detail}", code.name)


# -- which channel ------------------------------------------------------------------


class ChannelMode(enum.Enum):
    TLS_ROOT_CERT = "tls-root-cert"  # verified against the given root certificate
    TLS_SYSTEM_ROOTS = "tls-system-roots"  # verified against the system's roots
    PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class ChannelSecurity:
    """How a channel to ``target`` is secured, and why (for logs and tests)."""

    mode: ChannelMode
    root_cert: Path | None = None
    loopback: bool = False


_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.IGNORECASE)


def _split_host(hostport: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal."""
    if hostport.startswith("["):
        end = hostport.find("]")
        return hostport[1:end] if end > 0 else hostport
    if hostport.count(":") > 1:
        return hostport  # a bare IPv6 literal
    return hostport.rpartition(":")[0] if ":" in hostport else hostport


def target_hosts(target: str) -> Sequence[str] | None:
    """The hosts a gRPC target dials, or None for a local (Unix) socket.

    Understands ``host:port``, ``[::1]:port``, ``dns:[//authority/]host:port``
    and ``ipv4:``/``ipv6:`` address lists. Any other scheme (``xds:``...)
    yields its raw text, which :func:`is_loopback_host` treats as non-loopback.
    """
    target = target.strip()
    lowered = target.lower()
    if lowered.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("ipv4:", "ipv6:"):
        if lowered.startswith(scheme):
            return [_split_host(a) for a in target[len(scheme):].split(",") if a]
    if lowered.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # drop the DNS server authority
        return [_split_host(rest)]
    match = _SCHEME.match(target)
    if match and target[match.end():].startswith("//"):
        return [target]  # another resolver scheme: not judged loopback
    return [_split_host(target)]


def is_loopback_target(target: str) -> bool:
    """Whether every address ``target`` dials is on this machine."""
    hosts = target_hosts(target)
    if hosts is None:
        return True
    return bool(hosts) and all(is_loopback_host(h) for h in hosts)


def choose_channel_security(
    target: str, *, root_cert: Path | None = None, insecure: bool = False
) -> ChannelSecurity:
    """The channel rule of this module's docstring, as data (no channel is opened)."""
    if root_cert is not None:
        return ChannelSecurity(ChannelMode.TLS_ROOT_CERT, Path(root_cert))
    if is_loopback_target(target):
        return ChannelSecurity(ChannelMode.PLAINTEXT, loopback=True)
    if insecure:
        log.warning("PLAINTEXT channel to non-loopback %s (--insecure): the token travels in clear",
                    target)
        return ChannelSecurity(ChannelMode.PLAINTEXT)
    log.info("TLS to %s verified against the system roots (--root-cert to pin a CA)", target)
    return ChannelSecurity(ChannelMode.TLS_SYSTEM_ROOTS)


def open_channel(
    target: str, security: ChannelSecurity, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to ``target`` as ``security`` says."""
    if security.mode is ChannelMode.PLAINTEXT:
        return grpc.insecure_channel(target, options=list(options))
    roots = security.root_cert.read_bytes() if security.root_cert is not None else None
    creds = grpc.ssl_channel_credentials(root_certificates=roots)  # None: system roots
    return grpc.secure_channel(target, creds, options=list(options))


class Transport:
    """Stubs over one channel; every call carries the bearer token.

    ``target``: one address, or several (a list or ``"a:1,b:2"``) balanced
    round-robin (:func:`veilface.client.targets.channel_target`).

    ``insecure`` permits plaintext to a non-loopback target that has no
    ``root_cert`` (otherwise such a target gets TLS with the system roots).
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str,
        root_cert: Path | None = None,
        insecure: bool = False,
        max_message_bytes: int = 128 * 1024 * 1024,
        timeout_s: float = 120.0,
    ) -> None:
        # Several addresses: one channel balanced round-robin over them (client/targets.py).
        dial = channel_target(target)
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *dial.options,
        ]
        self.target = dial.target
        self.security = choose_channel_security(dial.target, root_cert=root_cert, insecure=insecure)
        self.channel = open_channel(dial.target, self.security, options)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s
        self.tenants = pb_grpc.TenantsStub(self.channel)
        self.enrollment = pb_grpc.EnrollmentStub(self.channel)
        self.identification = pb_grpc.IdentificationStub(self.channel)
        self.photos = pb_grpc.PhotosStub(self.channel)

    def call(self, method: Callable[..., T], request: Any, *, timeout: float | None = None) -> T:
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self.timeout_s)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def close(self) -> None:
        self.channel.close()
