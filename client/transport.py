"""The client's gRPC channel: TLS, the API token, message limits, error mapping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from veilface import errors
from veilface.proto.v1 import veilface_pb2_grpc as pb_grpc

T = TypeVar("T")

_BY_STATUS: dict[grpc.StatusCode, type[errors.VeilfaceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


class RemoteError(errors.VeilfaceError):
    """A status without a closer class (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL...)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def error_from_rpc(err: grpc.RpcError) -> errors.VeilfaceError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_STATUS.get(code)
    if cls is not None:
        return cls(detail or code.name)
    return RemoteError(f"{code.name}: {detail}", code.name)


class Transport:
    """Stubs over one channel; every call carries the bearer token."""

    def __init__(
        self,
        target: str,
        *,
        token: str,
        root_cert: Path | None = None,
        max_message_bytes: int = 128 * 1024 * 1024,
        timeout_s: float = 120.0,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(root_cert).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s
        self.tenants = pb_grpc.TenantsStub(self.channel)
        self.enrollment = pb_grpc.EnrollmentStub(self.channel)
        self.identification = pb_grpc.IdentificationStub(self.channel)
        self.photos = pb_grpc.PhotosStub(self.channel)

    def call(self, method: Callable[..., T], request: Any, *, timeout: float | None = None) -> T:
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self.timeout_s)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def close(self) -> None:
        self.channel.close()
