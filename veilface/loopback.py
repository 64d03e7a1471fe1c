"""Is a host this machine's loopback? Shared by the server's bind check and the client.

Plaintext gRPC is allowed only where the bytes never leave the machine, so
both sides ask the same question about a host: a literal address is loopback
when it lies in 127.0.0.0/8 or is ``::1`` (or ``::ffff:127.x.y.z``); a name
(``localhost`` included) is loopback when it resolves and *every* address it
resolves to is loopback. A name that does not resolve, the wildcard
addresses (``""``, ``0.0.0.0``, ``::``) and anything else count as
non-loopback, so every doubt falls on the side of TLS.

This module lives in the top-level package because ``server/`` and
``client/`` never import each other.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def _literal_is_loopback(text: str) -> bool | None:
    """True/False for an IP literal, None when ``text`` is not one."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP literal, possibly in brackets, or a name) is loopback only.

    Parameters
    ----------
    host : str
        ``127.0.0.1``, ``[::1]``, ``localhost``, ``0.0.0.0``, ``example.org``...

    Returns
    -------
    bool
        False for wildcard and empty hosts, for names that do not resolve, and
        for names of which at least one address is not loopback.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return False  # "" binds every interface
    literal = _literal_is_loopback(host)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        log.debug("%s does not resolve: treated as non-loopback", host)
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(_literal_is_loopback(a) is True for a in addresses)


__all__ = ["is_loopback_host"]
