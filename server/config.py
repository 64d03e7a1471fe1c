"""Server settings: one typed object, from arguments or ``VEILFACE_*`` variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"VEILFACE_{name.upper()}", default)


@dataclass
class ServerSettings:
    """Everything ``veilface serve`` can be told.

    Limits bound the work one request can cause; they are checked before any
    ciphertext is loaded.
    """

    db_path: Path = Path("veilface.db")
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 2
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_token_file: Path | None = None
    max_message_bytes: int = 128 * 1024 * 1024
    max_bins_per_request: int = 4096
    max_candidate_bins: int = 256
    max_reserve: int = 2048
    reservation_ttl_s: float = 120.0
    compact_delay_s: float = 2.0
    query_ttl_s: float = 120.0
    max_photo_bytes: int = 10 * 1024 * 1024
    max_cached_queries: int = 1024
    # Single enrollments awaiting their fold, per key: each costs a query
    # about 6 ms of scoring until folded, so the area is kept small.
    max_staged: int = 64
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides: object) -> ServerSettings:
        """Defaults, then ``VEILFACE_<FIELD>`` variables, then explicit overrides."""
        settings = cls()
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = _env(f.name)
            if raw is not None:
                setattr(settings, f.name, _coerce(f.name, raw, getattr(settings, f.name)))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        if (settings.tls_cert is None) != (settings.tls_key is None):
            from veilface.errors import InvalidArgument

            raise InvalidArgument("TLS needs both a certificate and a key (--tls-cert, --tls-key)")
        return settings


def _coerce(name: str, raw: str, current: object) -> object:
    if isinstance(current, bool):
        return raw.lower() in {"1", "true", "yes"}
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, Path) or name in {"tls_cert", "tls_key", "admin_token_file", "db_path"}:
        return Path(raw)
    return raw
