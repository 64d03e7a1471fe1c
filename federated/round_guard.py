"""Fail a federated run, with the clients' reasons, when a round trained nothing.

Flower's strategies log a reply that carries an error and go on; when *every*
reply of a round failed, ``Strategy.start`` keeps the old global model and
runs the next round, and the run ends as ``finished:completed`` with the
model it started from. Two guards stop that:

- :class:`RoundGuardGrid` wraps the :class:`~flwr.serverapp.Grid` the
  ServerApp hands to a task (:func:`veilface.federated.server_app.make_server_app`
  does it for every task). A ``send_and_receive`` that sent messages and got
  no reply without an error raises :class:`~veilface.errors.TrainingFailed`
  naming the round, the message type and the clients' reasons (deduplicated,
  as ``ErrorClass: message``). It sits under every strategy wrapper (DP,
  SecAgg+), so it sees the clients' own replies.
- :func:`require_model_changed` refuses a final model that is empty or equal
  to the initial one; the tasks call it before writing their last checkpoint.

Rounds in which some clients failed and others succeeded go on as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from veilface.errors import TrainingFailed
from veilface.federated.grid_proxy import ForwardingGrid

logger = logging.getLogger(__name__)

__all__ = [
    "RoundGuardGrid",
    "client_failure_reasons",
    "model_changed",
    "require_model_changed",
]

# Flower's ClientApp runtime formats an exception as "<class 'pkg.Err'>:<'message'>".
_FLOWER_REASON = re.compile(
    r"^<class '(?:[\w.]*\.)?(?P<name>\w+)'>:<'(?P<message>.*)'>$", re.DOTALL
)
_MAX_REASONS = 5


def _clean_reason(reason: str) -> str:
    match = _FLOWER_REASON.match(reason.strip())
    if match is None:
        return reason.strip()
    return f"{match.group('name')}: {match.group('message')}"


def client_failure_reasons(replies: Iterable[Message]) -> list[str]:
    """The distinct error reasons of the replies that carry an error, in order of arrival.

    Flower's ``"<class 'veilface.errors.InvalidArgument'>:<'text'>"`` becomes
    ``"InvalidArgument: text"``; a reply without a reason gives
    ``"error code N"``.
    """
    seen: dict[str, None] = {}
    for msg in replies:
        if not msg.has_error():
            continue
        reason = msg.error.reason
        text = _clean_reason(reason) if reason else f"error code {msg.error.code}"
        seen.setdefault(text, None)
    return list(seen)


def _round_of(messages: list[Message]) -> int | None:
    for msg in messages:
        for record in msg.content.config_records.values():
            value = record.get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


class RoundGuardGrid(ForwardingGrid):
    """A :class:`~flwr.serverapp.Grid` that raises when no client of a round succeeded.

    Every call is delegated to ``grid``; :meth:`send_and_receive` also checks
    the replies.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid Flower gave the ServerApp.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait, and return the replies; raise if messages went out and none succeeded.

        Raises
        ------
        TrainingFailed
            Every reply carried an error or no reply came back; the message
            names the round (when the messages carry ``server-round``), the
            message type, how many clients failed or did not answer, and
            their distinct reasons.
        """
        batch = list(messages)
        replies = list(self._grid.send_and_receive(batch, timeout=timeout))
        if not batch or any(not r.has_error() for r in replies):
            return replies
        kind = batch[0].metadata.message_type
        rnd = _round_of(batch)
        where = f"round {rnd}" if rnd is not None else "a round"
        reasons = client_failure_reasons(replies)
        failed = sum(1 for r in replies if r.has_error())
        silent = len(batch) - len(replies)
        parts = [f"{failed} failed"] if failed else []
        if silent:
            parts.append(f"{silent} did not reply within {timeout} s")
        shown = reasons[:_MAX_REASONS]
        more = f" (+{len(reasons) - len(shown)} more)" if len(reasons) > len(shown) else ""
        why = "; ".join(shown) + more if shown else "no reason given"
        message = (
            f"{where}: no client succeeded in {kind!r} ({len(batch)} sent: "
            f"{', '.join(parts)}); clients said: {why}"
        )
        logger.error("%s", message)
        raise TrainingFailed(message)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    # transports turn 0-d arrays (BatchNorm's num_batches_tracked) into (1,)
    return a.size == b.size and np.array_equal(a.reshape(-1), b.reshape(-1))


def model_changed(initial: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray]) -> bool:
    """True unless ``final`` has the names of ``initial`` and every array holds the same values.

    A 0-d array and its one-element ``(1,)`` copy count as equal.
    """
    return set(final) != set(initial) or not all(_same(final[k], initial[k]) for k in final)


def require_model_changed(
    initial: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray], *, what: str = "the run"
) -> None:
    """Raise unless ``final`` is a non-empty model that differs from ``initial``.

    Parameters
    ----------
    initial, final : mapping of str to numpy.ndarray
        Arrays by name (any shapes and dtypes).
    what : str, keyword-only
        Names the run or phase in the message.

    Raises
    ------
    TrainingFailed
        ``final`` is empty, or every array of ``final`` equals the one of the
        same name in ``initial`` (and no name was added or removed).
    """
    if not final:
        raise TrainingFailed(
            f"{what} produced an empty global model (no round aggregated a client update); "
            "no final checkpoint written; see the clients' errors in the run log"
        )
    if not model_changed(initial, final):
        raise TrainingFailed(
            f"{what} left the global model unchanged (no round aggregated a client update); "
            "no final checkpoint written; see the clients' errors in the run log"
        )
