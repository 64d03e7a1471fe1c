"""Files a federated run leaves behind: checkpoints, per-round metrics, plots.

Layout of ``out_dir``::

    metrics.json              {"task": ..., "rounds": [{"round": r, "<name>": value, ...}, ...]}
    metrics.png               one panel per metric name, value against round
    checkpoints/round_0003.npz  arrays + "__meta__" (model id, fingerprint, round)
    checkpoints/latest.npz    copy of the newest checkpoint of a trained model

Every write goes to a temporary file in the same folder and is then renamed
(:func:`os.replace`), so a crash never leaves a half-written file.

A checkpoint records the ``model_id`` the caller gives and a fingerprint of
the array names, shapes and dtypes; :func:`load_checkpoint` refuses a file
whose model id or fingerprint differs from what the caller expects, with a
:class:`~veilface.errors.CheckpointError` (re-exported here), the error the
model loaders raise for foreign weights files too.

Example
-------
>>> art = RunArtifacts("runs/vireid", task="vireid")        # doctest: +SKIP
>>> art.log_round(1, {"rank1": 0.42, "map": 0.31})          # doctest: +SKIP
>>> art.save_checkpoint(1, {"w": np.zeros((2, 3), np.float32)}, model_id="tiny")  # doctest: +SKIP
>>> arrays = load_checkpoint(art.latest_checkpoint, model_id="tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from veilface.errors import CheckpointError, InvalidArgument

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "RunArtifacts",
    "arrays_fingerprint",
    "load_checkpoint",
    "plot_metrics",
]

_META_KEY = "__meta__"


def arrays_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex, 16 chars) of the sorted ``name:shape:dtype`` list of ``arrays``."""
    spec = "\n".join(
        f"{name}:{tuple(np.shape(value))}:{np.asarray(value).dtype.str}"
        for name, value in sorted(arrays.items())
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))


