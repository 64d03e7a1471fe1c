"""What a run on the Deployment Engine ended with, and why it failed.

The ServerApp's exception reaches the Flower CLI in two places: the run's
``status-details`` (``flwr ls --format json``: ``"ServerApp failed with
exception: <message>"``) and the traceback in the run's log (``flwr run
--stream`` / ``flwr log``). :func:`server_error` reads the first and falls
back to the second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["RunOutcome", "server_error"]

_DETAILS_PREFIX = "ServerApp failed with exception:"
_GENERIC_DETAILS = ("", "Task failed with unknown error.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?P<name>[A-Za-z_]\w*)(?::\s?(?P<msg>.*))?$")


def _traceback_error(log: str) -> str | None:
    """``Name: message`` of the last traceback in ``log``, or None."""
    lines = [_ANSI.sub("", line) for line in log.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call")]
    if not starts:
        return None
    for line in lines[starts[-1] + 1 :]:
        if not line.strip() or line[0].isspace():
            continue  # frames, source lines, carets
        match = _EXCEPTION_LINE.match(line.strip())
        if match is None:
            return line.strip()
        msg = match.group("msg")
        return f"{match.group('name')}: {msg}" if msg else match.group("name")
    return None


def server_error(details: str, log: str) -> str | None:
    """The ServerApp's error: from the run's status details, else from its log's traceback.

    Parameters
    ----------
    details : str
        ``status-details`` of the run as ``flwr ls --format json`` reports it.
    log : str
        The run's log (``flwr run --stream`` output).

    Returns
    -------
    str or None
        e.g. ``"no proxy at ... set run-config lfw-dir ..."``; None when
        neither names an error.
    """
    text = details.strip()
    if text.startswith(_DETAILS_PREFIX):
        text = text[len(_DETAILS_PREFIX) :].strip()
    if text not in _GENERIC_DETAILS:
        return text
    return _traceback_error(log)


@dataclass(frozen=True)
class RunOutcome:
    """What :meth:`~veilface.federated.deploy.LocalDeployment.run` observed.

    Attributes
    ----------
    run_id : int
        The SuperLink's run id.
    status : str
        Final status as ``flwr ls`` reports it (``"finished:completed"`` on success).
    seconds : float
        Wall time from submission to the final status.
    server_log : str
        ``flwr run --stream`` output of the run (the ServerApp's log lines).
    details : str
        ``status-details`` of the run (the ServerApp's exception when it failed).
    """

    run_id: int
    status: str
    seconds: float
    server_log: str
    details: str = ""

    @property
    def ok(self) -> bool:
        """True when the run completed."""
        return self.status.endswith("completed")

    @property
    def error(self) -> str | None:
        """Why the run did not complete (None when it did).

        The ServerApp's exception message when there is one (see
        :func:`server_error`), else ``"the run ended <status>"``.
        """
        if self.ok:
            return None
        return server_error(self.details, self.server_log) or f"the run ended {self.status!r}"
