"""Everything a tenant keeps, in one file encrypted at rest.

The file is JSON::

    {"format": "veilface-tenant/1", "tenant_id": ..., "key_id": ...,
     "param_set": ..., "dim": ..., "presel_dims": ..., "created_at": ...,
     ["layout_version": 2,] "sealed": <veilface.crypto.keystore sealed blob>}

``layout_version`` (the key's bin layout, :mod:`veilface.crypto.layout`) is
written only when it is not 1: files written before complex packing have
none and keep the version-1 layout their gallery was enrolled with.

The clear header says which tenant and key the file belongs to (so tools can
list files without the passphrase) and is the AAD of the sealed part: it
cannot be edited without the file failing to open. The sealed part holds the
CKKS secret key, the label, handle and photo keys, the mixing seed, the
router, the threshold and the centering vector. (Files written before the
photo key was stored lack it: it is then derived from the handle key, as it
was when they were written.)

A *kiosk* state (:mod:`veilface.client.kiosk`, ``veilface keys export --role
kiosk``) holds only what identifying and verifying need. Its header carries
``"role": "kiosk"`` (authenticated like the rest); a full state's has no role.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veilface.client.handles import KEY_BYTES as HANDLE_KEY_BYTES
from veilface.client.handles import HandleCodec
from veilface.client.photos import PHOTO_KEY_BYTES, legacy_photo_key, new_photo_key
from veilface.client.routing import LABEL_KEY_BYTES, Router
from veilface.client.search_defaults import SearchDefaults
from veilface.client.unlock import resolve_secret  # re-exported: it used to live here
from veilface.crypto.keys import TenantKeys
from veilface.crypto.keystore import (
    PassphraseKdf,
    open_blob,
    read_private_file,
    seal_blob,
)
from veilface.crypto.layout import CURRENT_LAYOUT_VERSION, LAYOUT_VERSIONS, LEGACY_LAYOUT_VERSION
from veilface.crypto.params import DEFAULT_PARAM_SET, get_param_set
from veilface.errors import InvalidArgument, KeystoreError, VeilfaceError

logger = logging.getLogger(__name__)

FORMAT = "veilface-tenant/1"
DEFAULT_THRESHOLD = 0.5
_HEADER_FIELDS = ("format", "tenant_id", "key_id", "param_set", "dim", "presel_dims", "created_at")
#: What a state is for: ``full`` (the back office: everything) or ``kiosk``
#: (identify and verify only; the SDK refuses the rest before any RPC).
ROLES = ("full", "kiosk")

FloatArray = npt.NDArray[np.float64]


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(eq=False)
class TenantState:
    """A tenant's keys, router and decision threshold.

    Attributes
    ----------
    tenant_id, key_id
        Which tenant, and which of its keys (key rotation enrolls under a
        new ``key_id`` while the old one keeps serving).
    param_set, dim, presel_dims
        CKKS parameter set name, template dimension, preselection window
        (0: the layout's default).
    secret_key
        SEAL secret key bytes (``TenantKeys.secret_key_bytes()``).
    label_key, handle_key
        32-byte HMAC key of the list labels; 64-byte AES-SIV key of the
        subject handles.
    mixing_seed
        Seed of the random orthogonal matrix applied to templates and probes.
    router
        The IVF router, once trained.
    threshold
        Cosine similarity at or above which an identification is accepted.
    center
        float64 [dim] centering vector of the templates (fixed once per key
        by the SDK's calibration), or None before calibration.
    photo_key
        32-byte AES-256-GCM key of the key's sealed photos. Left empty, it
        is derived from the handle key (what states written before it was
        stored used). Empty in a kiosk state.
    role
        ``"full"`` or ``"kiosk"`` (see :data:`ROLES`).
    layout_version
        The key's bin layout (1: one template per slot, states written
        before complex packing; 2: two per slot, new keys).
    created_at
        ISO 8601 UTC time of creation.
    search
        The routing and preselection parameters the SDK chose for this
        key's gallery (:mod:`veilface.client.route_training`), or None
        (states written before, or routing never trained): what
        ``identify`` uses unless told otherwise.

    The secret fields are left out of ``repr``.
    """

    tenant_id: str
    key_id: str
    param_set: str
    dim: int
    presel_dims: int
    secret_key: bytes = field(repr=False)
    label_key: bytes = field(repr=False)
    handle_key: bytes = field(repr=False)
    mixing_seed: int = field(repr=False)
    router: Router | None = None
    threshold: float = DEFAULT_THRESHOLD
    created_at: str = ""
    center: FloatArray | None = field(default=None, repr=False)
    photo_key: bytes = field(default=b"", repr=False)
    role: str = "full"
    layout_version: int = LEGACY_LAYOUT_VERSION
    search: SearchDefaults | None = None
    _keys: TenantKeys | None = field(default=None, init=False, repr=False)
    _mixing: FloatArray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("tenant_id", "key_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"{name} must be a non-empty string")
        get_param_set(self.param_set)
        if not isinstance(self.dim, int) or self.dim < 2:
            raise InvalidArgument(f"template dimension must be an integer >= 2, got {self.dim!r}")
        if not isinstance(self.presel_dims, int) or self.presel_dims < 0:
            raise InvalidArgument(f"presel_dims must be an integer >= 0, got {self.presel_dims!r}")
        if self.layout_version not in LAYOUT_VERSIONS:
            raise InvalidArgument(
                f"unknown bin layout version {self.layout_version!r}; known: {list(LAYOUT_VERSIONS)}"
            )
        if self.role not in ROLES:
            raise InvalidArgument(f"a tenant state's role is one of {list(ROLES)}, got {self.role!r}")
        kiosk = self.role == "kiosk"
        if len(self.label_key) != LABEL_KEY_BYTES and not (kiosk and not self.label_key and self.router is None):
            raise InvalidArgument(f"the label key must be {LABEL_KEY_BYTES} bytes")
        if len(self.handle_key) != HANDLE_KEY_BYTES:
            raise InvalidArgument(f"the handle key must be {HANDLE_KEY_BYTES} bytes")
        if kiosk:
            if self.photo_key:
                raise InvalidArgument("a kiosk state holds no photo key")
        else:
            if not self.photo_key:
                self.photo_key = legacy_photo_key(self.handle_key)
            if len(self.photo_key) != PHOTO_KEY_BYTES:
                raise InvalidArgument(f"the photo key must be {PHOTO_KEY_BYTES} bytes")
        if not self.secret_key:
            raise InvalidArgument("the secret key is empty")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise InvalidArgument(f"threshold is a cosine in [-1, 1], got {self.threshold!r}")
        if self.router is not None:
            self._check_router(self.router)
        self._check_center()
        if not self.created_at:
            self.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def _check_center(self) -> None:
        if self.center is None:
            return
        center = np.asarray(self.center, dtype=np.float64)
        if center.shape != (self.dim,) or not np.isfinite(center).all():
            raise InvalidArgument(f"the centering vector must be finite float64 [{self.dim}]")
        self.center = center

    def _check_router(self, router: Router) -> None:
        if router.dim != self.dim:
            raise InvalidArgument(
                f"the router was trained on dimension {router.dim}, the tenant uses {self.dim}"
            )
        if router.label_key != self.label_key:
            raise InvalidArgument("the router's label key is not this tenant's label key")
        if router.key_id is not None and router.key_id != self.key_id:
            raise InvalidArgument(
                f"the router labels lists of key {router.key_id!r}, this state is key {self.key_id!r}"
            )

    # -- creation -----------------------------------------------------------------

    @classmethod
    def new(
        cls,
        tenant_id: str,
        *,
        dim: int = 128,
        param_set: str = DEFAULT_PARAM_SET,
        key_id: str = "k1",
        presel_dims: int = 0,
        layout_version: int = CURRENT_LAYOUT_VERSION,
    ) -> TenantState:
        """Fresh keys for a tenant: CKKS secret key, label and handle keys, mixing seed.

        ``layout_version``: the bin layout (the current one unless a test or
        a tool needs the old one).

        Raises
        ------
        InvalidArgument
            Unknown parameter set, or a dimension / preselection window the
            layout cannot hold.
        """
        keys = TenantKeys.generate(
            dim, param_set=param_set, presel_dims=presel_dims, layout_version=layout_version
        )
        state = cls(
            tenant_id=tenant_id,
            key_id=key_id,
            param_set=param_set,
            dim=dim,
            presel_dims=presel_dims,
            layout_version=layout_version,
            secret_key=keys.secret_key_bytes(),
            label_key=secrets.token_bytes(LABEL_KEY_BYTES),
            handle_key=HandleCodec.new_key(),
            mixing_seed=secrets.randbits(128),
            photo_key=new_photo_key(),
        )
        state._keys = keys
        logger.info("created tenant state for %s (key %s, %s)", tenant_id, key_id, param_set)
        return state

    def rotated(self, key_id: str, *, param_set: str | None = None) -> TenantState:
        """A new key for the same tenant (key rotation, renewing everything the server sees).

        Fresh CKKS secret key, mixing seed, label key, handle key and photo
        key; only the threshold carries over (the router is retrained by the
        move, the centering vector recomputed). So nothing the server stores
        under the new key (ciphertexts, list labels, subject handles, photo
        blobs and ids) can be matched to what it stored under the old one
        (ISO/IEC 24745 renewability and unlinkability).
        Register it, then move the gallery with ``VeilClient.repack(target=...)``
        while the old key keeps serving: the move maps each subject's old
        handle to its new one and re-seals its photos. Keep the old state
        until the move has finished (it is needed to read the old gallery).
        """
        if key_id == self.key_id:
            raise InvalidArgument("a rotated key needs a new key id")
        ps = param_set or self.param_set
        # A rotation moves the gallery, so the new key takes the current layout.
        keys = TenantKeys.generate(self.dim, param_set=ps, presel_dims=self.presel_dims)
        state = TenantState(
            tenant_id=self.tenant_id,
            key_id=key_id,
            param_set=ps,
            dim=self.dim,
            presel_dims=self.presel_dims,
            layout_version=keys.layout.version,
            secret_key=keys.secret_key_bytes(),
            label_key=secrets.token_bytes(LABEL_KEY_BYTES),
            handle_key=HandleCodec.new_key(),
            mixing_seed=secrets.randbits(128),
            threshold=self.threshold,
            photo_key=new_photo_key(),
        )
        state._keys = keys
        logger.info("rotated tenant %s from key %s to %s", self.tenant_id, self.key_id, key_id)
        return state

    def export_kiosk(self, *, keep_router: bool = True) -> TenantState:
        """A copy of this state for a kiosk: identify and verify, nothing else.

        What it keeps (the router only with ``keep_router``) and leaves out:
        :func:`veilface.client.kiosk.export_kiosk`. FailedPrecondition while
        the key's centering vector is not fixed (export after the key's
        first enrollment, from the state saved then).
        """
        from veilface.client.kiosk import export_kiosk

        return export_kiosk(self, keep_router=keep_router)

    # -- derived objects ------------------------------------------------------------

    def keys(self) -> TenantKeys:
        """The CKKS keys (loaded once from :attr:`secret_key`, then cached)."""
        if self._keys is None:
            self._keys = TenantKeys.from_secret_bytes(
                self.secret_key,
                dim=self.dim,
                param_set=self.param_set,
                presel_dims=self.presel_dims,
                layout_version=self.layout_version,
            )
        return self._keys

    def handles(self) -> HandleCodec:
        """The subject-handle codec of this tenant."""
        return HandleCodec(self.handle_key)

    def mixing_matrix(self) -> FloatArray:
        """A random orthogonal matrix Q, float64 [dim, dim], fixed by :attr:`mixing_seed`.

        Templates and probes are multiplied by Q (``x @ Q.T``) before
        encryption. Q preserves inner products (cosine scores are unchanged)
        and spreads each template's energy evenly over the coordinates, so
        that the preselection window holds an equal, representative share
        of every template, whatever the embedding model's coordinate order.

        Q is the Q factor of a seeded Gaussian matrix, with column signs
        fixed so that R has a positive diagonal (Haar-distributed). The
        array is cached and read-only.
        """
        if self._mixing is None:
            rng = np.random.default_rng(self.mixing_seed)
            q, r = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
            signs = np.sign(np.diag(r))
            signs[signs == 0] = 1.0
            q = q * signs[None, :]
            q.setflags(write=False)
            self._mixing = q
        return self._mixing

    def train_router(
        self, templates: npt.ArrayLike, *, nlist: int, seed: int = 0, niter: int = 20
    ) -> Router:
        """Train (or re-train) the router on templates and keep it.

        The version is one more than the current router's, so every list
        label changes: re-enroll the gallery under the new router.
        """
        version = 1 if self.router is None else self.router.version + 1
        router = Router.train(
            templates,
            nlist=nlist,
            label_key=self.label_key,
            key_id=self.key_id,
            version=version,
            seed=seed,
            niter=niter,
        )
        self.router = router
        return router

    # -- persistence ------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "format": FORMAT,
            "tenant_id": self.tenant_id,
            "key_id": self.key_id,
            "param_set": self.param_set,
            "dim": self.dim,
            "presel_dims": self.presel_dims,
            "created_at": self.created_at,
        }
        if self.role != "full":  # full states keep the header older versions wrote
            header["role"] = self.role
        if self.layout_version != LEGACY_LAYOUT_VERSION:  # likewise for old layouts
            header["layout_version"] = self.layout_version
        return header

    def _secret_payload(self) -> bytes:
        self._check_center()
        return _canonical_json(
            {
                "secret_key": _b64e(self.secret_key),
                "label_key": _b64e(self.label_key),
                "handle_key": _b64e(self.handle_key),
                "photo_key": _b64e(self.photo_key),
                "mixing_seed": self.mixing_seed,
                "router": None if self.router is None else self.router.to_dict(),
                "threshold": float(self.threshold),
                "center": None if self.center is None else [float(v) for v in self.center],
                # absent when None: files read by older versions stay as they were
                **({} if self.search is None else {"search_defaults": self.search.to_dict()}),
            }
        )

    def save(
        self,
        path: Path,
        *,
        passphrase: str | None = None,
        key_file: Path | None = None,
        kdf: PassphraseKdf | None = None,
        scrypt_n: int | None = None,
    ) -> None:
        """Write the state to ``path`` atomically, sealed, with mode 0600.

        The file is written to a temporary file created 0600 in the same
        directory, synced, then renamed over ``path``: a reader never sees
        a partial file, and the secrets are never in a file others can read.

        Parameters
        ----------
        path
            Destination; an existing file is replaced atomically.
        passphrase, key_file
            Exactly one (see :func:`veilface.crypto.keystore.seal_blob`).
        kdf
            Cost of the passphrase KDF (default: Argon2id, see
            :func:`veilface.crypto.keystore.default_passphrase_kdf`); lower
            it only in tests.
        scrypt_n
            Older knob: scrypt with this cost instead (lower it only in tests).

        Raises
        ------
        InvalidArgument, KeystoreError
            Bad secret arguments, unreadable key file.
        OSError
            The file cannot be written.
        """
        path = Path(path)
        header = self._header()
        sealed = seal_blob(
            self._secret_payload(),
            aad=_canonical_json(header),
            passphrase=passphrase,
            key_file=key_file,
            kdf=kdf,
            scrypt_n=scrypt_n,
        )
        data = json.dumps({**header, "sealed": sealed}, indent=2, sort_keys=True).encode() + b"\n"
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            logger.debug("could not fsync directory %s", directory)
        logger.info("saved tenant state for %s (key %s) to %s", self.tenant_id, self.key_id, path)

    @classmethod
    def load(
        cls, path: Path, *, passphrase: str | None = None, key_file: Path | None = None
    ) -> TenantState:
        """Read and open a file written by :meth:`save` (by this version or an older one).

        Raises
        ------
        KeystoreError
            Missing, unreadable, truncated or foreign file; a file (or key
            file) that group or others may read or write (fix: ``chmod 600``);
            wrong passphrase or key file; any edit to the header or the
            sealed part.
        InvalidArgument
            Neither or both of ``passphrase`` and ``key_file``.
        """
        path = Path(path)
        raw = read_private_file(path, what="tenant file")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KeystoreError(
                f"{str(path)!r} is not a veilface tenant file (not JSON, or truncated)"
            ) from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else None
            raise KeystoreError(
                f"{str(path)!r} is not a veilface tenant file of format {FORMAT!r} "
                f"(found {str(found)[:40]!r})"
            )
        missing = [k for k in (*_HEADER_FIELDS, "sealed") if k not in doc]
        if missing:
            raise KeystoreError(f"tenant file {str(path)!r} lacks fields {missing}; it is corrupt")
        header = {k: doc[k] for k in _HEADER_FIELDS}
        for optional in ("role", "layout_version"):  # authenticated with the rest of the header
            if optional in doc:
                header[optional] = doc[optional]
        payload = open_blob(
            doc["sealed"], aad=_canonical_json(header), passphrase=passphrase, key_file=key_file
        )
        try:
            secret = json.loads(payload)
            router_doc = secret["router"]
            state = cls(
                tenant_id=header["tenant_id"],
                key_id=header["key_id"],
                param_set=header["param_set"],
                dim=header["dim"],
                presel_dims=header["presel_dims"],
                secret_key=base64.b64decode(secret["secret_key"], validate=True),
                label_key=base64.b64decode(secret["label_key"], validate=True),
                handle_key=base64.b64decode(secret["handle_key"], validate=True),
                mixing_seed=int(secret["mixing_seed"]),
                router=None if router_doc is None else Router.from_dict(router_doc),
                threshold=float(secret["threshold"]),
                created_at=header["created_at"],
                center=None if secret["center"] is None else np.asarray(secret["center"]),
                # absent from files older than the stored photo key: derived as then
                photo_key=base64.b64decode(secret.get("photo_key", ""), validate=True),
                role=header.get("role", "full"),
                layout_version=header.get("layout_version", LEGACY_LAYOUT_VERSION),
                search=(
                    SearchDefaults.from_dict(secret["search_defaults"])
                    if secret.get("search_defaults") is not None
                    else None
                ),
            )
        except (VeilfaceError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            # Authenticated, so written by a veilface that disagrees with this one.
            raise KeystoreError(
                f"tenant file {str(path)!r} opened but its contents are not understood "
                f"({type(exc).__name__}); was it written by another veilface version?"
            ) from exc
        logger.info("loaded tenant state for %s (key %s)", state.tenant_id, state.key_id)
        return state


__all__ = ["DEFAULT_THRESHOLD", "FORMAT", "ROLES", "TenantState", "resolve_secret"]
