"""The tenant's own copy of each bin's slot -> handle map, kept by bin version.

Identification ends with the tenant knowing the winning (bin, slot). Asking
the server for that slot's handle (the old ``ResolveHandles``) told it who
matched. Instead the SDK keeps, per bin, the map from slots to handles, and
brings it up to date with ``FetchSlotMaps`` whenever a Preselect answer
shows a bin at a version it does not hold: for every searched bin, never
only the candidates, so the sync tells the server nothing the Preselect did
not (which bins were searched, and which of them changed since this client
last saw them). The winner's handle is then found here and decoded locally.

Every change of a bin's subjects bumps its version on the server, and the
server reads a bin's version before its subjects, so a map held at version
``v`` is at least as new as ``v``.

Memory: about 125 bytes per enrolled template of the bins held (a full bin
of 2,048 slots is about 250 KB); at most ``max_bins`` bins are kept, least
recently used first out (an evicted bin is synced again when next searched).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from veilface.client.convert import SlotMapUpdate
from veilface.errors import InvalidArgument

log = logging.getLogger(__name__)

#: Bins per FetchSlotMaps call: the server's bound (proto/veilface/v1/veilface.proto).
SLOT_MAPS_PER_CALL = 64
#: Enough for the largest query the server accepts (4,096 bins by default).
DEFAULT_MAX_BINS = 4096


@dataclass(frozen=True)
class BinSlotMap:
    """One bin's map: ``handles[i]`` is enrolled at ``slots[i]`` (int32 ascending)."""

    version: int
    slots: npt.NDArray[np.int32]
    handles: tuple[str, ...]

    def handle(self, slot: int) -> str | None:
        i = int(np.searchsorted(self.slots, slot))
        if i < self.slots.size and int(self.slots[i]) == slot:
            return self.handles[i]
        return None


@dataclass(frozen=True)
class SyncReport:
    """What one :meth:`SlotMaps.sync` did: bins asked for, maps received, calls made."""

    asked: int = 0
    received: int = 0
    calls: int = 0


class SlotMaps:
    """Slot -> handle maps of the bins this client has searched (thread-safe).

    Parameters
    ----------
    max_bins
        Bins kept (least recently used evicted first); at least the number of
        bins one query searches, or every query syncs again.
    """

    def __init__(self, *, max_bins: int = DEFAULT_MAX_BINS) -> None:
        if max_bins < 1:
            raise InvalidArgument("max_bins must be >= 1")
        self.max_bins = max_bins
        self._maps: OrderedDict[int, BinSlotMap] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    def version(self, bin_id: int) -> int:
        """The version held for ``bin_id`` (0: none)."""
        with self._lock:
            m = self._maps.get(bin_id)
            return 0 if m is None else m.version

    def stale(self, bins: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Of ``(bin id, current version)`` pairs, those not held at that version.

        Returns ``(bin id, version held, 0 for none)`` pairs: what FetchSlotMaps
        is asked with. Bins held at their current version count as used.
        """
        out = []
        with self._lock:
            for bin_id, version in bins:
                m = self._maps.get(bin_id)
                if m is not None and m.version == version:
                    self._maps.move_to_end(bin_id)
                else:
                    out.append((bin_id, 0 if m is None else m.version))
        return out

    def put(self, update: SlotMapUpdate) -> None:
        if len(update.slots) != len(update.handles):
            raise InvalidArgument("a slot map needs one handle per slot")
        order = np.argsort(np.asarray(update.slots, dtype=np.int64), kind="stable")
        slots = np.asarray(update.slots, dtype=np.int32)[order]
        handles = tuple(update.handles[i] for i in order)
        with self._lock:
            self._maps[update.bin_id] = BinSlotMap(update.version, slots, handles)
            self._maps.move_to_end(update.bin_id)
            while len(self._maps) > self.max_bins:
                self._maps.popitem(last=False)

    def handle(self, bin_id: int, slot: int) -> str | None:
        """The handle enrolled at ``slot`` of ``bin_id`` (None: unknown or empty slot)."""
        with self._lock:
            m = self._maps.get(bin_id)
        return None if m is None else m.handle(slot)

    def sync(
        self,
        bins: Sequence[tuple[int, int]],
        fetch: Callable[[list[tuple[int, int]]], list[SlotMapUpdate]],
    ) -> SyncReport:
        """Bring the maps of ``bins`` (bin id, current version) up to date.

        ``fetch`` performs one FetchSlotMaps call for at most
        :data:`SLOT_MAPS_PER_CALL` ``(bin id, version held)`` pairs. Pass
        every bin a query searched: which of them are asked for then depends
        only on what this client searched before, not on its candidates.
        """
        todo = self.stale(bins)
        received = calls = 0
        for start in range(0, len(todo), SLOT_MAPS_PER_CALL):
            for update in fetch(todo[start : start + SLOT_MAPS_PER_CALL]):
                self.put(update)
                received += 1
            calls += 1
        if len(todo) > received:
            log.debug("%d searched bins are gone since the query", len(todo) - received)
        return SyncReport(len(todo), received, calls)


__all__ = ["DEFAULT_MAX_BINS", "SLOT_MAPS_PER_CALL", "BinSlotMap", "SlotMaps", "SyncReport"]
