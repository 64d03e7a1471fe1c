"""The liveness gate: the presentation-attack check the face pipeline runs before embedding.

:class:`LivenessGate` is what ``FacePipeline(liveness=..., liveness_policy=...)``
holds. The face pipeline calls :meth:`LivenessGate.check` on the one face that
passed its quality gate, before aligning and embedding it:

- ``liveness`` left at its default (:data:`DEFAULT_LIVENESS`): the model
  shipped with the package (``weights/default.vfpad``), loaded on first use,
  once. If it is not installed the check raises: the gate never lets a face
  through because it could not run.
- a path: the user's own ``.vfpad`` artifact, read and verified now (a
  wrong, corrupt or foreign file raises
  :class:`~veilface.nn.liveness_io.LivenessModelInvalid` at construction).
- a :class:`~veilface.client.liveness.model.LivenessModel`: used as it is.
- ``None``: the gate is skipped, explicitly; every result says so
  (:data:`LIVENESS_SKIPPED`).

Policy ``"refuse"`` (default) raises
:class:`~veilface.errors.PresentationAttackDetected` for a face scoring below
the artifact's threshold; ``"record"`` lets it through, the returned
:class:`LivenessScore` saying ``live=False``.

Faces the model cannot judge are refused under either policy: a crop region
smaller than the model's input side (it would see enlarged pixels, not the
texture of a print or screen) raises :class:`FaceTooSmall`, and a grey
surrounding raises :class:`ColourImageRequired`.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from veilface.client.liveness.model import LivenessModel, LivenessScore
from veilface.errors import PresentationAttackDetected
from veilface.nn.liveness_io import LivenessModelInvalid

if TYPE_CHECKING:  # the face package imports this module (FacePipeline's default)
    from veilface.client.face.backend import FaceBox

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIVENESS",
    "GREY_CHROMA",
    "LIVENESS_SKIPPED",
    "LivenessGate",
    "LivenessOption",
    "LivenessPolicy",
    "LivenessResult",
    "LivenessSkipped",
    "liveness_record",
    "load_default_model",
]


class _Default(enum.Enum):
    DEFAULT = "default"

    def __repr__(self) -> str:
        return "DEFAULT_LIVENESS"


#: ``liveness=`` default: the shipped model, loaded on first use.
DEFAULT_LIVENESS: Final = _Default.DEFAULT

#: Mean spread between the largest and smallest channel of a pixel (levels
#: 0..255) over the liveness crop below which the crop counts as grey. A grey
#: image converted to RGB has 0 (JPEG rounding adds about 1); faces in colour
#: photos have tens of levels of spread.
GREY_CHROMA = 4.0

LivenessPolicy = Literal["refuse", "record"]
LivenessOption = str | os.PathLike[str] | LivenessModel | None | _Default
"""What ``liveness=`` accepts: a path to a ``.vfpad`` file, a loaded model,
``None`` (skip, recorded) or :data:`DEFAULT_LIVENESS`."""


@dataclass(frozen=True)
class LivenessSkipped:
    """The result's marker that no liveness check ran because the caller asked so."""

    reason: str = "skipped by liveness=None"
    live: None = None

    @property
    def skipped(self) -> bool:
        return True


#: The one marker of a skipped gate.
LIVENESS_SKIPPED: Final = LivenessSkipped()

LivenessResult = LivenessScore | LivenessSkipped
"""What a pipeline result records: the score, or that the gate was skipped."""


def liveness_record(result: LivenessResult) -> dict[str, Any]:
    """A JSON-ready description of a liveness result (for ``--json`` outputs and reports)."""
    if isinstance(result, LivenessSkipped):
        return {"skipped": True, "reason": result.reason}
    return {
        "skipped": False,
        "score": result.score,
        "threshold": result.threshold,
        "live": result.live,
        "model_fingerprint": result.model_fingerprint,
    }


