"""The tenant SDK: keys and state, routing, encryption, the face pipeline.

Everything here runs in the tenant's trusted zone; only ciphertexts, opaque
handles and opaque bin labels leave it.
"""

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
from veilface.client.tenant_state import TenantState, resolve_secret

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
