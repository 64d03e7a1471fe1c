"""Turn domain errors into gRPC statuses, in one place.

A :class:`VeilfaceError` becomes its own status and message. Anything else
is logged with a request id and becomes INTERNAL carrying only that id:
exception text never reaches the client.

A message that does not parse as its protobuf type is INVALID_ARGUMENT, on
unary and streaming calls alike (:class:`MalformedMessageInterceptor`):
gRPC itself would answer UNKNOWN for a unary call, and the servicer would
see a ``DecodeError`` (INTERNAL) in the middle of a stream.
"""

from __future__ import annotations

import functools
import logging
import secrets
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from veilface.errors import InvalidArgument, VeilfaceError

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
        except grpc.aio.AbortError:
            raise
        except VeilfaceError as err:
            code, message = status_of(err), err.message
            drop_frames(err)
        except DecodeError as err:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED
            drop_frames(err)
        except Exception as err:
            rid = secrets.token_hex(6)
            log.exception("request %s failed in %s", rid, method.__qualname__)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {rid})"
            drop_frames(err)
        except BaseException as err:  # cancelled: gRPC ends the call
            drop_frames(err)
            raise
        return end_call(context, code, message)

    return wrapper  # type: ignore[return-value]


def end_call(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code`` by returning, not by ``context.abort``.

    ``abort`` raises an exception that gRPC keeps in a reference cycle with
    every frame it went through, each holding the request: a refused 40 MB
    message stayed in memory until the cyclic garbage collector ran. Setting
    the status and returning leaves no such cycle.
    """
    context.set_code(code)
    context.set_details(message)


def drop_frames(err: BaseException) -> None:
    """Clear the locals of the finished frames an exception went through (and of its causes).

    A refused request's frames hold the request (a message can be tens of
    MB) and often sit in a reference cycle with the exception (a frame that
    holds a future or list holding the exception), which only the cyclic
    garbage collector frees, much later: the server kept 2 GB after a fuzz
    run. Clearing the frames frees the request at once.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


_MALFORMED = "a request message is malformed (it does not parse as its protobuf type)"


class _Malformed:
    """Stands for a request message that failed to parse."""


MALFORMED = _Malformed()


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parse failures become INVALID_ARGUMENT (unary and streaming requests).

    The method's deserializer is wrapped so that a message that does not
    parse becomes a marker instead of an exception raised inside gRPC; a
    unary call with the marker is aborted before the servicer runs, and a
    stream raises :class:`InvalidArgument` where the servicer reads it (so
    the servicer cleans up as for any refused message). Put it last in the
    server's interceptor list.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guarded(handler)


def _guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def lenient(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return MALFORMED

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is MALFORMED:
                return end_call(context, grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, lenient, handler.response_serializer)
    if handler.stream_unary is not None:
        inner_s = handler.stream_unary

        async def checked(request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for msg in request_iterator:
                if msg is MALFORMED:
                    raise InvalidArgument(_MALFORMED)
                yield msg

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            source = aiter(request_iterator)
            guarded = checked(source)
            try:
                return await inner_s(guarded, context)
            finally:
                # gRPC's request generator keeps the last message it yielded and
                # sits in a reference cycle with its receiver: left suspended (a
                # stream refused after its first message), the message stays in
                # memory until the cyclic garbage collector runs. Close both.
                await _close(guarded)
                await _close(source)

        return grpc.stream_unary_rpc_method_handler(stream, lenient, handler.response_serializer)
    return handler


async def _close(agen: Any) -> None:
    close = getattr(agen, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except RuntimeError:  # still being iterated elsewhere: it ends with the call
        log.debug("request iterator still running when the call ended")
