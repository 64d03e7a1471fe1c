"""The upload guard cannot be passed by mistake (issue 11, deliverable 3).

Each bypass the issue lists has a test here: nothing importable wraps raw
pixels into a ``ProtectedImage``; caller boxes must cover the faces dlib's
HOG and CNN detectors find; a result below the change floor is refused.
Tests marked ``data`` run on LFW photos and skip without ``../shared/data/lfw``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

import veilface.client.protect as protect_pkg
from tests.client.conftest import FakeDetector
from veilface.client.face import FaceBox, FacePipeline, NoFaceFound, load_image
from veilface.client.protect import (
    ProtectedImage,
    SurrogateEnsemble,
    UnprotectedImageError,
    cloak,
    deidentify,
    load_ensemble,
    require_protected,
)
from veilface.client.protect import adversarial as adversarial_module
from veilface.client.protect.change_floor import (
    MAX_REGION_SSIM,
    MIN_CLOAK_EPSILON,
    MIN_SURROGATE_SHIFT,
    InsufficientChange,
    require_change,
    ssim_np,
)
from veilface.client.protect.face_cover import (
    CNN,
    HOG,
    MIN_BOX_SIDE,
    MIN_COVERED,
    FaceBoxTooSmall,
    UncoveredFace,
    covered_share,
    detect_for_protection,
)
from veilface.client.protect.image_quality import ssim
from veilface.client.protect.protected_image import mint_protected
from veilface.client.protect.surrogate_shift import surrogate_similarity
from veilface.errors import InvalidArgument

BOX = FaceBox(left=40, top=50, right=100, bottom=110)


def scene(seed: int = 0, shape: tuple[int, int] = (160, 140)) -> np.ndarray:
    """Seeded noise: no detector finds a face in it."""
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def smooth_scene(seed: int = 0) -> np.ndarray:
    """A smooth random colour ``(160, 140, 3)`` image (like a photo, not white noise)."""
    small = scene(seed, (12, 12))
    return np.asarray(Image.fromarray(small).resize((140, 160), Image.Resampling.BICUBIC)).copy()


@pytest.fixture(scope="module")
def ensemble() -> SurrogateEnsemble:
    torch.set_num_threads(1)
    ens: SurrogateEnsemble = load_ensemble()
    return ens


def lfw_photo(lfw_dir: Path, person: str) -> np.ndarray:
    path = lfw_dir / person / f"{person}_0001.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rgb: np.ndarray = load_image(path)
    return rgb


# --- nothing importable mints ---------------------------------------------------


def test_the_old_mint_is_gone() -> None:
    with pytest.raises(ImportError):
        from veilface.client.protect.protected_image import _mint  # noqa: F401
    import veilface.client.protect.protected_image as module

    assert not hasattr(module, "_MINT")  # the capability token is no module attribute


def test_the_mint_refuses_callers_outside_the_protectors() -> None:
    original, result = scene(0), scene(1)
    for method in ("mask", "adversarial"):
        with pytest.raises(UnprotectedImageError, match="only the protectors"):
            mint_protected(
                original, result, method=method, params={}, faces=[BOX], surrogate_similarity=0.0
            )
    # A frame that only claims a protector's module name is refused too.
    fake = {"__name__": "veilface.client.protect.deidentify", "mint": mint_protected}
    fake.update(o=original, r=result, BOX=BOX)
    with pytest.raises(UnprotectedImageError):
        exec("mint(o, r, method='mask', params={}, faces=[BOX])", fake)  # noqa: S102


def _package_modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.iter_modules(protect_pkg.__path__)]
    return [protect_pkg] + [importlib.import_module(f"{protect_pkg.__name__}.{n}") for n in names]


def test_no_module_attribute_wraps_raw_pixels() -> None:
    """Call every callable of the package that accepts pixels like a mint would."""
    raw, other = scene(3), scene(4)
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = [
        ((other, raw), {"method": "mask", "params": {}, "faces": [BOX]}),
        ((raw,), {"method": "mask", "params": {}, "faces": [BOX]}),
        ((other, raw), {"method": "adversarial", "params": {}, "faces": [BOX],
                        "surrogate_similarity": 0.0}),
    ]  # fmt: skip
    candidates: dict[int, tuple[str, object]] = {}
    values: list[object] = []
    for module in _package_modules():
        for name, value in vars(module).items():
            values.append(value)
            owner = getattr(value, "__module__", "") or ""
            if callable(value) and owner.startswith("veilface."):
                candidates[id(value)] = (f"{module.__name__}.{name}", value)
                if inspect.isclass(value) and owner.startswith(protect_pkg.__name__):
                    for attr, member in vars(value).items():
                        if callable(member):
                            candidates[id(member)] = (f"{owner}.{value.__name__}.{attr}", member)
    tried: list[str] = []
    refused: list[tuple[str, str]] = []
    for label, func in candidates.values():
        try:
            sig = inspect.signature(func)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        for args, kwargs in calls:
            try:
                sig.bind(*args, **kwargs)
            except TypeError:
                continue
            tried.append(label)
            try:
                out = func(*args, **kwargs)  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001 - refusing in any way is what we want
                refused.append((label, type(exc).__name__))
                continue
            if isinstance(out, ProtectedImage):  # e.g. a bare __new__: must not pass the gate
                with pytest.raises(UnprotectedImageError):
                    require_protected(out)
    assert any(t.endswith(".mint_protected") for t in tried), tried
    # the mint itself was called with the two argument lists that fit it, and refused both
    mint_errors = [e for t, e in refused if t.endswith(".mint_protected")]
    assert mint_errors == ["UnprotectedImageError"] * 2, refused
    # No module value is a token the constructor accepts.
    for value in values:
        with pytest.raises(TypeError):
            ProtectedImage(value, raw, method="mask", params={}, faces=[BOX])


def test_protectors_record_what_the_floor_measured() -> None:
    img = deidentify(scene(), method="mask", faces=[BOX])
    assert img.params["region_linf"] > 0 and img.params["region_ssim"] < MAX_REGION_SSIM
    img.verify()


# --- caller boxes must cover the faces ----------------------------------------------


def test_absurdly_small_boxes_are_refused() -> None:
    src = scene()
    with pytest.raises(FaceBoxTooSmall, match=r"\(0, 0, 1, 1\) is 1x1 px") as info:
        deidentify(src, method="mask", faces=[FaceBox(0, 0, 1, 1)])
    assert isinstance(info.value, InvalidArgument)
    side = MIN_BOX_SIDE
    with pytest.raises(FaceBoxTooSmall):
        deidentify(src, method="mask", faces=[FaceBox(10, 10, 10 + side - 1, 60)])
    with pytest.raises(FaceBoxTooSmall):  # big, but only 5 px of it inside the image
        deidentify(src, method="mask", faces=[FaceBox(-100, 10, 5, 80)])
    with pytest.raises(FaceBoxTooSmall):
        cloak(src, faces=[FaceBox(0, 0, 1, 1)])
    # With no face detected, a box of the minimum size is accepted as given.
    assert deidentify(src, method="mask", faces=[FaceBox(10, 10, 10 + side, 10 + side)])


def test_boxes_that_miss_a_detected_face_are_refused() -> None:
    face = FaceBox(60, 70, 120, 130)
    pipe = FacePipeline(FakeDetector([face]))
    elsewhere = FaceBox(0, 0, 40, 40)
    with pytest.raises(UncoveredFace, match=r"found at \(60, 70, 120, 130\) is only 0% inside"):
        deidentify(scene(), method="mask", faces=[elsewhere], pipeline=pipe)
    half = FaceBox(60, 70, 90, 130)  # the left half of the face
    assert covered_share(face, [half]) == pytest.approx(0.5)
    with pytest.raises(UncoveredFace, match="the given pipeline"):
        deidentify(scene(), method="mask", faces=[half], pipeline=pipe)
    # Two boxes that together cover the face are fine; so is the face's own box.
    halves = [half, FaceBox(90, 70, 120, 130)]
    assert len(deidentify(scene(), method="mask", faces=halves, pipeline=pipe).faces) == 2
    assert deidentify(scene(), method="mask", faces=[face], pipeline=pipe)


@pytest.mark.data
def test_a_weak_pipeline_does_not_hide_a_face_from_the_guard(lfw_dir: Path) -> None:
    """The given pipeline adds detections; it never replaces dlib's."""
    raw = lfw_photo(lfw_dir, "Tony_Blair")
    blind = FacePipeline(FakeDetector([]))
    assert len(deidentify(raw, method="mask", pipeline=blind).faces) == 1
    with pytest.raises(UncoveredFace):
        deidentify(raw, method="mask", faces=[FaceBox(0, 0, 40, 40)], pipeline=blind)
    with pytest.raises(NoFaceFound):  # and noise still has no face
        deidentify(scene(), pipeline=blind)


