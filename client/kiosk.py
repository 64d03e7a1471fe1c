"""Kiosk states: a tenant state cut down to identifying and verifying.

:func:`export_kiosk` is what :meth:`TenantState.export_kiosk
<veilface.client.tenant_state.TenantState.export_kiosk>` (and ``veilface
keys export --role kiosk``) runs. A kiosk state keeps the CKKS secret key,
the handle key, the mixing seed, the centering vector, the threshold and the search
parameters the SDK chose, and the router with its label key when it routes; it has no photo key. Its
header says ``"role": "kiosk"``, and the SDK refuses, before any RPC,
everything but identify and verify with it (:func:`not_for_kiosk`, on the
methods of ``VeilClient``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import numpy as np

from veilface.client.tenant_state import TenantState
from veilface.errors import FailedPrecondition, PermissionDenied

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def not_for_kiosk(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Refuse a ``VeilClient`` method, before any RPC, when the client's state is a kiosk export.

    A kiosk (``TenantState.role == "kiosk"``, a query-scope token) only
    identifies and verifies; the server would refuse the rest too, but
    this says why before anything is encrypted or sent.
    """

    def wrap(method: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(method)
        def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            state = getattr(args[0], "state", None)
            if getattr(state, "role", "full") == "kiosk":
                raise PermissionDenied(
                    f"this tenant state is a kiosk export: it identifies and verifies only; "
                    f"{what} needs the back office's full state and a token with that scope"
                )
            return method(*args, **kwargs)

        return guarded

    return wrap


def export_kiosk(state: TenantState, *, keep_router: bool = True) -> TenantState:
    """A copy of ``state`` for a kiosk: identify and verify, nothing else.

    Kept: the CKKS secret key (a kiosk encrypts its probes and decrypts
    its own scores), the handle key (subject ids to handles and back),
    the mixing seed, the centering vector and the threshold, and the
    router with its label key when ``keep_router`` (routed queries need
    the centroids). Left out: the photo key, and the router and label
    key without ``keep_router``. No state holds relinearization or
    Galois keys (they are derived from the secret key when a key is
    registered, which a kiosk refuses); what a kiosk key holder can
    still learn is in docs/protocol.md ("Token scopes").

    Raises
    ------
    FailedPrecondition
        The key's centering vector is not fixed yet (export after the
        key's first enrollment, from the state saved then).
    """
    if state.center is None:
        raise FailedPrecondition(
            "this state has no centering vector yet: export the kiosk state after the "
            "key's first enrollment, from the state file saved then"
        )
    router = state.router if keep_router else None
    kiosk = TenantState(
        tenant_id=state.tenant_id,
        key_id=state.key_id,
        param_set=state.param_set,
        dim=state.dim,
        presel_dims=state.presel_dims,
        layout_version=state.layout_version,
        secret_key=state.secret_key,
        label_key=state.label_key if router is not None else b"",
        handle_key=state.handle_key,
        mixing_seed=state.mixing_seed,
        router=router,
        threshold=state.threshold,
        created_at=state.created_at,
        center=np.array(state.center, dtype=np.float64),
        role="kiosk",
        search=state.search,
    )
    kiosk._keys = state._keys  # the CKKS keys, if already loaded: the same secret key
    logger.info("exported a kiosk state of tenant %s (key %s)", state.tenant_id, state.key_id)
    return kiosk


__all__ = ["export_kiosk", "not_for_kiosk"]
