"""The identification service: gRPC front, data plane, store and scoring workers.

It holds public CKKS contexts and ciphertexts only; see docs/protocol.md.
"""

from veilface.server.app import RunningServer, serve, start_server
from veilface.server.config import ServerSettings

__all__ = ["RunningServer", "ServerSettings", "serve", "start_server"]
