"""The tenant SDK: keys and state, routing, encryption, the face pipeline.

Everything here runs in the tenant's trusted zone; only ciphertexts, opaque
handles and opaque bin labels leave it.
"""

if __name__ != "veilface.client":  # ./client/ found through a repository root on sys.path
    raise ImportError(
        f"{__name__!r} is veilface's client package found by its folder name (the veilface "
        "repository root is on sys.path); import veilface.client, or run from outside the "
        "repository root",
        name=__name__,
    )

from veilface.client.handles import HandleCodec
from veilface.client.routing import Router
from veilface.client.sdk import (
    BulkReceipt,
    Candidate,
    EnrollReceipt,
    Identification,
    QueryStats,
    VeilClient,
    Verification,
)
from veilface.client.tenant_state import TenantState
from veilface.client.unlock import resolve_secret

__all__ = [
    "BulkReceipt",
    "Candidate",
    "EnrollReceipt",
    "HandleCodec",
    "Identification",
    "QueryStats",
    "Router",
    "TenantState",
    "VeilClient",
    "Verification",
    "resolve_secret",
]
