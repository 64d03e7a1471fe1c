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
from veilface.server.auth import AuthInterceptor, TokenIndex
from veilface.server.config import ServerSettings
from veilface.server.scoring import WorkerPool
from veilface.server.service import GalleryService, hash_token
from veilface.server.servicers import (
    EnrollmentServicer,
    IdentificationServicer,
    PhotosServicer,
    TenantsServicer,
)
from veilface.server.store.sqlite_store import SQLiteStore

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    pb.DESCRIPTOR.services_by_name[n].full_name
    for n in ("Tenants", "Enrollment", "Identification", "Photos")
]


def load_admin_token(settings: ServerSettings) -> tuple[str, Path | None]:
    """The admin token from ``--admin-token-file``, or a new one written beside the database."""
    path = settings.admin_token_file or settings.db_path.with_suffix(".admin-token")
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
    pool: WorkerPool
    store: SQLiteStore
    port: int
    admin_token_path: Path | None

    async def stop(self, grace: float = 2.0) -> None:
        await self.server.stop(grace)
        await self.service.close()
        self.pool.shutdown()
        self.store.close()


async def start_server(settings: ServerSettings) -> RunningServer:
    store = SQLiteStore(settings.db_path)
    admin_token, admin_path = load_admin_token(settings)
    tokens = TokenIndex(hash_token(admin_token), store.token_index())
    pool = WorkerPool(settings.db_path, settings.workers)
    await pool.warm_up()
    service = GalleryService(store, pool, settings)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=[AuthInterceptor(tokens, hash_token)], options=options)
    pb_grpc.add_TenantsServicer_to_server(TenantsServicer(service, tokens), server)
    pb_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(service), server)
    pb_grpc.add_IdentificationServicer_to_server(IdentificationServicer(service), server)
    pb_grpc.add_PhotosServicer_to_server(PhotosServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert and settings.tls_key:
        creds = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    for name in [*SERVICE_NAMES, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("veilface serving on %s:%d (%s)", settings.host, port, "TLS" if settings.tls_cert else "plaintext")
    return RunningServer(server, service, pool, store, port, admin_path)


async def serve(settings: ServerSettings, *, announce: bool = True) -> None:
    running = await start_server(settings)
    if announce:
        print(f"veilface listening on {settings.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
