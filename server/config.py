"""Server settings: one typed object, from arguments or ``VEILFACE_*`` variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from veilface.server.store.factory import StoreURL, parse_db


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"VEILFACE_{name.upper()}", default)


# Limits that must be at least 1 (0 would refuse every request or disable a bound).
POSITIVE_LIMITS = (
    "max_message_bytes",
    "max_send_message_bytes",
    "max_template_dim",
    "max_keys_per_tenant",
    "max_bins_per_stream",
    "max_resident_keys",
    "max_concurrent_requests",
    "max_scoring_bins",
    "max_tokens_per_tenant",
    "max_reservations_per_tenant",
)


@dataclass
class ServerSettings:
    """Everything ``veilface serve`` can be told.

    Limits bound the work one request can cause; they are checked before any
    ciphertext is loaded.
    """

    # The store: a SQLite file (db_path, the embedded default), or, when
    # db_url is set, the store it names (postgresql://user:pw@host:port/db;
    # server/store/factory.py). ``--db`` sets one or the other.
    db_path: Path = Path("veilface.db")
    db_url: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 2
    # Where scoring runs: "local" (``workers`` processes, the embedded
    # default) or "ray" (actors of the Ray cluster at ``ray_address``;
    # server/ray_scoring.py). ray_shards 0: one actor per CPU of the
    # cluster. ray_namespace "": one derived from the store, so front-ends
    # sharing a store share its actors. A shard lost with its node is
    # waited for (restarted by Ray, re-created if Ray gave up) for at most
    # ray_recovery_s, then the call is UNAVAILABLE; ray_call_timeout_s
    # bounds one call to a live shard. ray_detached False: the actors end
    # with the front-end that made them (benchmarks; unshared).
    scoring: str = "local"
    ray_address: str = ""
    ray_shards: int = 0
    ray_namespace: str = ""
    ray_recovery_s: float = 60.0
    ray_call_timeout_s: float = 300.0
    ray_detached: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # A development CA and certificate made (or reused) in this folder (server/tls.py).
    tls_self_signed: Path | None = None
    # Allow plaintext on a non-loopback host (refused otherwise: tokens would travel in clear).
    insecure: bool = False
    admin_token_file: Path | None = None
    # Largest message the server accepts. The largest legitimate one is one
    # bin (a BulkEnroll chunk, a DeleteSubject re-pack): d_pad seeded
    # ciphertexts, 512 x 65.7 KB = 33.7 MB at n8192 with 512-d templates
    # (8.4 MB at n8192/128-d, 4.2 MB at n4096/128-d); a public context is
    # at most a few MB. 40 MiB leaves a fifth of margin; every request is
    # held a few times in memory while it is parsed, so this bounds what
    # concurrent large requests can take.
    max_message_bytes: int = 40 * 1024 * 1024
    # Largest response: a merged bin (FetchBin, FetchSubjectBin) holds
    # unseeded ciphertexts, twice the size: 67.6 MB at n8192/512-d.
    max_send_message_bytes: int = 96 * 1024 * 1024
    # Template dimension a key may declare: keeps every bin within the
    # message limits above, and a key's Galois keys within a few MB.
    max_template_dim: int = 512
    # Keys a tenant may register (each costs a few MB in every worker that loads it).
    max_keys_per_tenant: int = 8
    # Bins one BulkEnroll stream may import (a re-pack may write up to
    # max_bins_per_request: it is one stream replacing up to that many bins).
    max_bins_per_stream: int = 512
    # Public contexts (with their kernels) kept loaded per worker process,
    # least recently used evicted first.
    max_resident_keys: int = 16
    # Bins of other workers each worker keeps loaded for the queries balanced
    # onto it (server/scoring.py), least recently used first (8 MiB each at
    # n4096/128-d; 0: a query's bins stay with their owners).
    max_foreign_bins: int = 32
    # Encryptions of zero each worker makes in idle time, per resident key, for
    # re-randomizing score responses (server/idle_work.py; 64 KiB each at n4096).
    # 0: every response encrypts its own zero on the query's path.
    zero_pool: int = 64
    # Per tenant: calls in progress at once, and bins being scored at once
    # (over all its calls). Over either: RESOURCE_EXHAUSTED. One request may
    # still score up to max_bins_per_request when nothing else is in flight.
    max_concurrent_requests: int = 8
    max_scoring_bins: int = 4096
    max_bins_per_request: int = 4096
    max_candidate_bins: int = 256
    max_reserve: int = 2048
    # Unexpired slot reservations per tenant (each may hold a new, empty bin
    # until it is used or expires).
    max_reservations_per_tenant: int = 64
    reservation_ttl_s: float = 120.0
    compact_delay_s: float = 2.0
    query_ttl_s: float = 120.0
    max_photo_bytes: int = 10 * 1024 * 1024
    max_cached_queries: int = 1024
    # The probe cache of re-ranking (server/probes.py): bytes of all cached
    # probes, and of one tenant's (a probe is 1.06 MB at n4096, 128-d: 32 seeded
    # ciphertexts; twice that from a client that sends them in full form).
    max_cached_probe_bytes: int = 64 * 1024 * 1024
    max_cached_probe_bytes_per_tenant: int = 16 * 1024 * 1024
    # Single enrollments awaiting their fold, per key: each costs a query
    # about 6 ms of scoring until folded, so the area is kept small.
    max_staged: int = 64
    # Per-token token bucket on query-scope calls (each Identification RPC
    # costs 1) of tokens without the manage scope: bounds how fast a stolen
    # kiosk key can run chosen-probe queries (docs/protocol.md, "Token
    # scopes"). 0 disables it.
    query_rate_per_s: float = 5.0
    query_burst: int = 30
    # Gallery capacity of the whole server, over every tenant (server/capacity.py;
    # docs/architecture.md, "Gallery capacity"): an enrollment that would pass
    # either is RESOURCE_EXHAUSTED before anything is written. max_templates:
    # subjects in bins plus staged templates (0: no count cap). max_gallery_bytes:
    # memory of the bins the scoring workers hold loaded, estimated per bin from
    # the key's parameters (8.1 MiB per n4096/128-d bin, ~2 KiB per template
    # when full); 0 derives it as gallery_memory_fraction of this machine's
    # memory (physical RAM or the cgroup limit, whichever is smaller; 12 GiB on
    # a 24 GiB machine, room for about 6 million templates in full bins). With
    # scoring "ray" the bins live on the cluster: 0 then means no budget.
    max_templates: int = 0
    max_gallery_bytes: int = 0
    gallery_memory_fraction: float = 0.5
    # Valid API tokens per tenant (revoked ones do not count).
    max_tokens_per_tenant: int = 64
    # On a shared (PostgreSQL) store: seconds between reads of the tokens other
    # front-ends created or revoked (server/tokens.py, TokenSync); 0 disables.
    token_sync_s: float = 2.0
    # The Prometheus endpoint (server/metrics.py; docs/architecture.md, "Metrics"):
    # -1 off, 0 a free port (logged), else that port, on metrics_host. The tenant
    # id is a label of the per-tenant counts; metrics_tenant_label=false sums them.
    metrics_port: int = -1
    metrics_host: str = "127.0.0.1"
    metrics_tenant_label: bool = True
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
        if min(settings.max_templates, settings.max_gallery_bytes, settings.max_foreign_bins, settings.zero_pool) < 0:
            from veilface.errors import InvalidArgument

            raise InvalidArgument(
                "max_templates, max_gallery_bytes, max_foreign_bins and zero_pool are 0 or positive"
            )
        if not 0.0 < settings.gallery_memory_fraction <= 1.0:
            from veilface.errors import InvalidArgument

            raise InvalidArgument(
                "gallery_memory_fraction must be in (0, 1] (VEILFACE_GALLERY_MEMORY_FRACTION)"
            )
        for name in POSITIVE_LIMITS:
            if int(getattr(settings, name)) < 1:
                from veilface.errors import InvalidArgument

                raise InvalidArgument(f"{name} must be at least 1 (VEILFACE_{name.upper()})")
        return settings

    def store_url(self) -> StoreURL:
        """The store to open: ``db_url`` when set, else the SQLite file ``db_path``."""
        return parse_db(self.db_url) if self.db_url else StoreURL("sqlite", path=self.db_path)


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
