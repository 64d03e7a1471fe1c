"""Find and open insightface model packs (SCRFD detector, ArcFace recogniser) with onnxruntime.

insightface keeps each model pack in its own folder, ``<root>/models/<pack>/``
(``~/.insightface/models/buffalo_l/det_10g.onnx``, ``w600k_r50.onnx``, plus
landmark and attribute models this backend does not use). The user gives the
root, the ``models`` folder, or the pack folder itself; nothing is ever
downloaded. As in insightface's ``model_zoo``, a model's role comes from its
inputs and outputs, not its file name: 5 or more outputs is an SCRFD
detector; one output and a square input of at least 112 px (a multiple of 16)
is a recogniser; 192 px (landmarks), 96 px (gender/age) and two-input
(face swap) models are skipped.

``onnxruntime`` and ``onnx`` are imported only when a pack is opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veilface.client.face.errors import FaceModelInvalid, FaceModelsNotFound
from veilface.client.face.scrfd import LAYOUTS, OutputLayout

logger = logging.getLogger(__name__)

#: The pack insightface uses by default, preferred when a root holds several.
DEFAULT_PACK = "buffalo_l"
#: Detector input ``(width, height)`` for models with a dynamic input size.
DEFAULT_DET_SIZE = (640, 640)

_INSTALL_HINT = "pip install onnxruntime onnx (or: pip install 'veilface[client]')"
_LAYOUT_HINT = (
    "expected insightface's layout <root>/models/<pack>/*.onnx with an SCRFD detector "
    "(e.g. det_10g.onnx) and an ArcFace recogniser (e.g. w600k_r50.onnx)"
)
# Files whose names say what they are are opened first, so the large
# landmark/attribute models of a pack are usually never loaded.
_LIKELY_PREFIXES = ("det_", "scrfd", "w600k", "glint", "arcface")


@dataclass(frozen=True)
class DetectorModel:
    """An opened SCRFD detector.

    Attributes
    ----------
    path
        The ``.onnx`` file.
    session
        Its ``onnxruntime.InferenceSession``.
    input_name, output_names
        Graph input and outputs (outputs in model order).
    layout
        Strides, anchors and whether landmarks are predicted.
    input_size
        Canvas ``(width, height)`` fed to the network: the model's own if it
        is fixed, else the requested one.
    """

    path: Path
    session: Any
    input_name: str
    output_names: tuple[str, ...]
    layout: OutputLayout
    input_size: tuple[int, int]


@dataclass(frozen=True)
class RecognizerModel:
    """An opened ArcFace recogniser.

    Attributes
    ----------
    path, session
        The ``.onnx`` file and its ``onnxruntime.InferenceSession``.
    input_name, output_name
        Graph input and output.
    input_size
        Side of the square aligned crop (112).
    input_mean, input_std
        Pixel normalisation ``(x - mean) / std``: ``127.5, 127.5``, or
        ``0, 1`` for MXNet conversions that normalise inside the graph.
    embedding_dim
        Length of the embedding (512 for insightface's ArcFace models).
    """

    path: Path
    session: Any
    input_name: str
    output_name: str
    input_size: int
    input_mean: float
    input_std: float
    embedding_dim: int


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file())


def _packs_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and _onnx_files(d))


def find_insightface_pack(model_dir: str | os.PathLike[str], pack: str | None = None) -> Path:
    """Locate the folder holding a pack's ``.onnx`` files.

    Parameters
    ----------
    model_dir
        insightface's root (holding ``models/<pack>/``), its ``models``
        folder, or the pack folder itself.
    pack
        Pack name (``"buffalo_l"``, ``"antelopev2"``...). By default: the
        folder itself if it holds ``.onnx`` files, else :data:`DEFAULT_PACK`
        if present, else the only pack found.

    Returns
    -------
    pathlib.Path
        The pack folder.

    Raises
    ------
    FaceModelsNotFound
        The folder does not exist, holds no pack, holds several and ``pack``
        was not given, or the named pack is absent.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise FaceModelsNotFound(
            f"insightface model directory {root} does not exist or is not a folder; "
            f"{_LAYOUT_HINT}. Models are never downloaded: copy a pack there first"
        )
    if pack is not None:
        if not pack or Path(pack).name != pack:
            raise ValueError(f"pack must be a folder name, got {pack!r}")
        candidates = [root / "models" / pack, root / pack]
        if root.name == pack:
            candidates.append(root)
        for folder in candidates:
            if folder.is_dir() and _onnx_files(folder):
                return folder
        found = [d.name for d in _packs_in(root / "models") + _packs_in(root)]
        raise FaceModelsNotFound(
            f"insightface pack {pack!r} not found under {root} (looked in "
            f"{', '.join(str(c) for c in candidates)}); packs present: "
            f"{', '.join(found) or 'none'}. {_LAYOUT_HINT}"
        )
    if _onnx_files(root):
        return root
    packs = _packs_in(root / "models") or _packs_in(root)
    if not packs:
        raise FaceModelsNotFound(f"no insightface model pack found under {root}: {_LAYOUT_HINT}")
    for folder in packs:
        if folder.name == DEFAULT_PACK:
            return folder
    if len(packs) > 1:
        raise FaceModelsNotFound(
            f"several insightface packs under {root} ({', '.join(p.name for p in packs)}); "
            "choose one with pack=<name>"
        )
    return packs[0]


def _open_session(path: Path, threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise FaceModelsNotFound(
            f"the insightface backend needs onnxruntime: {_INSTALL_HINT}"
        ) from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own InvalidProtobuf, Fail, ...
        raise FaceModelInvalid(
            f"model file {path.name} in {path.parent} cannot be loaded by onnxruntime: it is "
            "corrupt, truncated or not an ONNX model (copy the model pack again)"
        ) from exc


def _dims(shape: Any) -> list[int | None]:
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def classify(session: Any) -> str | None:
    """The role insightface's ``model_zoo`` would give a model, from its inputs and outputs.

    Returns
    -------
    str or None
        ``"detection"``, ``"recognition"``, ``"landmark"``, ``"attribute"``,
        ``"inswapper"``, or ``None`` for an unknown model.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(outputs) >= 5:
        return "detection"
    shape = _dims(inputs[0].shape)
    if len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if h == 192 and w == 192:
        return "landmark"
    if h == 96 and w == 96:
        return "attribute"
    if len(inputs) == 2 and h == 128 and w == 128:
        return "inswapper"
    if h is not None and h == w and h >= 112 and h % 16 == 0:
        return "recognition"
    return None


def _detector(path: Path, session: Any, det_size: tuple[int, int]) -> DetectorModel:
    inp = session.get_inputs()[0]
    outputs = session.get_outputs()
    layout = LAYOUTS.get(len(outputs))
    if layout is None:
        raise FaceModelInvalid(
            f"{path.name} has {len(outputs)} outputs; an SCRFD detector has 6, 9, 10 or 15"
        )
    if not layout.has_landmarks:
        raise FaceModelInvalid(
            f"{path.name} is an SCRFD detector without landmark outputs; alignment needs "
            "the 5-point landmarks of a *_kps or det_* model (e.g. det_10g.onnx)"
        )
    shape = _dims(inp.shape)
    if len(shape) != 4 or shape[1] not in (3, None) or inp.type != "tensor(float)":
        raise FaceModelInvalid(
            f"{path.name} takes {inp.type} of shape {inp.shape}; an SCRFD detector takes "
            "float NCHW images with 3 channels"
        )
    h, w = shape[2], shape[3]
    size = (w, h) if h is not None and w is not None else det_size
    return DetectorModel(
        path=path,
        session=session,
        input_name=inp.name,
        output_names=tuple(o.name for o in outputs),
        layout=layout,
        input_size=size,
    )


def _normalisation(path: Path) -> tuple[float, float]:
    """insightface's rule: MXNet conversions start with Sub and Mul nodes and normalise themselves."""
    try:
        import onnx
    except ImportError as exc:
        raise FaceModelsNotFound(f"the insightface backend needs onnx: {_INSTALL_HINT}") from exc
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise FaceModelInvalid(f"{path.name} cannot be parsed as an ONNX model") from exc
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def _recognizer(path: Path, session: Any) -> RecognizerModel:
    inp = session.get_inputs()[0]
    outputs = session.get_outputs()
    out_shape = _dims(outputs[0].shape)
    if (
        len(outputs) != 1
        or len(out_shape) != 2
        or out_shape[1] is None
        or inp.type != "tensor(float)"
    ):
        raise FaceModelInvalid(
            f"{path.name} looks like a recogniser (input {inp.shape}) but has outputs "
            f"{[o.shape for o in outputs]}; an ArcFace model has one (N, D) output"
        )
    size = int(inp.shape[2])  # classify() checked it is a fixed side
    mean, std = _normalisation(path)
    return RecognizerModel(
        path=path,
        session=session,
        input_name=inp.name,
        output_name=outputs[0].name,
        input_size=size,
        input_mean=mean,
        input_std=std,
        embedding_dim=int(out_shape[1]),
    )


def open_pack(
    pack_dir: Path, *, det_size: tuple[int, int] = DEFAULT_DET_SIZE, threads: int = 0
) -> tuple[DetectorModel, RecognizerModel]:
    """Open the detector and the recogniser of a pack folder.

    Files are tried in name order (files named like insightface's detectors
    and recognisers first); the first detector and the first recogniser win,
    and the search stops once both are found.

    Parameters
    ----------
    pack_dir
        Folder from :func:`find_insightface_pack`.
    det_size
        Detector canvas ``(width, height)`` for dynamic-size detectors
        (multiples of 32).
    threads
        onnxruntime intra-op threads (0: its default, one per core).

    Raises
    ------
    FaceModelsNotFound
        onnxruntime/onnx are missing, or the pack lacks a detector or a recogniser.
    FaceModelInvalid
        A file is not a loadable ONNX model, or a model has unexpected shapes.
    """
    files = _onnx_files(pack_dir)
    files.sort(key=lambda p: (not p.name.lower().startswith(_LIKELY_PREFIXES), p.name))
    detector: DetectorModel | None = None
    recognizer: RecognizerModel | None = None
    seen: list[str] = []
    for path in files:
        if detector is not None and recognizer is not None:
            break
        session = _open_session(path, threads)
        role = classify(session)
        seen.append(f"{path.name}: {role or 'unknown'}")
        logger.debug("model %s: %s", path.name, role)
        if role == "detection" and detector is None:
            detector = _detector(path, session, det_size)
        elif role == "recognition" and recognizer is None:
            recognizer = _recognizer(path, session)
    missing = [
        what
        for what, model in (("SCRFD detector", detector), ("ArcFace recogniser", recognizer))
        if model is None
    ]
    if detector is None or recognizer is None:
        raise FaceModelsNotFound(
            f"the insightface pack {pack_dir} has no {' and no '.join(missing)} "
            f"(found {'; '.join(seen) or 'no .onnx file'}); {_LAYOUT_HINT}"
        )
    return detector, recognizer


__all__ = [
    "DEFAULT_DET_SIZE",
    "DEFAULT_PACK",
    "DetectorModel",
    "RecognizerModel",
    "classify",
    "find_insightface_pack",
    "open_pack",
]
