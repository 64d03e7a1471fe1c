"""Plain records the store returns (no protobuf, no SEAL)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyRecord:
    tenant_id: str
    key_id: str
    param_set: str
    dim: int
    presel_dims: int
    public_context: bytes
    fingerprint: str
    center_probe: bytes | None = None


@dataclass(frozen=True)
class KeyStats:
    subjects: int
    bins: int
    stored_bytes: int
    staged: int = 0


@dataclass(frozen=True)
class KeyBins:
    """Bins one key holds, in any state (active, or staged by a bulk stream in progress)."""

    tenant_id: str
    key_id: str
    bins: int


@dataclass(frozen=True)
class GalleryUsage:
    """What the whole store holds, over every tenant: bins per key, and templates.

    ``templates`` counts subjects in bins plus staged templates; -1 when it
    was not asked for (it is the costly count: about 5 ms at a million in
    SQLite, against 0.2 ms for the bins).
    """

    keys: tuple[KeyBins, ...]
    templates: int = -1


@dataclass(frozen=True)
class BinInfo:
    bin_id: int
    version: int
    label: str
    occupied: tuple[int, ...]


@dataclass(frozen=True)
class BinSummary:
    """One active bin of a key as listed (ListBins): its id, label, version, subjects held."""

    bin_id: int
    label: str
    version: int
    subjects: int


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    tenant_id: str
    key_id: str
    bin_id: int
    slots: tuple[int, ...]
    expires_at: float


@dataclass(frozen=True)
class SubjectRef:
    tenant_id: str
    handle: str
    key_id: str
    bin_id: int
    slot: int


@dataclass(frozen=True)
class BinData:
    """What a worker needs to rebuild a bin: base ciphertexts plus deltas."""

    bin_id: int
    tenant_id: str
    key_id: str
    version: int
    base: bytes | None
    base_seq: int
    deltas: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class StagedRecord:
    """A single enrollment awaiting its fold into a bin: one ciphertext."""

    staged_id: int
    tenant_id: str
    key_id: str
    label: str
    handle: str
    blob: bytes


@dataclass(frozen=True)
class TokenRecord:
    """One tenant API token as stored: its SHA-256 hash, never the secret.

    ``scopes`` are scope names ("query", "enroll", "manage"), sorted;
    ``revoked_at`` is None while the token is valid.
    """

    token_id: str
    tenant_id: str
    name: str
    token_hash: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None