@pytest.mark.data
def test_the_issues_placeholder_box_is_refused_on_lfw(lfw_dir: Path) -> None:
    raw = lfw_photo(lfw_dir, "Tony_Blair")
    with pytest.raises(FaceBoxTooSmall):
        deidentify(raw, method="mask", faces=[FaceBox(0, 0, 1, 1)])
    with pytest.raises(
        UncoveredFace, match=re.escape(f"{HOG} and {CNN} found at (67, 67, 197, 197)")
    ):
        deidentify(raw, method="mask", faces=[FaceBox(0, 0, 40, 40)])
    with pytest.raises(UncoveredFace):  # refused before any optimisation
        cloak(raw, faces=[FaceBox(0, 0, 60, 60)], steps=1)


@pytest.mark.data
def test_either_detectors_box_is_accepted_as_caller_box(lfw_dir: Path) -> None:
    raw = lfw_photo(lfw_dir, "Tony_Blair")
    (face,) = detect_for_protection(raw)
    assert {d.detector for d in face.detections} == {HOG, CNN}
    for det in face.detections:
        for strength in ("low", "high"):
            img = deidentify(raw, method="blur", faces=[det.box], strength=strength)
            img.verify()


@pytest.mark.data
def test_a_face_only_the_cnn_finds_is_protected(lfw_dir: Path) -> None:
    # Raymond_Arthurs_0001: a second man in the top right corner that HOG misses.
    raw = lfw_photo(lfw_dir, "Raymond_Arthurs")
    faces = detect_for_protection(raw)
    cnn_only = [f for f in faces if {d.detector for d in f.detections} == {CNN}]
    assert len(faces) == 2 and len(cnn_only) == 1
    img = deidentify(raw, method="mask")
    assert len(img.faces) == 2
    assert covered_share(cnn_only[0].box.clipped(250, 250), img.faces) >= MIN_COVERED
    hog_box = next(f.box for f in faces if f not in cnn_only)
    with pytest.raises(UncoveredFace, match=re.escape(CNN)):
        deidentify(raw, method="mask", faces=[hog_box])


