"""The search parameters the SDK chose for a key, kept in the tenant state.

:func:`veilface.client.route_tuning.tune_routing` measures them on the
tenant's own templates when routing is trained (and again at each re-pack);
``VeilClient.identify`` uses them unless the caller passes its own. They are
tenant secrets only as far as they describe the gallery (its size, how well
it clusters): they are sealed with the rest of the state and never sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from veilface.errors import InvalidArgument

#: What ``identify`` used before the SDK chose (and still uses without a choice).
LEGACY_NPROBE = 8
LEGACY_K = 32
#: Strict mode's default ``k``: exhaustive, every template scored whole in one
#: stage (exact; since the one-stage Preselect it is cheaper than preselecting
#: every bin and then re-ranking the three quarters of them 32 candidates span
#: at 100,000, and a 1,000,000 strict search meets its 2 s target this way).
STRICT_K = 0
MODES = ("routed", "strict")


@dataclass(frozen=True)
class SearchDefaults:
    """Routing and preselection parameters chosen for one key's gallery.

    Attributes
    ----------
    mode
        ``"routed"``: routed queries use the parameters below. ``"strict"``:
        routing was not trained, or was trained on too few templates, or
        would not be cheaper than strict; a routed query then runs strict
        and says so (``Identification.mode``, ``Identification.fallback``).
    reason
        Why ``mode`` is strict (empty when routed).
    nlist, nprobe, k
        Lists of the router (0: no router), lists a routed query probes,
        candidates it keeps after preselection (``ceil(k / nprobe)`` bins
        re-ranked per list).
    presel_dims
        The key's preselection window the figures were measured with.
    advised_presel_dims
        The window that would make the cheapest query at the target (a key
        property: it applies only to a new key, ``TenantState.rotated``).
    target_recall
        Share of pseudo-probes whose exhaustive top-1 must be re-ranked.
    recall, routing_recall
        Measured on held-out pseudo-probes (not those the choice was made
        on): their exhaustive top-1 re-ranked; that template's list probed.
    tuning_recall
        The same as ``recall`` on the probes the choice was made on.
    probes
        Held-out pseudo-probes behind ``recall``.
    bins_searched, bins_reranked
        Mean bins a query preselects and re-ranks (held-out probes).
    cost_ms
        Modelled single-core arithmetic per query (products, key switches,
        masking and decryption, from the roofline in docs/architecture.md):
        a count of work, not a timing.
    gallery
        Templates the choice was measured on.
    auto
        True when the SDK chose ``nlist`` (a re-pack then chooses again);
        False when the caller gave it (a re-pack keeps it).
    tail_groups
        Groups of shared tail bins (:mod:`veilface.client.tail_packing`;
        0: each list keeps its own last bin).
    """

    mode: str = "routed"
    reason: str = ""
    nlist: int = 0
    nprobe: int = LEGACY_NPROBE
    k: int = LEGACY_K
    presel_dims: int = 0
    advised_presel_dims: int = 0
    target_recall: float = 0.0
    recall: float = math.nan
    routing_recall: float = math.nan
    tuning_recall: float = math.nan
    probes: int = 0
    bins_searched: float = math.nan
    bins_reranked: float = math.nan
    cost_ms: float = math.nan
    gallery: int = 0
    auto: bool = True
    tail_groups: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"search defaults mode is one of {list(MODES)}, got {self.mode!r}")
        for name in (
            "nlist", "nprobe", "k", "presel_dims", "advised_presel_dims", "probes", "gallery", "tail_groups"
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"search defaults {name} must be an integer >= 0, got {value!r}")
        if self.mode == "routed" and (self.nprobe < 1 or self.nlist < 1):
            raise InvalidArgument("routed search defaults need nlist >= 1 and nprobe >= 1")
        if self.mode == "strict" and not self.reason:
            raise InvalidArgument("strict search defaults say why (reason)")

    @property
    def routed(self) -> bool:
        """Whether routed queries route (False: they run strict, see :attr:`reason`)."""
        return self.mode == "routed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN, for a figure not measured, as None)."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchDefaults:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (a newer SDK wrote them)."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("search defaults must be a JSON object")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.type in ("float", float):
                kw[f.name] = math.nan if value is None else float(value)
            else:
                kw[f.name] = value
        return cls(**kw)


__all__ = ["LEGACY_K", "LEGACY_NPROBE", "STRICT_K", "SearchDefaults"]
