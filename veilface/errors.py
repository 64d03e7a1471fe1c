"""The one error tree of veilface.

Every error a caller can provoke is a :class:`VeilfaceError` subclass that
carries the gRPC status it maps to (by name, so this module does not import
``grpc``). The server turns these into ``context.abort(status, message)`` in
one place (``veilface.server.errors_map``); anything else becomes INTERNAL
with a request id and no details.

Messages must never contain key material, templates, scores or images.
"""

from __future__ import annotations

import math


class VeilfaceError(Exception):
    """Base class. ``status`` names a ``grpc.StatusCode`` member."""

    status: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(VeilfaceError, ValueError):
    """The request is malformed: wrong shape, dimension, encoding, parameters."""

    status = "INVALID_ARGUMENT"


class InvalidCiphertext(InvalidArgument):
    """A ciphertext failed validation against the tenant's CKKS context."""


class InvalidContext(InvalidArgument):
    """A public context is malformed, carries a secret key, or misses keys."""


class NotFound(VeilfaceError, LookupError):
    """Unknown tenant, subject, bin or reservation."""

    status = "NOT_FOUND"


class AlreadyExists(VeilfaceError):
    """A tenant or subject handle that must be new is already taken."""

    status = "ALREADY_EXISTS"


class FailedPrecondition(VeilfaceError):
    """The request is valid but the state does not allow it (stale bin version...)."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(VeilfaceError):
    """A limit was hit: message size, bins per request, candidates, gallery size."""

    status = "RESOURCE_EXHAUSTED"


class GalleryFull(ResourceExhausted):
    """The server's gallery capacity is reached (``max_templates``, ``max_gallery_bytes``).

    A write would pass the count of templates the server may hold, or the
    memory budget of the bins its scoring workers keep loaded. Raised before anything of the write is kept; the message names the
    limit and the setting that raises it (server/capacity.py).
    """


class Unavailable(VeilfaceError):
    """A service the server needs (its database) cannot be reached, or asks for a retry."""

    status = "UNAVAILABLE"


class Unauthenticated(VeilfaceError):
    """No or unknown API token."""

    status = "UNAUTHENTICATED"


class PermissionDenied(VeilfaceError):
    """The token is valid but not for this tenant or this operation."""

    status = "PERMISSION_DENIED"


class KeystoreError(VeilfaceError):
    """A tenant key file cannot be opened: wrong passphrase, corrupt or foreign file."""

    status = "FAILED_PRECONDITION"


class FaceError(VeilfaceError, ValueError):
    """Base class of face-pipeline errors (no face, several faces, bad image)."""

    status = "INVALID_ARGUMENT"


class PresentationAttackDetected(FaceError):
    """The liveness gate judged a face to be a presentation attack (a print, a screen replay).

    Raised on the device, before the face is embedded or anything is sent.
    ``score`` is the model's P(live) for the face, ``threshold`` the
    artifact's decision threshold (a face scoring below it is an attack) and
    ``model_fingerprint`` names the liveness artifact that decided. The
    message itself carries no score (see the module docstring); callers that
    show the figures read the attributes (the CLI does).
    """

    def __init__(
        self,
        message: str,
        *,
        score: float = math.nan,
        threshold: float = math.nan,
        model_fingerprint: str = "",
    ) -> None:
        super().__init__(message)
        self.score = float(score)
        self.threshold = float(threshold)
        self.model_fingerprint = model_fingerprint


class CheckpointError(InvalidArgument):
    """A checkpoint or weights file is missing, unreadable, or from another model."""


class DatasetLayoutError(InvalidArgument):
    """A data set folder is missing, malformed or not in the expected layout."""


class LabelMismatchError(DatasetLayoutError):
    """Label files disagree with the images on disk (or with each other)."""


class TrainingFailed(FailedPrecondition):
    """A federated round or run trained nothing: every client failed, or the model never changed."""


__all__ = [
    "AlreadyExists",
    "CheckpointError",
    "DatasetLayoutError",
    "FaceError",
    "FailedPrecondition",
    "GalleryFull",
    "InvalidArgument",
    "InvalidCiphertext",
    "InvalidContext",
    "KeystoreError",
    "LabelMismatchError",
    "NotFound",
    "PermissionDenied",
    "PresentationAttackDetected",
    "ResourceExhausted",
    "TrainingFailed",
    "Unauthenticated",
    "Unavailable",
    "VeilfaceError",
]
