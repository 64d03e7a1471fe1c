"""Two front-ends on one store: a token created or revoked through one reaches the other's index."""

from __future__ import annotations

import time

from tests.server.store.test_store_contract import token
from veilface.server.store.factory import open_store
from veilface.server.tokens import QueryRateLimiter, TokenIndex, TokenSync


def test_a_token_change_reaches_the_other_front_end(store_url: str) -> None:
    a, b = open_store(store_url), open_store(store_url)
    try:
        a.create_tenant("acme", token("acme"))
        index_b = TokenIndex(None, b.active_tokens())  # front-end b's copy at its start
        limiter = QueryRateLimiter(5.0, 30)
        sync = TokenSync(b, index_b, limiter, full_every=3)
        new = token("acme", 1, at=time.time())  # created now, as mint_token does
        a.add_token(new, max_active=4)  # through front-end a
        assert index_b.resolve(new.token_hash) is None
        assert sync.sync_once() >= 1
        grant = index_b.resolve(new.token_hash)
        assert grant is not None and grant.tenant_id == "acme"
        a.revoke_token("acme", new.token_id)
        sync.sync_once()
        assert index_b.resolve(new.token_hash) is None  # refused on b too
        assert index_b.resolve(token("acme").token_hash) is not None
        sync.sync_once()  # the third round rebuilds the whole index: the same answer
        assert len(index_b) == 1
    finally:
        a.close()
        b.close()
