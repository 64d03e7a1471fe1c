"""FAISS IVF routing, kept by the tenant with its keys.

The tenant clusters its own templates (spherical k-means, ``faiss.Kmeans``)
into ``nlist`` lists. Each template is enrolled into the bins of its nearest
list, and a query names its ``nprobe`` nearest lists. The server never sees
centroids or list ids, only a keyed *label* per list:

    label(list_id) = hex(HMAC-SHA256(label_key, json([DOMAIN, key_id, version, list_id]))[:16])

so labels are unlinkable across tenants and tenant keys (each key has its own
label key, and the key id is part of the message, so no (key, version, list)
input repeats across keys even under one label key) and across router
versions (re-training bumps the version, and with it every label). Routers
saved before key ids entered the labels (format ``veilface-router/1``, no
``key_id``) keep their old labels, ``f"{version}:{list_id}"``, so galleries
enrolled under them still route; any re-training or key rotation moves to
the new labels.

What routing leaks to the server, even with decoys: the size of every list
(how many templates each label holds) and, per query, the set of labels
named. :meth:`Router.query_labels` adds decoys drawn as whole fake queries
(:meth:`Router.decoy_lists`: the nearest lists of a fake probe placed near
a list drawn in proportion to its training size), so that neither a
label's size nor which labels come together tells a decoy from a real list;
the SDK re-ranks every named label alike (``veilface.client.search``).
Decoys do **not** hide:

- the real lists across repeated queries of the same person: real labels
  recur and decoys vary, so intersecting the label sets of linked queries
  exposes them;
- popularity beyond the training sizes: when the gallery grew unevenly
  since training, or some people are queried far more often than others,
  decoys drawn by training size are distinguishable over many queries;
- a decoy list that holds no bin (the server sees a label matching nothing);
- anything in the scores' timing.

Use the ``strict`` mode (score every bin) where that is not acceptable.

FAISS runs on the GPU when ``faiss.get_num_gpus() > 0`` (the ``faiss-gpu``
build) and on the CPU otherwise, through the same code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from veilface.client.route_decoys import decoy_lists, uniform_decoys
from veilface.client.tail_packing import NO_GROUP, enrollment_label_ids
from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

FORMAT = "veilface-router/2"
#: Routers saved before the key id entered the labels (read, never written).
LEGACY_FORMAT = "veilface-router/1"
LABEL_DOMAIN = "veilface-label/2"
LABEL_KEY_BYTES = 32
LABEL_BYTES = 16
#: faiss warns below this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


def _as_float32_matrix(x: npt.ArrayLike, dim: int | None, what: str) -> Float32Array:
    """``x`` as a C-contiguous float32 [n, d] array, checked for shape and finiteness."""
    try:
        arr = np.ascontiguousarray(x, dtype="float32")
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} must be a numeric array") from exc
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise InvalidArgument(f"{what} must have shape [n, d] with n >= 1, got {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InvalidArgument(
            f"{what} has dimension {arr.shape[1]}, the router was trained on {dim}"
        )
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{what} contains NaN or infinite values")
    return arr


def _l2_normalize(x: Float32Array, what: str) -> Float32Array:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidArgument(f"{what} contains an all-zero row; it has no direction to route")
    return np.ascontiguousarray(x / norms, dtype="float32")


def _search_index(centroids: Float32Array) -> Any:
    """An exact inner-product index over the centroids, on all GPUs when present."""
    index: Any = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


@dataclass(frozen=True, eq=False)
class Router:
    """A trained IVF coarse quantizer with its keyed list labels.

    Attributes
    ----------
    centroids
        float32 [nlist, d], unit-norm rows (normalized on construction when
        they are not already; read-only).
    version
        Router version (>= 1), part of every label: re-training bumps it.
    label_key
        32-byte HMAC key of the labels. Secret: persist it only sealed
        (:class:`veilface.client.tenant_state.TenantState`).
    key_id
        The tenant key whose lists these are; part of every label's HMAC
        message. ``None`` only for routers of the legacy format (labels
        without key id, kept so that their galleries still route).
    list_sizes, list_spread
        Training templates per list, and their RMS distance per dimension
        to their centroid (``None`` for routers saved before they were
        kept): fake queries of decoys are drawn from them
        (:meth:`decoy_lists`).
    tail_groups
        Per list, the group whose shared bins hold the list's last, partly
        filled bin (``-1``: none), or ``None``: every list keeps its own
        tail (:mod:`veilface.client.tail_packing`).
    """

    centroids: Float32Array = field(repr=False)
    version: int
    label_key: bytes = field(repr=False)
    key_id: str | None = None
    list_sizes: tuple[int, ...] | None = field(default=None, repr=False)
    list_spread: float | None = field(default=None, repr=False)
    tail_groups: tuple[int, ...] | None = field(default=None, repr=False)
    _index: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        cents = _as_float32_matrix(self.centroids, None, "centroids")
        if not np.allclose(np.linalg.norm(cents, axis=1), 1.0, rtol=0.0, atol=1e-5):
            cents = _l2_normalize(cents, "centroids")
        elif cents is self.centroids:
            cents = cents.copy()  # never share (or freeze) the caller's array
        cents.setflags(write=False)
        object.__setattr__(self, "centroids", cents)
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise InvalidArgument(f"router version must be an integer >= 1, got {self.version!r}")
        if not isinstance(self.label_key, bytes) or len(self.label_key) != LABEL_KEY_BYTES:
            raise InvalidArgument(
                f"a label key is {LABEL_KEY_BYTES} bytes; make one with secrets.token_bytes(32)"
            )
        if self.key_id is not None and (not isinstance(self.key_id, str) or not self.key_id):
            raise InvalidArgument("a router's key id must be a non-empty string (or None: legacy labels)")
        if self.list_sizes is not None:
            sizes = tuple(int(n) for n in self.list_sizes)
            if len(sizes) != cents.shape[0] or min(sizes) < 0:
                raise InvalidArgument("list sizes must be one count >= 0 per list")
            object.__setattr__(self, "list_sizes", sizes)
        if self.list_spread is not None and not (
            np.isfinite(self.list_spread) and 0.0 <= float(self.list_spread) < 10.0
        ):
            raise InvalidArgument("list spread must be a finite value in [0, 10)")
        if self.tail_groups is not None:
            groups = tuple(int(g) for g in self.tail_groups)
            if len(groups) != cents.shape[0] or (groups and min(groups) < NO_GROUP):
                raise InvalidArgument("tail groups must be one group id >= -1 per list")
            if self.key_id is None:
                raise InvalidArgument("a legacy router (no key id) has no tail groups")
            object.__setattr__(self, "tail_groups", groups)

    def __repr__(self) -> str:
        return (
            f"Router(nlist={self.nlist}, dim={self.dim}, version={self.version}, "
            f"key_id={self.key_id!r})"
        )

    @property
    def nlist(self) -> int:
        """Number of lists."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """Template dimension."""
        return int(self.centroids.shape[1])

    # -- training ---------------------------------------------------------------

    @classmethod
    def train(
        cls,
        templates: npt.ArrayLike,
        *,
        nlist: int,
        label_key: bytes,
        key_id: str | None = None,
        version: int = 1,
        seed: int = 0,
        niter: int = 20,
    ) -> Router:
        """Spherical k-means over L2-normalized templates.

        Parameters
        ----------
        templates
            float [n, d]; each row is L2-normalized before training.
        nlist
            Number of lists, 1 <= nlist <= n. faiss wants at least
            39 * nlist points (a warning is logged below that).
        label_key
            32-byte secret key of the list labels.
        key_id
            The tenant key the lists serve (enters every label). ``None``
            gives legacy labels without key id: only for tests and old files.
        version
            Router version; use the previous version + 1 when re-training.
        seed, niter
            k-means seed and iterations.

        Returns
        -------
        Router

        Raises
        ------
        InvalidArgument
            Bad shape, non-finite or all-zero rows, ``nlist`` out of range.
        """
        x = _l2_normalize(_as_float32_matrix(templates, None, "templates"), "templates")
        n, d = x.shape
        if not isinstance(nlist, int) or not 1 <= nlist <= n:
            raise InvalidArgument(
                f"nlist must be between 1 and the number of training templates ({n}), "
                f"got {nlist!r}; use fewer lists or more templates"
            )
        if niter < 1:
            raise InvalidArgument(f"niter must be >= 1, got {niter}")
        if n < MIN_POINTS_PER_CENTROID * nlist:
            logger.warning(
                "training %d lists on %d templates (faiss advises at least %d); "
                "lists may be unbalanced, consider a smaller nlist",
                nlist,
                n,
                MIN_POINTS_PER_CENTROID * nlist,
            )
        gpu = faiss.get_num_gpus() > 0
        km = faiss.Kmeans(d, nlist, niter=niter, spherical=True, seed=seed, gpu=gpu, verbose=False)
        km.train(x)
        logger.info("trained router: nlist=%d dim=%d version=%d gpu=%s", nlist, d, version, gpu)
        router = cls(np.array(km.centroids, dtype="float32"), version, label_key, key_id)
        assigned = router.assign(x)
        sizes = np.bincount(assigned, minlength=nlist)
        residual = x - router.centroids[assigned]
        spread = float(np.sqrt(np.mean(np.sum(residual.astype(np.float64) ** 2, axis=1)) / d))
        return replace(router, list_sizes=tuple(int(n) for n in sizes), list_spread=spread)

    # -- routing ----------------------------------------------------------------

    def _get_index(self) -> Any:
        if self._index is None:
            object.__setattr__(self, "_index", _search_index(np.array(self.centroids)))
        return self._index

    def assign(self, x: npt.ArrayLike) -> Int64Array:
        """The nearest list (by inner product with the centroids) of each row.

        Parameters
        ----------
        x
            float [n, d].

        Returns
        -------
        numpy.ndarray
            int64 [n], list ids in ``[0, nlist)``.
        """
        xs = _as_float32_matrix(x, self.dim, "templates")
        _, ids = self._get_index().search(xs, 1)
        return np.asarray(ids[:, 0], dtype=np.int64)

    def probe_lists(self, q: npt.ArrayLike, nprobe: int) -> Int64Array:
        """The ``nprobe`` nearest lists of a probe, nearest first.

        Parameters
        ----------
        q
            float [d] (one probe) or [n, d].
        nprobe
            1 <= nprobe <= nlist.

        Returns
        -------
        numpy.ndarray
            int64 [nprobe] for a 1-D probe, int64 [n, nprobe] otherwise.
        """
        if not isinstance(nprobe, int) or not 1 <= nprobe <= self.nlist:
            raise InvalidArgument(
                f"nprobe must be between 1 and nlist={self.nlist}, got {nprobe!r}"
            )
        arr = np.asarray(q)
        single = arr.ndim == 1
        qs = _as_float32_matrix(arr[None, :] if single else arr, self.dim, "probe")
        _, ids = self._get_index().search(qs, nprobe)
        out = np.asarray(ids, dtype=np.int64)
        return out[0] if single else out

    # -- labels -----------------------------------------------------------------

    def _check_id(self, list_id: int) -> int:
        try:
            value = int(list_id)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"a list id must be an integer, got {type(list_id).__name__}"
            ) from exc
        if value != list_id or not 0 <= value < self.nlist:
            raise InvalidArgument(f"list id {list_id!r} is out of range [0, {self.nlist})")
        return value

    def label(self, list_id: int) -> str:
        """The opaque label of a list: 32 hex characters.

        HMAC-SHA256(label_key, m) truncated to 16 bytes, where ``m`` is the
        compact JSON ``[LABEL_DOMAIN, key_id, version, list_id]`` (legacy
        routers, ``key_id`` None: ``f"{version}:{list_id}"``).
        """
        list_id = self._check_id(list_id)
        if self.key_id is None:
            msg = f"{self.version}:{list_id}".encode("ascii")
        else:
            msg = json.dumps(
                [LABEL_DOMAIN, self.key_id, self.version, list_id], separators=(",", ":")
            ).encode("utf-8")
        return hmac.new(self.label_key, msg, hashlib.sha256).digest()[:LABEL_BYTES].hex()

    def labels(self, list_ids: Iterable[int] | npt.NDArray[np.integer[Any]]) -> list[str]:
        """:meth:`label` of each id, in order."""
        return [self.label(int(i)) for i in np.asarray(list(list_ids)).ravel()]

    def tail_label(self, group: int) -> str:
        """The label of a tail group's shared bins (:mod:`veilface.client.tail_packing`).

        Same HMAC as :meth:`label`, over ``[LABEL_DOMAIN, key_id, version,
        "tail", group]``: never equal to a list's label.
        """
        if self.tail_groups is None or not 0 <= int(group) <= max(self.tail_groups, default=-1):
            raise InvalidArgument(f"no tail group {group!r} in this router")
        msg = json.dumps(
            [LABEL_DOMAIN, self.key_id, self.version, "tail", int(group)], separators=(",", ":")
        ).encode("utf-8")
        return hmac.new(self.label_key, msg, hashlib.sha256).digest()[:LABEL_BYTES].hex()

    def search_labels(self, list_ids: Iterable[int]) -> set[str]:
        """Every label holding templates of these lists: theirs and their tail groups'."""
        ids = [self._check_id(i) for i in list_ids]
        out = set(self.labels(ids))
        if self.tail_groups is not None:
            out |= {self.tail_label(g) for g in {self.tail_groups[i] for i in ids} if g != NO_GROUP}
        return out

    def enrollment_labels(self, list_ids: Iterable[int]) -> list[str]:
        """Where a single enrollment of each list's template goes: its tail group's bins if it has one."""
        groups = None if self.tail_groups is None else np.asarray(self.tail_groups, dtype=np.int64)
        ids = np.asarray([self._check_id(i) for i in list_ids], dtype=np.int64)
        return [
            self.tail_label(o) if tail else self.label(o)
            for o, tail in enrollment_label_ids(ids, groups)
        ]

    def decoy_labels(
        self, exclude: Iterable[int], count: int, rng: np.random.Generator | None = None
    ) -> list[str]:
        """Labels of ``count`` other lists chosen uniformly at random
        (:func:`veilface.client.route_decoys.uniform_decoys`; prefer
        :meth:`query_labels`, whose decoys look like real queries)."""
        return self.labels(uniform_decoys(self, exclude, count, rng))

    def query_labels(
        self,
        list_ids: Iterable[int],
        *,
        decoys: int = 0,
        rng: np.random.Generator | None = None,
    ) -> list[str]:
        """Labels to send with a query: the real lists plus ``decoys`` decoys, sorted.

        Labels are pseudorandom, so sorted order says nothing about which
        are real. Each list, real or decoy, brings its tail group's label
        too (:meth:`search_labels`).
        """
        real = [self._check_id(i) for i in np.asarray(list(list_ids)).ravel()]
        fake = self.decoy_lists(real, decoys, group=len(set(real)), rng=rng)
        return sorted(self.search_labels(real) | self.search_labels(fake))

    def decoy_lists(
        self,
        exclude: Iterable[int],
        count: int,
        *,
        group: int,
        rng: np.random.Generator | None = None,
    ) -> list[int]:
        """``count`` decoy lists drawn as whole fake queries of ``group`` lists each
        (:func:`veilface.client.route_decoys.decoy_lists`)."""
        return decoy_lists(self, exclude, count, group=group, rng=rng)

    # -- persistence ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict. It holds the secret label key: seal it."""
        cents = np.ascontiguousarray(self.centroids, dtype="<f4")
        return {
            # a legacy router stays legacy: its labels are what its bins carry
            "format": LEGACY_FORMAT if self.key_id is None else FORMAT,
            **({} if self.key_id is None else {"key_id": self.key_id}),
            "version": self.version,
            "label_key": base64.b64encode(self.label_key).decode("ascii"),
            "centroids": {
                "dtype": "<f4",
                "shape": [int(s) for s in cents.shape],
                "data": base64.b64encode(cents.tobytes()).decode("ascii"),
            },
            **({} if self.list_sizes is None else {"list_sizes": list(self.list_sizes)}),
            **({} if self.list_spread is None else {"list_spread": float(self.list_spread)}),
            **({} if self.tail_groups is None else {"tail_groups": list(self.tail_groups)}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Router:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        InvalidArgument
            Not a router dict of this format, or inconsistent fields.
        """
        try:
            fmt = data["format"]
            if fmt not in (FORMAT, LEGACY_FORMAT):
                raise InvalidArgument(
                    f"not a router of format {FORMAT!r} (got {fmt!r}); upgrade veilface?"
                )
            key_id = data["key_id"] if fmt == FORMAT else None
            if fmt == LEGACY_FORMAT and "key_id" in data:
                raise InvalidArgument("a legacy router dict cannot carry a key id")
            cents = data["centroids"]
            shape = tuple(int(s) for s in cents["shape"])
            if cents["dtype"] != "<f4" or len(shape) != 2:
                raise InvalidArgument("router centroids must be little-endian float32 [nlist, d]")
            raw = base64.b64decode(cents["data"], validate=True)
            label_key = base64.b64decode(data["label_key"], validate=True)
            version = data["version"]
            sizes = data.get("list_sizes")  # optional: absent in routers saved before them
            spread = data.get("list_spread")
            groups = data.get("tail_groups")  # optional: absent in routers saved before them
        except (KeyError, TypeError, binascii.Error) as exc:
            raise InvalidArgument(f"router dict is malformed ({type(exc).__name__})") from exc
        if len(raw) != 4 * shape[0] * shape[1]:
            raise InvalidArgument("router centroid data does not match its shape")
        centroids = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        if sizes is not None and (
            not isinstance(sizes, list) or not all(isinstance(n, int) for n in sizes)
        ):
            raise InvalidArgument("router list sizes must be a list of integers")
        if spread is not None and not isinstance(spread, (int, float)):
            raise InvalidArgument("router list spread must be a number")
        if groups is not None and (
            not isinstance(groups, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups)
        ):
            raise InvalidArgument("router tail groups must be a list of integers")
        return cls(
            centroids,
            version,
            label_key,
            key_id,
            None if sizes is None else tuple(sizes),
            None if spread is None else float(spread),
            None if groups is None else tuple(groups),
        )


__all__ = ["LABEL_BYTES", "LABEL_DOMAIN", "LABEL_KEY_BYTES", "Router"]
