"""Turn domain errors into gRPC statuses, in one place.

A :class:`VeilfaceError` becomes its own status and message. Anything else
is logged with a request id and becomes INTERNAL carrying only that id:
exception text never reaches the client.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from veilface.errors import VeilfaceError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def status_of(err: VeilfaceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.status, grpc.StatusCode.INTERNAL)


def mapped(method: F) -> F:
    """Decorator for servicer methods (``async def m(self, request, context)``)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except VeilfaceError as err:
            await context.abort(status_of(err), err.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            rid = secrets.token_hex(6)
            log.exception("request %s failed in %s", rid, method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")

    return wrapper  # type: ignore[return-value]
