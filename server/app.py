"""Build and run the grpc.aio server: services, health, reflection, TLS, limits."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from veilface.proto.v1 import veilface_pb2 as pb
from veilface.proto.v1 import veilface_pb2_grpc as pb_grpc
from veilface.server.auth import AuthInterceptor
from veilface.server.config import ServerSettings
from veilface.server.errors_map import MalformedMessageInterceptor
from veilface.server.limits import HeapTrimmer, TenantLimitInterceptor, bound_heap_growth
from veilface.server.metrics import MetricsEndpoint, start_metrics
from veilface.server.scoring import ScoringBackend, open_scoring
from veilface.server.service import GalleryService
from veilface.server.servicers import (
    EnrollmentServicer,
    IdentificationServicer,
    PhotosServicer,
    TenantsServicer,
    TokensServicer,
)
from veilface.server.store.base import GalleryStore
from veilface.server.store.factory import open_store
from veilface.server.tls import resolve_server_tls
from veilface.server.tokens import (
    QueryRateLimiter,
    TokenIndex,
    TokenService,
    TokenSync,
    hash_token,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[n].full_name
    for n in ("Tenants", "Tokens", "Enrollment", "Identification", "Photos")
]


def admin_token_path(settings: ServerSettings) -> Path:
    """``--admin-token-file``, or the file beside the SQLite database.

    A PostgreSQL store needs the file named: the front-ends sharing the
    database share the operator token.
    """
    if settings.admin_token_file is not None:
        return settings.admin_token_file
    url = settings.store_url()
    if url.path is None:
        from veilface.errors import InvalidArgument

        raise InvalidArgument(
            "a PostgreSQL store needs --admin-token-file (the front-ends sharing the "
            "database share the operator token)"
        )
    return url.path.with_suffix(".admin-token")


def load_admin_token(settings: ServerSettings) -> tuple[str, Path | None]:
    """The admin token from :func:`admin_token_path`, or a new one written there."""
    path = admin_token_path(settings)
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 16:
            from veilface.errors import InvalidArgument

            raise InvalidArgument(f"admin token in {path} is shorter than 16 characters")
        return token, path
    token = "vfadmin_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("wrote a new admin token to %s", path)
    return token, path


@dataclass
class RunningServer:
    server: grpc.aio.Server
    service: GalleryService
    pool: ScoringBackend
    store: GalleryStore
    port: int
    admin_token_path: Path | None
    token_sync: asyncio.Task[None] | None = None
    metrics: MetricsEndpoint | None = None

    async def stop(self, grace: float = 2.0) -> None:
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)  # before the store closes
        if self.token_sync is not None:
            self.token_sync.cancel()
        await self.server.stop(grace)
        await self.service.close()
        self.pool.shutdown()
        self.store.close()


async def start_server(settings: ServerSettings) -> RunningServer:
    # First, so a refused plaintext bind fails before the store or workers start.
    tls = resolve_server_tls(settings)
    url = settings.store_url()
    admin_token_path(settings)  # a PostgreSQL store without --admin-token-file fails before connecting
    store = open_store(url)  # a URL that cannot be reached fails here, named without its password
    log.info("store: %s", url.redacted)
    admin_token, admin_path = load_admin_token(settings)
    # The store is the truth; the index is its copy of the valid tokens.
    tokens = TokenIndex(hash_token(admin_token), store.active_tokens())
    limiter = QueryRateLimiter(settings.query_rate_per_s, settings.query_burst)
    bound_heap_growth()  # large request buffers go back to the system once freed
    pool = await open_scoring(settings, url.target)  # an unreachable Ray cluster fails here, named
    service = GalleryService(store, pool, settings)
    metrics = start_metrics(settings, store, pool.stats)  # None unless metrics_port is set
    sync_task: asyncio.Task[None] | None = None
    if url.kind != "sqlite" and settings.token_sync_s > 0:  # other front-ends may share the store
        sync = TokenSync(store, tokens, limiter, interval_s=settings.token_sync_s)
        sync_task = asyncio.create_task(sync.run(), name="token sync")
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        # Metrics outermost (they count refused calls too), then authentication
        # (the others need the caller), then the per-tenant call limit, then the
        # parse-failure guard next to the servicer.
        interceptors=[
            *([metrics.interceptor] if metrics is not None else []),
            AuthInterceptor(tokens, hash_token, limiter),
            TenantLimitInterceptor(service.limits, HeapTrimmer()),
            MalformedMessageInterceptor(),
        ],
        options=options,
    )
    pb_grpc.add_TenantsServicer_to_server(TenantsServicer(service, tokens), server)
    token_service = TokenService(store, tokens, settings, limiter)
    pb_grpc.add_TokensServicer_to_server(TokensServicer(token_service), server)
    pb_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(service), server)
    pb_grpc.add_IdentificationServicer_to_server(IdentificationServicer(service), server)
    pb_grpc.add_PhotosServicer_to_server(PhotosServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    address = f"{host}:{settings.port}"
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:  # loopback, or non-loopback with --insecure (resolve_server_tls checked)
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    for name in [*SERVICE_NAMES, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("veilface serving on %s:%d (%s)", settings.host, port, "TLS" if tls else "plaintext")
    return RunningServer(server, service, pool, store, port, admin_path, sync_task, metrics)


async def serve(settings: ServerSettings, *, announce: bool = True) -> None:
    running = await start_server(settings)
    if announce:
        if running.metrics is not None:  # first: LocalServer reads up to the line below
            print(f"veilface metrics on {running.metrics.url}", flush=True)
        print(f"veilface listening on {settings.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