class RunArtifacts:
    """Checkpoints, metrics JSON and plots of one federated run.

    Parameters
    ----------
    out_dir : str or Path
        Created if missing. An existing ``metrics.json`` for the same task is
        appended to (a resumed run); one for another task raises.
    task : str
        Task name recorded in ``metrics.json`` (``"vireid"``, ``"pad"``).
    plot : bool, keyword-only
        Redraw ``metrics.png`` after every :meth:`log_round` (default True).
    """

    def __init__(self, out_dir: str | os.PathLike[str], task: str, *, plot: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.task = task
        self.plot = plot
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.json"
        self.plot_path = self.out_dir / "metrics.png"
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self._rounds: list[dict[str, float | int]] = []
        if self.metrics_path.exists():
            try:
                data = json.loads(self.metrics_path.read_text())
                rounds = data["rounds"]
                old_task = data["task"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidArgument(
                    f"{self.metrics_path} is not a veilface metrics file ({exc}); "
                    "remove it or choose another out-dir"
                ) from exc
            if old_task != task:
                raise InvalidArgument(
                    f"{self.metrics_path} belongs to task {old_task!r}, not {task!r}; "
                    "choose another out-dir"
                )
            self._rounds = list(rounds)

    @property
    def rounds(self) -> list[dict[str, float | int]]:
        """Logged rows, oldest first (a copy)."""
        return [dict(r) for r in self._rounds]

    def log_round(self, rnd: int, metrics: Mapping[str, float]) -> None:
        """Append (or replace) round ``rnd``'s metrics and rewrite ``metrics.json``.

        Parameters
        ----------
        rnd : int
            Round number (0 = before training).
        metrics : mapping of str to float
            Scalar metrics; non-finite values are stored as ``null``.
        """
        row: dict[str, float | int] = {"round": int(rnd)}
        for name, value in metrics.items():
            if name == "round":
                continue
            row[str(name)] = float(value)
        self._rounds = [r for r in self._rounds if r.get("round") != int(rnd)]
        self._rounds.append(row)
        self._rounds.sort(key=lambda r: r["round"])
        payload = {"task": self.task, "rounds": [_json_row(r) for r in self._rounds]}
        _atomic_write_text(self.metrics_path, json.dumps(payload, indent=2) + "\n")
        if self.plot:
            plot_metrics(self._rounds, self.plot_path, title=f"{self.task}: per-round metrics")

    def checkpoint_path(self, rnd: int) -> Path:
        """``checkpoints/round_NNNN.npz``."""
        return self.checkpoint_dir / f"round_{int(rnd):04d}.npz"

    @property
    def latest_checkpoint(self) -> Path:
        """``checkpoints/latest.npz`` (written by every :meth:`save_checkpoint`)."""
        return self.checkpoint_dir / "latest.npz"

    def save_checkpoint(
        self, rnd: int, arrays: Mapping[str, np.ndarray], model_id: str, *, latest: bool = True
    ) -> Path:
        """Write round ``rnd``'s arrays atomically, tagged with ``model_id`` and a fingerprint.

        Parameters
        ----------
        rnd : int
            Round number.
        arrays : mapping of str to numpy.ndarray
            e.g. a model ``state_dict`` as numpy arrays, any shapes/dtypes.
        model_id : str
            Names the architecture and configuration (e.g.
            ``"vireid-mnv2-w0.5-64x64"``); :func:`load_checkpoint` checks it.
        latest : bool, keyword-only
            Also copy it to :attr:`latest_checkpoint` (default). The tasks pass
            False for the initial model (round 0), so ``latest.npz`` only ever
            holds a trained model.

        Returns
        -------
        Path
            The round's checkpoint file.
        """
        if not arrays:
            raise InvalidArgument("save_checkpoint needs at least one array")
        if _META_KEY in arrays:
            raise InvalidArgument(f"array name {_META_KEY!r} is reserved")
        meta = {
            "model_id": model_id,
            "fingerprint": arrays_fingerprint(arrays),
            "round": int(rnd),
            "task": self.task,
        }
        payload: dict[str, Any] = {name: np.asarray(value) for name, value in arrays.items()}
        payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = self.checkpoint_path(rnd)
        for target in (path, self.latest_checkpoint) if latest else (path,):
            _atomic_write_bytes(target, lambda f: np.savez(f, **payload))
        logger.info("checkpoint round %d -> %s", rnd, path)
        return path


def _json_row(row: Mapping[str, float | int]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for key, value in row.items():
        out[key] = value if isinstance(value, int) or math.isfinite(value) else None
    return out


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    expected: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Read a checkpoint written by :meth:`RunArtifacts.save_checkpoint`.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.
    model_id : str, optional, keyword-only
        Refuse the file unless it was saved with this model id.
    expected : mapping of str to numpy.ndarray, optional, keyword-only
        Arrays of the model about to receive the weights (e.g. its current
        ``state_dict``); refuse the file unless names, shapes and dtypes match.

    Returns
    -------
    dict of str to numpy.ndarray
        The saved arrays.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, no veilface metadata, or another model.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; pass a checkpoints/*.npz file")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {p} is not a readable .npz file: {exc}") from exc
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise CheckpointError(
            f"checkpoint {p} has no veilface metadata; it was not written by RunArtifacts"
        )
    try:
        meta = json.loads(raw.tobytes().decode())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {p} has corrupt metadata: {exc}") from exc
    if arrays_fingerprint(arrays) != meta.get("fingerprint"):
        raise CheckpointError(f"checkpoint {p} is corrupt: its arrays do not match its fingerprint")
    if model_id is not None and meta.get("model_id") != model_id:
        raise CheckpointError(
            f"checkpoint {p} is from model {meta.get('model_id')!r}, not {model_id!r}; "
            "load it with the same model configuration or start from scratch"
        )
    if expected is not None:
        want = arrays_fingerprint(expected)
        if want != meta["fingerprint"]:
            missing = sorted(set(expected) - set(arrays))[:3]
            extra = sorted(set(arrays) - set(expected))[:3]
            shape = [
                f"{k}: {arrays[k].shape} vs {np.shape(expected[k])}"
                for k in sorted(set(arrays) & set(expected))
                if arrays[k].shape != np.shape(expected[k])
            ][:3]
            raise CheckpointError(
                f"checkpoint {p} (model {meta.get('model_id')!r}) does not fit this model: "
                f"missing {missing}, unexpected {extra}, shape mismatches {shape}; "
                "use the configuration it was trained with"
            )
    return arrays


def plot_metrics(
    rounds: list[dict[str, float | int]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Draw every metric against round into one PNG (matplotlib, Agg backend).

    Parameters
    ----------
    rounds : list of dict
        Rows as in ``metrics.json`` (each with ``"round"``).
    path : str or Path
        Output PNG, written atomically.
    title : str, keyword-only
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for r in rounds for k in r if k != "round"})
    out = Path(path)
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    try:
        for ax, name in zip(axes.flat, names):
            pts = [(r["round"], r[name]) for r in rounds if name in r]
            pts = [(x, y) for x, y in pts if y is not None and math.isfinite(float(y))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o")
            ax.set_title(name)
            ax.set_xlabel("round")
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        _atomic_write_bytes(out, lambda f: fig.savefig(f, format="png", dpi=80))
    finally:
        plt.close(fig)
    return out