@pytest.mark.data
def test_a_face_hog_misses_is_no_longer_refused(lfw_dir: Path) -> None:
    # Tatiana_Gratcheva_0001: face tilted back; HOG finds nothing, the CNN finds it.
    raw = lfw_photo(lfw_dir, "Tatiana_Gratcheva")
    img = deidentify(raw, method="pixelate")
    assert len(img.faces) == 1


# --- the change floor ------------------------------------------------------------------


def test_numpy_ssim_matches_the_attacks_ssim() -> None:
    a = scene(5, (64, 80))
    b = np.clip(a.astype(int) + np.random.default_rng(6).integers(-20, 21, a.shape), 0, 255)
    b = b.astype(np.uint8)
    assert ssim_np(a, b) == pytest.approx(ssim(a, b), abs=1e-4)
    assert ssim_np(a, a) == pytest.approx(1.0)


def test_floor_refuses_unchanged_and_barely_changed_regions() -> None:
    smooth = smooth_scene(7)
    with pytest.raises(InsufficientChange, match="unchanged"):
        require_change(smooth, smooth.copy(), [BOX], method="mask")
    nudged = smooth.copy()
    nudged[60, 60, 0] ^= 1  # one channel of one pixel
    with pytest.raises(InsufficientChange, match=r"barely changed \(SSIM above 0\.9999"):
        require_change(smooth, nudged, [BOX], method="blur")
    noise = np.random.default_rng(11).integers(-1, 2, size=smooth.shape)
    noisy = np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)  # +-1 everywhere
    with pytest.raises(InsufficientChange, match=r"barely changed \(SSIM 0\.99[5-9]\d"):
        require_change(smooth, noisy, [BOX], method="blur")
    # Only inside the regions counts: a change elsewhere does not help.
    outside = smooth.copy()
    outside[0:30, 0:30] = 0
    with pytest.raises(InsufficientChange):
        require_change(smooth, outside, [BOX], method="mask")
    masked = smooth.copy()
    masked[BOX.top : BOX.bottom, BOX.left : BOX.right] = 0
    report = require_change(smooth, masked, [BOX], method="mask")
    assert report.min_linf > 0 and report.max_ssim < 0.5
    # Every region must change, not only one of them.
    with pytest.raises(InsufficientChange, match=r"region \(0, 0, 30, 30\)"):
        require_change(smooth, masked, [BOX, FaceBox(0, 0, 30, 30)], method="mask")


