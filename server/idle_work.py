"""Work a scoring worker does while no call is running: encryptions of zero, made ahead.

Every score response is re-randomized with a fresh public-key encryption of
zero (:mod:`veilface.crypto.rerandomize`), 1.3 ms of a bin's 9 ms on this
machine. None depends on the query, so a worker makes them between calls
and a response only adds one. The filler is one daemon thread per worker
process, started on first use. It runs only while no worker call is in
progress (:func:`busy` marks them) and no job is on its way (the server
counts them in shared memory, :attr:`IdleFiller.pending`), makes one
encryption at a time (SEAL holds the GIL for about a millisecond), and
yields between them, so a call that arrives waits at most for the one
encryption under way. It fills the
pool of the key scored last, up to the pool's size
(``WorkerLimits.zero_pool``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from veilface.crypto.rerandomize import Rerandomizer

log = logging.getLogger(__name__)


class IdleFiller:
    """Refills one :class:`Rerandomizer`'s pool whenever its process is idle."""

    def __init__(self) -> None:
        self._busy = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._target: weakref.ref[Rerandomizer] | None = None
        self._thread: threading.Thread | None = None
        # The server's count of jobs submitted to this worker (shared memory), when it keeps one:
        # a job's arguments arrive in many pipe reads, each of which would let the filler in.
        self.pending: Any = None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a worker call in progress (the filler pauses until none is)."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
            if self._target is not None:
                self._wake.set()

    def want(self, rerandomizer: Rerandomizer | None) -> None:
        """Fill this pool next (the key a call just used)."""
        if rerandomizer is None or rerandomizer.pool_size <= 0:
            return
        self._target = weakref.ref(rerandomizer)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="veilface-zero-pool", daemon=True)
            self._thread.start()
        self._wake.set()

    def _queued(self) -> bool:
        return self.pending is not None and self.pending.value > 0

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                target = self._target() if self._target is not None else None
                if target is None or self._busy or self._queued():
                    break
                try:
                    if not target.refill_one():
                        break
                except Exception:  # a worker must never die of its idle work
                    log.exception("could not refill the pool of encryptions of zero")
                    break
                time.sleep(0)  # let an arriving call take the GIL
