"""``veilface serve``: run the identification service."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the identification service (gRPC)")
    p.add_argument(
        "--db",
        metavar="PATH|URL",
        help="the gallery store: a SQLite file (default veilface.db), sqlite:///PATH, or "
        "postgresql://user@host:port/database (several servers may share one; needs "
        "--admin-token-file). Keep a password out of the command line: set VEILFACE_DB_URL "
        "instead, or let libpq read PGPASSWORD or ~/.pgpass",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (0 picks a free one; default 50051)")
    p.add_argument("--workers", type=int, help="scoring processes (default 2; --scoring local)")
    p.add_argument(
        "--scoring", choices=["local", "ray"],
        help="where scoring runs: local processes (default) or actors of a Ray cluster",
    )
    p.add_argument("--ray-address", metavar="HOST:PORT", help="the Ray head (--scoring ray)")
    p.add_argument("--ray-shards", type=int, help="Ray actors (default: one per CPU of the cluster)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument(
        "--tls-self-signed",
        type=Path,
        metavar="DIR",
        help="make (or reuse) a development CA and server certificate in DIR and serve TLS "
        "with them; clients pass DIR/ca.pem as --root-cert",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback host (refused otherwise: tokens travel in clear)",
    )
    p.add_argument("--admin-token-file", type=Path, help="file holding the operator token")
    p.add_argument("--max-message-mb", type=int, help="largest gRPC message in MiB")
    p.add_argument(
        "--max-templates",
        type=int,
        metavar="N",
        help="templates the whole server may hold, over every tenant (default 0: no count cap); "
        "an enrollment past it is RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--max-gallery-mb",
        type=int,
        metavar="MIB",
        help="memory budget of the bins the scoring workers hold loaded (default: half of this "
        "machine's memory, VEILFACE_GALLERY_MEMORY_FRACTION); an enrollment needing more is "
        "RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (0 picks a free port "
        "and prints it; default off; VEILFACE_METRICS_HOST binds another address)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from veilface.server import ServerSettings, serve
    from veilface.server.store.factory import parse_db
    from veilface.server.tls import ensure_dev_tls

    db = parse_db(args.db) if args.db else None
    settings = ServerSettings.from_env(
        db_path=db.path if db is not None and db.kind == "sqlite" else None,
        # --db PATH also overrides a VEILFACE_DB_URL of the environment
        db_url=None if db is None else (db.dsn if db.kind != "sqlite" else ""),
        host=args.host,
        port=args.port,
        workers=args.workers,
        scoring=args.scoring,
        ray_address=args.ray_address,
        ray_shards=args.ray_shards,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_self_signed=args.tls_self_signed,
        insecure=True if args.insecure else None,  # None: keep VEILFACE_INSECURE
        admin_token_file=args.admin_token_file,
        max_message_bytes=args.max_message_mb * 1024 * 1024 if args.max_message_mb else None,
        max_templates=args.max_templates,
        max_gallery_bytes=args.max_gallery_mb * 1024 * 1024 if args.max_gallery_mb else None,
        metrics_port=args.metrics_port,
    )
    if settings.tls_self_signed is not None and settings.tls_cert is None:
        # Made here to print the CA path; start_server reuses the same files.
        files = ensure_dev_tls(Path(settings.tls_self_signed), host=settings.host)
        print(f"veilface development CA: {files.ca_cert} (clients: --root-cert {files.ca_cert})",
              flush=True)
    asyncio.run(serve(settings))
    return 0
