"""The identification service: gRPC front, data plane, store and scoring workers.

It holds public CKKS contexts and ciphertexts only; see docs/protocol.md.
"""

if __name__ != "veilface.server":  # ./server/ found through a repository root on sys.path
    raise ImportError(
        f"{__name__!r} is veilface's server package found by its folder name (the veilface "
        "repository root is on sys.path); import veilface.server, or run from outside the "
        "repository root",
        name=__name__,
    )

from veilface.server.app import RunningServer, serve, start_server
from veilface.server.config import ServerSettings

__all__ = ["RunningServer", "ServerSettings", "serve", "start_server"]
