"""The gallery store interface: what the service and the workers are typed against.

Two implementations: :class:`~veilface.server.store.sqlite_store.SQLiteStore`
(one file, the embedded default) and
:class:`~veilface.server.store.postgres_store.PostgresStore` (one database
shared by several front-end processes). :func:`~veilface.server.store.factory.open_store`
picks one from a ``--db`` URL. Both run the same SQL
(:mod:`veilface.server.store.sql_gallery` and its siblings) and pass the
same test suite (``tests/server/store/``).

The contract every implementation keeps:

Durability
    A method that writes returns only once its write is durable (committed
    and flushed: SQLite's WAL with ``synchronous=FULL``, PostgreSQL's
    commit with ``synchronous_commit=on``). An acknowledged enrollment
    survives a SIGKILL of the server or a power cut.
Atomicity
    Each method is one transaction: a killed process leaves all of a change
    or none of it. In particular a bin's ciphertexts, its subjects and its
    version move together: a half-written bin is never visible.
Isolation
    Concurrent callers (threads of one server, or several servers on one
    PostgreSQL) see each write whole. Checks and the writes they guard
    (free slots, bin versions, limits) run under one tenant's write lock.
Tenant scoping
    Methods that take a ``tenant_id`` only see and change that tenant's
    rows; another tenant's bin, subject, photo or token is NotFound. The
    methods that take only a bin id (``load_bin_data``, ``occupancy``,
    ``handles_for``, ``bin_subjects``, ``bin_owner``, ``compact``) are for
    bins the caller already resolved through a tenant-scoped call.
Errors
    Only :mod:`veilface.errors` classes: NotFound (unknown tenant, key,
    bin, subject, reservation, photo, token), AlreadyExists (a tenant,
    handle or key id taken), FailedPrecondition (a stale bin version, a
    schema this code cannot open), ResourceExhausted (a limit),
    InvalidArgument (a request naming a handle twice), Unavailable (the
    database cannot be reached, or a transaction must be retried).
    Messages never carry a ciphertext, a token or a password.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from veilface.server.store.records import (
    BinData,
    BinInfo,
    BinSummary,
    GalleryUsage,
    KeyRecord,
    KeyStats,
    Reservation,
    StagedRecord,
    SubjectRef,
    TokenRecord,
)


class GalleryStore(Protocol):
    """Tenants, keys, tokens, bins, staged templates and photos (see the module docstring)."""

    # -- tenants and their API tokens (hashes only; several per tenant) --

    def create_tenant(self, tenant_id: str, first_token: TokenRecord) -> None:
        """Create a tenant with its first token, in one transaction.

        Raises AlreadyExists if the tenant exists.
        """
        ...

    def tenant_exists(self, tenant_id: str) -> bool:
        """Whether the tenant exists."""
        ...

    def active_tokens(self) -> list[TokenRecord]:
        """Every unrevoked token of every tenant (the server's index at start-up)."""
        ...

    def add_token(self, record: TokenRecord, *, max_active: int) -> None:
        """Store a new token of ``record.tenant_id``.

        Raises NotFound (unknown tenant) or ResourceExhausted (the tenant
        already has ``max_active`` valid tokens; checked under the tenant's
        lock, so concurrent calls cannot overshoot it).
        """
        ...

    def tokens_changed_since(self, since: float) -> list[TokenRecord]:
        """Tokens created or revoked at or after ``since`` (a ``time.time()``), oldest first.

        How a front-end learns of tokens another front-end of the same
        database created or revoked (:class:`~veilface.server.tokens.TokenSync`).
        """
        ...

    def list_tokens(self, tenant_id: str, *, include_revoked: bool = True) -> list[TokenRecord]:
        """The tenant's tokens, oldest first (an unknown tenant has none)."""
        ...

    def revoke_token(self, tenant_id: str, token_id: str) -> TokenRecord:
        """Revoke one of the tenant's tokens; return it as stored now.

        Idempotent (revoking a revoked token keeps its first revocation
        time). Only the newest 64 revoked tokens of a tenant are kept.
        Raises NotFound if the tenant has no such token.
        """
        ...

    # -- keys --------------------------------------------------------------

    def put_key(self, record: KeyRecord, *, max_keys: int = 0, replaces: str = "") -> KeyRecord:
        """Register a key; registering the same key (same fingerprint) again changes nothing.

        ``replaces``: the fingerprint of the key's stored context, which this
        record's context replaces (the service's upgrade of a context without
        a public key; the same parameters and layout, checked by the caller);
        replaced only if it is still the stored one, atomically.
        Raises AlreadyExists if the key id is taken by another context, or
        ResourceExhausted if the tenant already has ``max_keys`` keys (0: no
        cap; checked under the tenant's lock, across front-ends).
        """
        ...

    def get_key(self, tenant_id: str, key_id: str) -> KeyRecord:
        """One key of the tenant; NotFound if it has none of that id."""
        ...

    def list_keys(self, tenant_id: str) -> list[tuple[KeyRecord, KeyStats]]:
        """The tenant's keys, oldest first, with their counts of subjects, bins and bytes."""
        ...

    def set_center(self, tenant_id: str, key_id: str, blob: bytes) -> None:
        """Store the key's encrypted centering vector (a packed blob).

        It may be replaced until the key holds templates. Raises NotFound
        (no such key) or FailedPrecondition (a center is set and bins are
        written).
        """
        ...

    # -- single enrollment -------------------------------------------------

    def reserve(
        self,
        tenant_id: str,
        key_id: str,
        label: str,
        count: int,
        capacity: int,
        ttl_s: float,
        max_live: int = 0,
        no_new_bin: str = "",
    ) -> Reservation:
        """Reserve ``count`` free slots of one bin of ``label`` (a new bin if none has room).

        Two live reservations never share a slot, across processes too.
        ``max_live`` (0: no cap) bounds the tenant's unexpired reservations
        (ResourceExhausted past it). Empty bins left by expired reservations
        are removed here. ``no_new_bin``: if set, no bin may be created, and
        when none has room the call raises GalleryFull with that message
        (the server's memory budget is reached; nothing is written).
        """
        ...

    def get_reservation(self, tenant_id: str, reservation_id: str) -> Reservation:
        """A live reservation of the tenant; NotFound if unknown or expired."""
        ...

    def commit_enroll(
        self, reservation: Reservation, handles: Sequence[str], delta: bytes, staged_id: int = 0
    ) -> int:
        """Write a contribution into the reserved slots; return the bin's new version.

        The delta, the subjects, the version bump and the removal of the
        reservation are one transaction; with ``staged_id`` (a fold) the
        staged template leaves in the same one. Raises NotFound (the
        reservation or the staged template is gone) or AlreadyExists (a
        handle is taken).
        """
        ...

    # -- the staging area (fast single enrollment) -------------------------

    def stage_template(
        self, tenant_id: str, key_id: str, label: str, handle: str, blob: bytes, max_staged: int
    ) -> int:
        """Keep one staged template durably; return its staged id.

        Raises AlreadyExists (the handle is taken in a bin or the staging
        area) or ResourceExhausted (the key already holds ``max_staged``).
        """
        ...

    def staged_templates(
        self, tenant_id: str, key_id: str, labels: Sequence[str] | None = None, *, limit: int = 0
    ) -> list[StagedRecord]:
        """Staged templates of a key (of ``labels``, None: all), oldest first; ``limit`` 0: all."""
        ...

    def staged_subject(self, tenant_id: str, handle: str) -> StagedRecord | None:
        """The tenant's staged template of ``handle``, or None."""
        ...

    def delete_staged(self, tenant_id: str, handle: str) -> None:
        """Forget a staged subject and its photos; NotFound if it is not staged."""
        ...

    def search_view(
        self, tenant_id: str, key_id: str, labels: Sequence[str] | None
    ) -> tuple[list[BinInfo], list[StagedRecord]]:
        """Bins (as :meth:`list_bins`) and staged templates to search, read in one snapshot.

        A fold moves a template from the staging area into a bin in one
        transaction; one snapshot means a query finds it in one place or the
        other, never in neither.
        """
        ...

    # -- bulk enrollment ---------------------------------------------------

    def stage_bin(
        self,
        tenant_id: str,
        key_id: str,
        label: str,
        stream_id: str,
        handles: Sequence[str],
        slots: Sequence[int],
        blob: bytes,
        *,
        repack: bool = False,
    ) -> int:
        """Write a whole bin of a bulk stream, invisible to searches until :meth:`activate_stream`.

        ``repack``: the handles belong to bins the stream replaces; they
        take over at activation. Staged bins of a stream whose server died
        are removed when a store next opens (PostgreSQL: only streams whose
        server's session is gone). Raises AlreadyExists (a handle is taken)
        or InvalidArgument (a re-pack names a handle twice).
        """
        ...

    def activate_stream(
        self,
        stream_id: str,
        tenant_id: str = "",
        replaces: Sequence[tuple[int, int]] = (),
        *,
        renew_handles: bool = False,
    ) -> tuple[list[int], int]:
        """Make a stream's bins visible, in one transaction; return (bin ids, subjects).

        With ``replaces`` ((bin id, version) pairs) the named bins of the
        tenant go in the same transaction. Raises NotFound (a replaced bin is
        not the tenant's) or FailedPrecondition (a replaced bin changed, or
        the stream leaves out some of its subjects; with ``renew_handles``,
        carries a different number of them).
        """
        ...

    def abort_stream(self, stream_id: str) -> None:
        """Remove a stream's staged bins (nothing else of the gallery changes)."""
        ...

    # -- reading -----------------------------------------------------------

    def list_bins(self, tenant_id: str, key_id: str, labels: Sequence[str] | None) -> list[BinInfo]:
        """Active bins of a key holding ciphertexts, by id, without their occupancy."""
        ...

    def key_bins(self, tenant_id: str, key_id: str) -> list[BinSummary]:
        """A key's active bins (id, label, version, subjects), by id, empty ones included."""
        ...

    def bin_info(self, tenant_id: str, bin_id: int, *, with_occupancy: bool = True) -> BinInfo:
        """One active bin of the tenant; NotFound if it is not the tenant's."""
        ...

    def bin_infos(self, tenant_id: str, bin_ids: Sequence[int]) -> list[BinInfo]:
        """Several active bins of the tenant in the given order (no occupancy); NotFound if any is not."""
        ...

    def bin_owner(self, bin_id: int) -> tuple[str, str]:
        """(tenant id, key id) of a bin; NotFound if there is no such bin."""
        ...

    def bin_subjects(self, bin_id: int) -> list[tuple[int, str]]:
        """(slot, handle) of a bin's subjects, by slot."""
        ...

    def gallery_usage(self, *, count_templates: bool = False) -> GalleryUsage:
        """What the whole store holds, over every tenant, read in one snapshot.

        The bins of every key in any state (active, and staged by bulk
        streams in progress), and with ``count_templates`` the subjects in
        bins plus the staged templates. Not tenant-scoped: the server's
        capacity limits (server/capacity.py) are the machine's, and only
        the server reads it; no total reaches a tenant.
        """
        ...

    def occupancy(self, bin_ids: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """Occupied slots of each bin, sorted (an unknown bin has none)."""
        ...

    def handles_for(self, bin_id: int, slots: Sequence[int]) -> list[str]:
        """The handle in each slot of a bin ("" for an empty slot)."""
        ...

    def subject(self, tenant_id: str, handle: str) -> SubjectRef:
        """Where the tenant's subject lives (key, bin, slot); NotFound if not in an active bin."""
        ...

    def load_bin_data(self, bin_id: int) -> BinData:
        """A bin's base and pending deltas, read in one snapshot; NotFound if there is no such bin."""
        ...

    # -- maintenance -------------------------------------------------------

    def compact(self, bin_id: int, merged: bytes, upto_seq: int) -> None:
        """Replace a bin's base by ``merged`` (base plus deltas up to ``upto_seq``) and drop those deltas.

        A no-op if the bin is gone or already compacted as far.
        """
        ...

    def repack_delete(
        self, tenant_id: str, handle: str, bin_id: int, expected_version: int, blob: bytes
    ) -> int:
        """Delete a subject by replacing its bin with ``blob``; return the new version.

        Checked against ``expected_version`` under the tenant's lock:
        FailedPrecondition if the bin changed (or the subject is elsewhere),
        NotFound if the subject is unknown. Its photos go too.
        """
        ...

    # -- photos (sealed by the tenant; the server cannot open them) --------

    def add_photo(
        self, tenant_id: str, handle: str, sealed: bytes, protection: str, *, replaces: str = ""
    ) -> str:
        """Keep a sealed photo of an enrolled (or staged) subject; return its id.

        With ``replaces``, that photo of the tenant goes in the same
        transaction. Raises NotFound (unknown subject, or no photo to
        replace).
        """
        ...

    def list_photos(self, tenant_id: str, handle: str) -> list[str]:
        """Photo ids of a subject, oldest first."""
        ...

    def get_photo(self, tenant_id: str, photo_id: str) -> tuple[str, bytes, str]:
        """(handle, sealed blob, protection) of one of the tenant's photos; NotFound otherwise."""
        ...

    def close(self) -> None:
        """Release the connections (the store is unusable afterwards)."""
        ...


class BinReader(Protocol):
    """What a scoring worker process reads: bins and keys, never writes.

    Opened in the worker by :func:`~veilface.server.store.factory.open_reader`
    (one connection, the worker is single-threaded).
    """

    def load(self, bin_id: int) -> BinData:
        """As :meth:`GalleryStore.load_bin_data`."""
        ...

    def version(self, bin_id: int) -> int | None:
        """The bin's current version, or None if there is no such bin."""
        ...

    def key_context(self, tenant_id: str, key_id: str) -> tuple[bytes, str, bytes | None]:
        """(public context, fingerprint, packed center or None) of a key; NotFound otherwise."""
        ...

    def close(self) -> None: ...
