"""The protection benchmark's judges, people selection and figures (``veilface bench protect``).

The judge tests run dlib (and MTCNN) on a few LFW photos of one person and
skip without the data or the MTCNN weights; the selection and aggregation
tests need nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from veilface.bench.mtcnn import INSTALL_HINT, find_mtcnn_weights
from veilface.bench.protect import ProtectBenchResult
from veilface.bench.protect_judges import (
    READINGS,
    Detector,
    DlibJudge,
    Reading,
    References,
    Verdict,
    gaussian_blur,
    iou,
    jpeg_roundtrip,
    judge_protected,
    resize_roundtrip,
)
from veilface.bench.protect_selection import select_people
from veilface.client.face.backend import FaceBox
from veilface.client.face.errors import FaceModelsNotFound
from veilface.client.protect.surrogate_training import heldout_split
from veilface.errors import InvalidArgument

PERSON = "Tony_Blair"


# --- image transforms of the robustness readings -------------------------------------------


def test_blur_is_a_gaussian_of_sigma_one() -> None:
    img = np.zeros((21, 21, 3), dtype=np.uint8)
    img[10, 10] = 255
    out = gaussian_blur(img).astype(float)[..., 0]
    assert out.sum() == pytest.approx(255, abs=6)
    _, xs = np.mgrid[:21, :21]
    var_x = (out * (xs - 10) ** 2).sum() / out.sum()
    assert var_x == pytest.approx(1.0, abs=0.1)  # sigma 1 px
    assert np.array_equal(gaussian_blur(np.full((9, 9, 3), 77, np.uint8)), np.full((9, 9, 3), 77))


def test_resize_and_jpeg_round_trips_keep_the_shape_and_lose_detail() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (250, 200, 3), dtype=np.uint8)
    for out in (resize_roundtrip(img), jpeg_roundtrip(img)):
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - img).mean() > 10  # noise does not survive either
    small = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)
    assert np.array_equal(resize_roundtrip(small), small)  # already under 112 px


def test_iou() -> None:
    a = FaceBox(0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, FaceBox(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(a, FaceBox(20, 20, 30, 30)) == 0.0


# --- dlib's recognizer on three detectors (LFW) --------------------------------------------


@pytest.fixture(scope="module")
def judge() -> DlibJudge:
    try:
        find_mtcnn_weights()
    except FaceModelsNotFound:
        pytest.skip(f"MTCNN weights not installed: {INSTALL_HINT}")
    j = DlibJudge()
    j.load()
    return j


@pytest.fixture(scope="module")
def person(data_dir: Path) -> list[Path]:
    folder = data_dir / "lfw" / PERSON
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return sorted(folder.iterdir())[:4]


@pytest.fixture(scope="module")
def probe(person: list[Path]) -> np.ndarray:
    from veilface.client.face import load_image

    rgb: np.ndarray = load_image(person[0])
    return rgb


@pytest.fixture(scope="module")
def refs(judge: DlibJudge, person: list[Path]) -> References:
    return judge.references(PERSON, person[1:])


@pytest.mark.data
def test_the_unprotected_photo_matches_under_every_reading(
    judge: DlibJudge, probe: np.ndarray, refs: References
) -> None:
    assert len(refs.files) == 3
    assert {d: refs.descriptors(d).shape for d in ("cnn", "hog", "mtcnn")} == {
        "cnn": (3, 128), "hog": (3, 128), "mtcnn": (3, 128)
    }  # fmt: skip
    verdict = judge_protected(probe, probe, refs, judge=judge)
    assert set(verdict.readings) == {s.name for s in READINGS}
    for name, r in verdict.readings.items():
        assert r.detected and r.matched, name
        assert len(r.distances) == 3 and r.mean_distance < 0.6


@pytest.mark.data
def test_a_faceless_image_is_judged_at_the_original_box(
    judge: DlibJudge, probe: np.ndarray, refs: References
) -> None:
    grey = np.full_like(probe, 128)
    verdict = judge_protected(probe, grey, refs, judge=judge,
                              readings=[s for s in READINGS if s.transform == "none"])
    cnn, hog, mtcnn = (verdict.readings[n] for n in ("cnn", "hog", "mtcnn"))
    assert not cnn.detected and len(cnn.distances) == 3  # the recognizer still ran
    assert not mtcnn.detected and len(mtcnn.distances) == 3
    assert not hog.detected and hog.distances == ()  # no fallback: counted as protected
    assert verdict.protected("hog")
    original = judge.locate(probe)
    assert original is not None and verdict.box == original.boxes["cnn"]


class _BlindDetector(DlibJudge):
    """A judge whose named detectors find nothing, as a perturbation that fools only them."""

    blind: tuple[str, ...] = ()

    def detect(self, rgb: np.ndarray, detector: Detector) -> list[FaceBox]:
        return [] if detector in self.blind else super().detect(rgb, detector)


@pytest.mark.data
def test_hiding_the_face_from_hog_alone_is_not_protection(
    judge: DlibJudge, probe: np.ndarray, refs: References
) -> None:
    original = judge.locate(probe)
    assert original is not None
    blind = _BlindDetector()
    blind.blind = ("hog", "cnn")
    specs = [s for s in READINGS if s.name in ("cnn", "hog")]
    verdict = blind.judge(probe, original, refs, specs)
    # HOG missed: psr_hog counts it protected; the CNN judge falls back to the
    # original photo's box and the recognizer still matches the person
    assert verdict.protected("hog") and not verdict.readings["hog"].detected
    assert not verdict.readings["cnn"].detected and not verdict.protected("cnn")


@pytest.mark.data
def test_another_face_than_the_original_one_is_a_miss(judge: DlibJudge, probe: np.ndarray) -> None:
    corner = FaceBox(0, 0, 40, 40)
    face = judge.embed_face(probe, "cnn", near=corner)
    assert face is None  # the detected face is elsewhere
    face = judge.embed_face(probe, "cnn", fallback_box=corner)
    assert face is not None and not face.detected and face.box == corner
    largest = judge.embed_face(probe, "mtcnn")
    assert largest is not None and largest.detected and largest.descriptor.shape == (128,)


@pytest.mark.data
def test_references_are_cached_and_faceless_photos_left_out(
    judge: DlibJudge, person: list[Path], refs: References, tmp_path: Path
) -> None:
    from PIL import Image

    grey = tmp_path / "grey.jpg"
    Image.new("RGB", (250, 250), (128, 128, 128)).save(grey)
    calls = 0
    real = judge.descriptor

    def counting(rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        nonlocal calls
        calls += 1
        return real(rgb, box)

    judge.descriptor = counting  # type: ignore[method-assign]
    try:
        again = judge.references(PERSON, [*person[1:], grey])
    finally:
        del judge.descriptor
    assert calls == 0  # the three photos were embedded by the fixture already
    assert again.files == refs.files  # the grey photo is left out
    assert np.array_equal(again.descriptors("cnn"), refs.descriptors("cnn"))


def test_bad_cnn_upsample_is_refused() -> None:
    with pytest.raises(ValueError, match="cnn_upsample"):
        DlibJudge(cnn_upsample=3)


# --- who is measured -----------------------------------------------------------------------


def _names(split: str, n: int, prefix: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"{prefix}_{i}"
        if heldout_split(name) == split:
            out.append(name)
        i += 1
    return out


def _folder(root: Path, people: dict[str, int]) -> Path:
    for name, n in people.items():
        (root / name).mkdir(parents=True)
        for k in range(n):
            (root / name / f"{name}_{k:04d}.jpg").write_bytes(b"")
    return root


@pytest.fixture
def lfw_like(tmp_path: Path) -> tuple[Path, Path]:
    """A training folder and a benchmark folder sharing the training people."""
    train = _names("train", 3, "P")
    test, val = _names("test", 2, "P"), _names("validation", 2, "P")
    train_dir = _folder(tmp_path / "train", {n: 3 for n in train} | {test[0]: 1})
    bench = _folder(tmp_path / "bench",
                    {n: 3 for n in train + test + val} | {"Lonely_One": 1})  # fmt: skip
    return train_dir, bench


def test_test_people_are_the_default_and_every_exclusion_is_counted(
    lfw_like: tuple[Path, Path],
) -> None:
    train_dir, bench = lfw_like
    sel = select_people(bench, train_data=[train_dir])
    assert sel.rule == "test" and sel.n_people == 2
    assert all(heldout_split(n) == "test" for n in sel.people)
    assert sel.excluded == {"fewer_than_two_images": 1, "surrogate_training": 3,
                            "other_split": 2, "cap": 0, "no_face": 0}  # fmt: skip
    line = sel.summary_line()
    assert "2 measured" in line and "3 surrogate training" in line and "2 other split" in line
    doc = sel.to_json()
    assert doc["n_people"] == 2 and doc["excluded"]["surrogate_training"] == 3
    assert doc["train_data"] == [str(train_dir)]


def test_a_folder_of_unseen_people_is_used_whole(tmp_path: Path) -> None:
    train_dir = _folder(tmp_path / "train", {n: 3 for n in _names("train", 3, "T")})
    # people the surrogates never saw, most of them on the "train" side of the name rule
    unseen = _names("train", 5, "U") + _names("test", 1, "U")
    bench = _folder(tmp_path / "unseen", {n: 2 for n in unseen})
    sel = select_people(bench, "unseen", train_data=[train_dir])
    assert sorted(sel.people) == sorted(unseen)
    assert sum(sel.excluded.values()) == 0
    assert "left out: none" in sel.summary_line()


def test_without_a_training_folder_the_name_rule_decides(lfw_like: tuple[Path, Path]) -> None:
    _, bench = lfw_like
    sel = select_people(bench, "unseen", train_data=[])
    assert sel.n_people == 4 and sel.excluded["surrogate_training"] == 3
    assert "name rule alone" in sel.description()


def test_the_cap_is_counted_and_an_empty_selection_says_why(lfw_like: tuple[Path, Path]) -> None:
    train_dir, bench = lfw_like
    sel = select_people(bench, "unseen", max_people=1, train_data=[train_dir])
    assert sel.n_people == 1 and sel.excluded["cap"] == 3
    sel.drop(next(iter(sel.people)), "no_face")
    assert sel.n_people == 0 and sel.excluded["no_face"] == 1
    only_train = _folder(bench.parent / "only_train", {n: 2 for n in _names("train", 2, "P")})
    with pytest.raises(InvalidArgument, match="--people unseen"):
        select_people(only_train, "test", train_data=[train_dir])
    with pytest.raises(InvalidArgument):
        select_people(bench, "everyone")  # type: ignore[arg-type]


def test_names_hash_to_the_expected_split() -> None:
    # guards the helper above: the split is the project's fixed rule on sha256(name)
    for name in _names("test", 3, "X"):
        digest = hashlib.sha256(name.encode()).digest()
        assert digest[0] % 4 == 0 and digest[1] % 2 == 1


# --- the figures ---------------------------------------------------------------------------


def _verdict(cnn: bool, hog: bool | None, detected_cnn: bool = True) -> Verdict:
    """A verdict whose CNN-judge and HOG readings match (True) or not; hog None = undetected."""

    def reading(name: str, matched: bool, detected: bool = True) -> Reading:
        return Reading(name, detected, (0.4,) if matched else (0.7,))

    readings = {s.name: reading(s.name, cnn, detected_cnn) for s in READINGS}
    readings["hog"] = (
        Reading("hog", False, ()) if hog is None else reading("hog", hog)
    )
    return Verdict(readings=readings, box=FaceBox(0, 0, 10, 10))


def test_psr_is_the_cnn_judge_and_psr_hog_counts_undetected_as_protected() -> None:
    from veilface.bench.protect import _aggregate

    verdicts = [_verdict(cnn=True, hog=None), _verdict(cnn=False, hog=None, detected_cnn=False),
                _verdict(cnn=True, hog=True), _verdict(cnn=True, hog=False)]  # fmt: skip
    agg = _aggregate(verdicts, [[True], [False], [True], [True]])
    assert agg["psr"] == 0.25  # only the second photo fools the recognizer
    assert agg["psr_hog"] == 0.75  # HOG misses two, mismatches one
    assert agg["n_undetected_hog"] == 2 and agg["n_undetected_cnn"] == 1
    assert agg["psr_surrogates"] == 0.25
    assert agg["dlib_distance"] == pytest.approx((0.4 + 0.7 + 0.4 + 0.4) / 4)



def _result(eps: float, psr: float, ssim: float) -> ProtectBenchResult:
    base = {"psr": 0.0, "psr_hog": 0.0, "psr_mtcnn": 0.0, "psr_jpeg75": 0.0, "psr_resize": 0.0,
            "psr_blur": 0.0, "psr_surrogates": 0.1, "n_undetected_cnn": 0,
            "n_undetected_hog": 0, "n_undetected_mtcnn": 0, "dlib_distance": 0.4}  # fmt: skip
    return ProtectBenchResult(
        psr=psr, psr_hog=min(1.0, psr + 0.3), psr_mtcnn=psr, psr_jpeg75=psr / 2,
        psr_resize=psr / 2, psr_blur=psr, psr_surrogates=1.0, ssim=ssim, ssim_min=ssim - 0.01,
        psnr=30.0, sec_per_image=5.0, cpu_sec_per_image=4.0, n_people=3, n_refused=0,
        n_undetected_cnn=1, n_undetected_hog=2, n_undetected_mtcnn=0,
        dlib_distance_before=0.4, dlib_distance_after=0.55,
        budget={"preset": "medium", "epsilon": eps, "ssim_floor": 0.0, "steps": 5},
        baseline=base, people=[{"name": "P_1"}],
    )  # fmt: skip


def test_sweep_table_json_and_psr_against_ssim_plot(tmp_path: Path) -> None:
    import json

    from PIL import Image

    from veilface.bench.protect import format_table, plot_sweep, write_json

    results = [_result(8, 0.1, 0.97), _result(32, 0.6, 0.85)]
    table = format_table(results).splitlines()
    assert table[0].split()[:4] == ["budget", "psr", "hog", "mtcnn"]
    assert table[1].split()[:3] == ["eps", "8", "0.100"] and "1/2/0" in table[1]
    assert table[-1].startswith("unprotected".rjust(11))
    write_json(results, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["psr"] == 0.1 and [r["psr"] for r in doc["sweep"]] == [0.1, 0.6]
    assert doc["people"] == [{"name": "P_1"}]
    plot_sweep(results, tmp_path / "curve.png")
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size[0] > 300