def test_floor_refuses_surrogates_that_did_not_move() -> None:
    a = scene(8)
    b = a.copy()
    b[BOX.top : BOX.bottom, BOX.left : BOX.right] //= 2
    with pytest.raises(InsufficientChange, match="surrogate recognizers still see the same face"):
        require_change(a, b, [BOX], method="adversarial", surrogate_similarity=0.99)
    ok = 1.0 - MIN_SURROGATE_SHIFT - 0.01
    assert require_change(a, b, [BOX], method="adversarial", surrogate_similarity=ok)


def test_deidentify_refuses_a_result_that_changes_nothing() -> None:
    src = scene(9)
    src[20:140, 20:120] = 0  # the region is already the mask's fill colour
    with pytest.raises(InsufficientChange, match="unchanged"):
        deidentify(src, method="mask", faces=[BOX])
    flat = np.full((160, 140, 3), 90, np.uint8)
    with pytest.raises(InsufficientChange):  # blurring a flat region changes nothing
        deidentify(flat, method="blur", faces=[BOX])


@pytest.mark.parametrize("epsilon", [0.1, 1.0, MIN_CLOAK_EPSILON - 0.01])
def test_cloak_refuses_a_budget_that_cannot_protect(
    epsilon: float, ensemble: SurrogateEnsemble
) -> None:
    with pytest.raises(InvalidArgument, match=f"below {MIN_CLOAK_EPSILON} grey levels"):
        cloak(scene(), faces=[BOX], epsilon=epsilon, steps=1, ensemble=ensemble)


def test_cloak_refuses_a_result_the_surrogates_still_recognise(
    ensemble: SurrogateEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for an optimiser that did nothing: the mint refuses the cloak."""
    monkeypatch.setattr(adversarial_module, "surrogate_similarity", lambda *a: 0.999)
    with pytest.raises(InsufficientChange, match="surrogate"):
        cloak(scene(), faces=[BOX], epsilon=16, steps=1, ensemble=ensemble)


def test_surrogate_similarity_is_one_for_the_original(ensemble: SurrogateEnsemble) -> None:
    a = smooth_scene(10)
    assert surrogate_similarity(ensemble, a, a, [BOX]) == pytest.approx(1.0, abs=1e-5)
    out = cloak(a, faces=[BOX], epsilon=16, steps=2, ensemble=ensemble)
    final = float(out.params["surrogate_similarity_final"])
    assert final <= 1.0 - MIN_SURROGATE_SHIFT
    assert final == pytest.approx(
        surrogate_similarity(ensemble, a, np.array(out.pixels), [BOX]), abs=1e-3
    )


@pytest.mark.data
@pytest.mark.parametrize(("preset", "steps"), [("low", 3), ("medium", 2), ("high", 2)])
def test_presets_pass_the_floor_with_headroom_on_lfw(
    lfw_dir: Path, preset: str, steps: int, ensemble: SurrogateEnsemble
) -> None:
    raw = lfw_photo(lfw_dir, "Serena_Williams")
    out = cloak(raw, preset=preset, steps=steps, ensemble=ensemble)
    assert float(out.params["region_ssim"]) < MAX_REGION_SSIM - 0.05
    assert int(out.params["region_linf"]) >= 8
    assert float(out.params["surrogate_similarity_final"]) < 1.0 - MIN_SURROGATE_SHIFT - 0.3
    require_protected(out)
