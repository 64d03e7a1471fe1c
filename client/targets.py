"""Several server addresses as one gRPC channel balanced ``round_robin``.

Stateless front-ends over one shared store (PostgreSQL) serve the same
tenants, so a client may spread its calls over them: ``VeilClient(["10.0.0.5:50051",
"10.0.0.6:50051"], ...)``, or the CLI's ``--server a,b``. gRPC balances one
channel over a static address list given as an ``ipv4:``/``ipv6:`` target
with the ``round_robin`` policy: every call goes to the next front-end that
is connected, and a front-end that goes down is skipped until it is back.

Names are resolved here, once, to one address each (``localhost`` to
127.0.0.1). When any address was a name, the channel's authority is the
first one as written, so TLS checks the certificate against that name: the
front-ends of one list then share a certificate naming it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from veilface.errors import InvalidArgument

_LB_OPTION = ("grpc.lb_policy_name", "round_robin")
# A resolver scheme (``dns:``, ``ipv4:``, ``unix:``...), not ``host:port``.
_SCHEME = re.compile(
    r"^(ipv4|ipv6|dns|unix|unix-abstract|vsock|xds|google-c2p):|^([A-Za-z][A-Za-z0-9+.-]*)://", re.IGNORECASE
)


@dataclass(frozen=True)
class ChannelTarget:
    """What a channel dials (``target``) and the channel options that go with it."""

    target: str
    options: tuple[tuple[str, Any], ...] = ()


def _split(hostport: str) -> tuple[str, str]:
    hostport = hostport.strip()
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, ""
    if not host or not port.isdigit():
        raise InvalidArgument(f"server address {hostport!r}: give HOST:PORT")
    return host, port


def _resolve(host: str, port: str) -> tuple[int, str]:
    """(4 or 6, the address literal) of ``host``: a literal as it is, a name resolved."""
    try:
        addr = ipaddress.ip_address(host)
        return addr.version, str(addr)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as err:
        raise InvalidArgument(f"server address {host}:{port} does not resolve ({err})") from None
    family, *_, sockaddr = min(infos, key=lambda i: i[0] != socket.AF_INET)
    return (4 if family == socket.AF_INET else 6), str(sockaddr[0])


def channel_target(target: str | Sequence[str]) -> ChannelTarget:
    """One address as it is; several (a list, or ``"a:1,b:2"``) balanced round-robin.

    Parameters
    ----------
    target : ``host:port``, any gRPC target (``dns:``, ``unix:``, ``ipv4:a,b``...),
        a comma-separated ``host:port`` list, or a sequence of ``host:port``
    """
    if isinstance(target, str):
        text = target.strip()
        scheme = _SCHEME.match(text)
        if scheme is not None and (scheme.group(1) or "").lower() in ("ipv4", "ipv6") and "," in text:
            return ChannelTarget(text, (_LB_OPTION,))
        if scheme is not None or "," not in text:
            return ChannelTarget(text)  # one address, or a target of another resolver
        addresses = [a for a in text.split(",") if a.strip()]
    else:
        addresses = list(target)
    if not addresses:
        raise InvalidArgument("no server address given")
    if len(addresses) == 1:
        return ChannelTarget(addresses[0].strip())
    resolved: list[tuple[int, str, str]] = []
    named = False
    for a in addresses:
        host, port = _split(a)
        version, literal = _resolve(host.strip("[]"), port)
        named = named or literal != host.strip("[]")
        resolved.append((version, literal, port))
    versions = {v for v, _, _ in resolved}
    if len(versions) > 1:
        raise InvalidArgument("server addresses mix IPv4 and IPv6; give one family")
    if versions == {4}:
        text = "ipv4:" + ",".join(f"{lit}:{port}" for _, lit, port in resolved)
    else:
        text = "ipv6:" + ",".join(f"[{lit}]:{port}" for _, lit, port in resolved)
    options: list[tuple[str, Any]] = [_LB_OPTION]
    if named:
        options.append(("grpc.default_authority", addresses[0].strip()))
    return ChannelTarget(text, tuple(options))


__all__ = ["ChannelTarget", "channel_target"]