class LivenessGate:
    """The liveness check of one face pipeline (thread-safe).

    Parameters
    ----------
    liveness
        See the module docstring.
    policy
        ``"refuse"`` (raise :class:`PresentationAttackDetected`) or
        ``"record"`` (return the score with ``live=False``).

    Raises
    ------
    LivenessModelInvalid
        ``liveness`` is a path to a file that is not a valid artifact, or
        torch is not installed.
    ValueError, TypeError
        An unknown policy, or a ``liveness`` of another type.
    """

    def __init__(
        self, liveness: LivenessOption = DEFAULT_LIVENESS, *, policy: LivenessPolicy = "refuse"
    ) -> None:
        if policy not in ("refuse", "record"):
            raise ValueError(f"liveness_policy must be 'refuse' or 'record', got {policy!r}")
        self.policy: LivenessPolicy = policy
        self._lock = threading.Lock()
        self._model: LivenessModel | None = None
        self._lazy_default = False
        if liveness is None:
            self.enabled = False
        elif liveness is DEFAULT_LIVENESS:
            self.enabled, self._lazy_default = True, True
        elif isinstance(liveness, LivenessModel):
            self.enabled, self._model = True, liveness
        elif isinstance(liveness, (str, os.PathLike)):
            self.enabled, self._model = True, LivenessModel(Path(os.fspath(liveness)))
        else:
            raise TypeError(
                "liveness must be a path to a .vfpad file, a LivenessModel, None or "
                f"DEFAULT_LIVENESS, not {type(liveness).__name__}"
            )

    def __repr__(self) -> str:
        if not self.enabled:
            return "LivenessGate(None)"
        what = "default (not loaded yet)" if self._model is None else self._model.fingerprint[:12]
        return f"LivenessGate({what}, policy={self.policy!r})"

    @property
    def model(self) -> LivenessModel:
        """The loaded model (the shipped default is loaded now if it was not yet).

        Raises
        ------
        LivenessModelInvalid
            The gate is disabled, the default model is not installed or is
            invalid, or torch is missing.
        """
        if not self.enabled:
            raise LivenessModelInvalid("the liveness gate is disabled (liveness=None)")
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = load_default_model()
        return self._model

    def check(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> LivenessResult:
        """Judge the face at ``box`` of ``rgb`` (``uint8 (H, W, 3)``) under the policy.

        Returns
        -------
        LivenessScore or LivenessSkipped
            :data:`LIVENESS_SKIPPED` when the gate is disabled; otherwise the
            score (``live=False`` only under policy ``"record"``).

        Raises
        ------
        PresentationAttackDetected
            Policy ``"refuse"`` and a score below the threshold.
        FaceTooSmall, ColourImageRequired
            The model cannot judge this face (either policy).
        LivenessModelInvalid
            The model cannot run (the default is not installed...).
        """
        if not self.enabled:
            return LIVENESS_SKIPPED
        result = self.score(rgb, box)
        if not result.live:
            if self.policy == "refuse":
                raise PresentationAttackDetected(
                    "presentation attack detected: the liveness model judged this face a "
                    "print or a screen, not a live person; present a live face to the camera",
                    score=result.score,
                    threshold=result.threshold,
                    model_fingerprint=result.model_fingerprint,
                )
            log.warning(
                "liveness: face below the threshold, recorded (policy 'record', model %s)",
                result.model_fingerprint[:12],
            )
        return result

    def score(self, rgb: npt.NDArray[np.uint8], box: FaceBox) -> LivenessScore:
        """The model's decision for the face at ``box``, whatever the policy (never raises for a spoof).

        Raises
        ------
        FaceTooSmall, ColourImageRequired, LivenessModelInvalid
            As for :meth:`check`.
        """
        from veilface.client.face.errors import ColourImageRequired, FaceTooSmall

        model = self.model
        h, w = rgb.shape[:2]
        b = box.clipped(w, h)
        if b.width < 1 or b.height < 1:
            raise FaceTooSmall(f"the face box {box.width}x{box.height} px lies outside the image")
        spec = model.crop
        region = min(spec.scale * max(b.width, b.height), w, h)
        if region < spec.size:
            raise FaceTooSmall(
                f"the face and its surroundings cover {region:.0f} px, below the liveness "
                f"model's input of {spec.size} px; move closer or use a higher-resolution photo"
            )
        crop = model.crop_face(rgb, (b.left, b.top, b.right, b.bottom))
        chroma = float(np.mean(crop.max(axis=2).astype(np.int16) - crop.min(axis=2)))
        if chroma < GREY_CHROMA:
            raise ColourImageRequired(
                "the liveness check needs a colour photo; this face and its surroundings are "
                "grey (a grey image, or a grey print): capture in colour, or skip the check "
                "explicitly with liveness=None"
            )
        value = float(model.score_crops(crop[None])[0])
        return LivenessScore(
            score=value,
            threshold=model.threshold,
            live=value >= model.threshold,
            model_fingerprint=model.fingerprint,
        )


def load_default_model() -> LivenessModel:
    """The shipped default model; :class:`LivenessModelInvalid` (saying what to do) if it is absent."""
    from veilface.client.liveness import model as model_module

    path = Path(model_module.default_model_path())
    if not path.is_file():
        raise LivenessModelInvalid(
            f"the default liveness model is not installed ({path} is missing), so the "
            "liveness gate cannot run; pass liveness='your.vfpad' (--liveness PATH), or "
            "liveness=None (--no-liveness) to skip the check explicitly"
        )
    return LivenessModel(path)
