"""s4l.training.transforms: release inception crop, HSV noise, exact rotations, eval transform."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from s4l.imaging import PreprocessSpec, eval_crop
from s4l.training import transforms as T

# --------------------------------------------------------------------------------------------
# Rotations


def _release_rotations(img_hwc: torch.Tensor) -> list[torch.Tensor]:
    """The release's `_four_rots`, written with its own reverse/transpose ops on HWC."""
    return [
        img_hwc,
        img_hwc.flip(1).permute(1, 0, 2),
        img_hwc.flip(0).flip(1),
        img_hwc.permute(1, 0, 2).flip(1),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bfloat16])
def test_rotate4_matches_release_and_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 3, 7, 7, generator=g) * 255).to(dtype)
    out, labels = T.rotate4(x)
    assert out.shape == (12, 3, 7, 7) and out.dtype == dtype
    assert labels.tolist() == [0, 1, 2, 3] * 3 and labels.dtype == torch.int64
    for i in range(3):
        ref = _release_rotations(x[i].permute(1, 2, 0))
        for r in range(4):
            assert torch.equal(out[4 * i + r], ref[r].permute(2, 0, 1)), (i, r)
    # Rotation 1 applied four times is the identity; rotation 1 then 3 as well.
    y = x
    for _ in range(4):
        y = T.rotate4(y)[0][1::4]
    assert torch.equal(y, x)
    assert torch.equal(T.rotate4(T.rotate4(x)[0][1::4])[0][3::4], x)


def test_rotate4_single_image_and_errors():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    out, labels = T.rotate4(x)
    assert out.shape == (4, 2, 3, 3) and labels.tolist() == [0, 1, 2, 3]
    # Counter-clockwise: the top-right pixel moves to the top-left.
    assert out[1, 0, 0, 0] == x[0, 0, 2]
    with pytest.raises(ValueError, match="square"):
        T.rotate4(torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        T.rotate4(torch.zeros(3, 4))


# --------------------------------------------------------------------------------------------
# HSV noise


def test_rgb_hsv_conversions_match_matplotlib():
    rng = np.random.default_rng(0)
    rgb = rng.random((3, 9, 11)).astype(np.float32)
    rgb[:, 0, :3] = [[0.2], [0.2], [0.2]]  # grey pixels: hue 0, saturation 0
    rgb[:, 1, 0] = 0.0                     # black
    hsv = T.rgb_to_hsv(torch.from_numpy(rgb))
    ref = mcolors.rgb_to_hsv(rgb.transpose(1, 2, 0)).transpose(2, 0, 1)
    np.testing.assert_allclose(hsv.numpy(), ref, atol=1e-6)
    back = T.hsv_to_rgb(torch.from_numpy(ref.astype(np.float32)))
    np.testing.assert_allclose(back.numpy(), rgb, atol=1e-6)


def _hsv_noise_reference(rgb255: np.ndarray, n: T.HSVNoise) -> np.ndarray:
    """The release's formula on [0,1] channels, in numpy/matplotlib."""
    hsv = mcolors.rgb_to_hsv(rgb255.transpose(1, 2, 0) / 255.0)
    hsv[..., 0] = np.mod(1.0 + hsv[..., 0] + n.hue_add, 1.0)
    for c in (1, 2):
        hsv[..., c] = hsv[..., c] ** n.sv_pow[c - 1] * n.sv_mul[c - 1] + n.sv_add[c - 1]
    return mcolors.hsv_to_rgb(np.clip(hsv, 0, 1)).transpose(2, 0, 1) * 255.0


def test_hsv_noise_formula_range_and_determinism():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, (3, 16, 16)).astype(np.float32))
    draws = [T.HSVNoise.sample(np.random.default_rng(s)) for s in range(300)]
    for d in draws:
        assert -0.1 <= d.hue_add <= 0.1
        assert all(0.25 <= p <= 4.0 for p in d.sv_pow)
        assert all(2 ** -0.5 <= m <= 2 ** 0.5 for m in d.sv_mul)
        assert all(-0.1 <= a <= 0.1 for a in d.sv_add)
    # The draws use the whole ranges, S and V independently.
    assert min(d.sv_pow[0] for d in draws) < 0.3 and max(d.sv_pow[0] for d in draws) > 3.5
    assert any(d.sv_pow[0] != d.sv_pow[1] for d in draws)
    for d in draws[:20]:
        y = T.apply_hsv_noise(x, d)
        assert float(y.min()) >= 0.0 and float(y.max()) <= 255.0 + 1e-3
        np.testing.assert_allclose(y.numpy(), _hsv_noise_reference(x.numpy(), d), atol=2e-3)
    a = T.hsv_noise(x, np.random.default_rng(7))
    assert torch.equal(a, T.hsv_noise(x, np.random.default_rng(7)))
    assert not torch.allclose(a, T.hsv_noise(x, np.random.default_rng(8)))


def test_hsv_noise_identity_and_hue_shift():
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 5, 5)).astype(np.float32))
    torch.testing.assert_close(T.apply_hsv_noise(x, T.HSVNoise()), x, atol=1e-3, rtol=0)
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    cyan = T.apply_hsv_noise(red, T.HSVNoise(hue_add=0.5))
    torch.testing.assert_close(cyan.flatten(), torch.tensor([0.0, 255.0, 255.0]))


# --------------------------------------------------------------------------------------------
# Inception crop


@pytest.mark.parametrize("hw", [(224, 224), (300, 400), (32, 32), (375, 500)])
def test_crop_box_bounds(hw):
    h_img, w_img = hw
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(400):
        top, left, h, w = T.sample_crop_box(h_img, w_img, rng)
        assert 0 <= top and 0 <= left and top + h <= h_img and left + w <= w_img
        frac = h * w / (h_img * w_img)
        assert 0.1 <= frac <= 1.0  # at least 10% of the image covered (min_object_covered)
        if (h, w) != (h_img, w_img):
            assert 0.75 - 1.5 / h <= w / h <= 1.33 + 1.5 / h  # aspect up to rounding
            if h < h_img:
                assert top + h < h_img  # TF draws offsets from [0, H - h)
        areas.append(frac)
    assert min(areas) < 0.2 and max(areas) > 0.8  # the whole range is used


def test_crop_box_area_range_and_fallback():
    rng = np.random.default_rng(0)
    # Without the 10% cover constraint the area range's lower bound 0.05 rules (up to rounding).
    fr = [h * w / 40000 for _, _, h, w in
          (T.sample_crop_box(200, 200, rng, min_object_covered=0.0) for _ in range(500))]
    assert min(fr) >= 0.05 - 0.01 and min(fr) < 0.1
    # A 25:1 strip has no 3:4..4:3 box covering 10% of it: every try fails -> whole image.
    assert T.sample_crop_box(20, 500, rng) == (0, 0, 20, 500)
    assert T.sample_crop_box(200, 200, rng, area_range=(1.0, 1.0)) == (0, 0, 200, 200)


def test_inception_crop_content_size_and_determinism():
    arr = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    top, left, h, w = T.sample_crop_box(60, 80, np.random.default_rng(5))
    # Resized to the crop's own size, the output is exactly the crop.
    out = T.inception_crop(arr, (h, w), np.random.default_rng(5))
    assert torch.equal(out, torch.from_numpy(arr[top:top + h, left:left + w].astype(np.float32)).permute(2, 0, 1))
    out = T.inception_crop(Image.fromarray(arr), 32, np.random.default_rng(5))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 255
    assert torch.equal(out, T.inception_crop(arr, 32, np.random.default_rng(5)))


def test_resize_bilinear_grids():
    x = torch.from_numpy(np.random.default_rng(4).random((2, 3, 20, 30)).astype(np.float32))
    ref = F.interpolate(x, (13, 47), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(T.resize_bilinear(x, (13, 47), half_pixel_centers=True), ref,
                               atol=1e-5, rtol=0)
    # TF1 legacy grid: source = dst * in/out, so 4 -> 2 samples rows/cols 0 and 2 exactly.
    g = torch.arange(16, dtype=torch.float32).view(1, 4, 4)
    assert T.resize_bilinear(g, (2, 2)).tolist() == [[[0.0, 2.0], [8.0, 10.0]]]
    # Upsampling 2 -> 4 on the legacy grid: 0, 0.5, 1, 1 (edge clamped).
    e = torch.tensor([[[0.0, 2.0]]])
    assert T.resize_bilinear(e, (1, 4)).tolist() == [[[0.0, 1.0, 2.0, 2.0]]]


def test_train_transform_single_and_exemplar():
    img = Image.fromarray(np.random.default_rng(6).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    t1 = T.TrainTransform(size=32)
    a = t1(img, np.random.default_rng(0))
    assert a.shape == (1, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, t1(img, np.random.default_rng(0)))
    assert not torch.equal(a, t1(img, np.random.default_rng(1)))
    ex = T.exemplar_transform(size=24)
    b = ex(img, np.random.default_rng(0))
    assert b.shape == (8, 3, 24, 24)
    assert float(b.min()) >= -1 and float(b.max()) <= 1 + 1e-6
    # 8 independent copies: all different.
    assert len({tuple(b[k].flatten()[:64].tolist()) for k in range(8)}) == 8
    with pytest.raises(ValueError):
        T.TrainTransform(size=32, area_range=(0.0, 1.0))


def test_flip_is_horizontal():
    # A full-image crop (area_range=(1,1)) of an image with a left-right gradient: flipped or not.
    arr = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 10, (16, 1, 3))
    t = T.TrainTransform(size=16, area_range=(1.0, 1.0))
    seen = set()
    for s in range(20):
        x = (t(arr, np.random.default_rng(s))[0] + 1) * 127.5
        row = x[0, 0].round().tolist()
        assert row in (list(range(0, 160, 10)), list(range(150, -10, -10)))
        assert torch.equal(x[:, 0], x[:, 5])  # rows unchanged: no vertical flip
        seen.add(row[0])
    assert seen == {0.0, 150.0}


# --------------------------------------------------------------------------------------------
# Eval transform and scaling


def test_to_model_input():
    x = np.array([[[0, 255, 127]]], dtype=np.uint8)  # [1, 1, 3]
    y = T.to_model_input(x)
    assert y.shape == (3, 1, 1) and y.dtype == torch.float32
    assert y.flatten().tolist() == [-1.0, 1.0, pytest.approx(127 / 127.5 - 1)]
    batch = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    yb = T.to_model_input(torch.from_numpy(batch))
    assert yb.shape == (2, 3, 5, 6)
    assert torch.equal(yb[1], T.to_model_input(batch[1]))
    with pytest.raises(ValueError, match="uint8"):
        T.to_model_input(batch.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        T.to_model_input(np.zeros((3, 5, 5), np.uint8))


def test_eval_transform_is_eval_crop(tmp_path):
    arr = np.random.default_rng(9).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.jpg", quality=90)
    img = Image.open(tmp_path / "x.jpg").convert("RGB")
    spec = PreprocessSpec(resize=37, crop=32)
    x = T.EvalTransform(spec)(img)
    assert x.shape == (1, 3, 32, 32)
    crop = eval_crop(img, spec)
    assert torch.equal(((x[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0),
                       torch.from_numpy(crop.copy()))
    assert torch.equal(x[0], T.to_model_input(crop))


def test_deferred_hsv_equals_cpu_hsv():
    img = np.random.default_rng(11).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    cpu = T.TrainTransform(size=16, copies=8, hsv_noise=True)
    dev = T.TrainTransform(size=16, copies=8, hsv_noise=True, defer_hsv=True)
    ref = cpu(img, np.random.default_rng(4))
    x, params = dev.draw(img, np.random.default_rng(4))
    assert params.shape == (8, 7)
    assert not torch.allclose(x, ref, atol=1e-3)  # not applied yet
    torch.testing.assert_close(T.apply_deferred_hsv(x, params), ref, atol=1e-4, rtol=0)
    # Batched parameters [N, K, 7] act per image.
    xb, pb = torch.stack([x, x.flip(0)]), torch.stack([params, params.flip(0)])
    out = T.apply_deferred_hsv(xb, pb)
    torch.testing.assert_close(out[1], ref.flip(0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="do not match"):
        T.apply_deferred_hsv(xb, params)
    with pytest.raises(ValueError, match="call draw"):
        dev(img, np.random.default_rng(4))
    with pytest.raises(ValueError, match="needs hsv_noise"):
        T.TrainTransform(defer_hsv=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rotate4_and_hsv_on_cuda():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out, labels = T.rotate4(x.cuda())
    assert labels.device.type == "cuda" and torch.equal(out.cpu(), T.rotate4(x)[0])
    params = torch.stack([T.HSVNoise.sample(np.random.default_rng(s)).as_tensor() for s in range(4)])
    torch.testing.assert_close(T.apply_deferred_hsv(x.cuda(), params.cuda()).cpu(),
                               T.apply_deferred_hsv(x, params), atol=1e-4, rtol=0)


def test_pad_crop_is_a_translation_of_the_reflect_padded_image():
    import numpy as np
    import torch

    from s4l.training.transforms import TrainTransform, pad_crop

    img = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect").astype(np.float32)
    seen = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x = pad_crop(img, 32, 4, rng)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        # Find the window: it must be one of the 9x9 translations, exactly.
        hits = [(t, c) for t in range(9) for c in range(9)
                if np.array_equal(padded[t:t + 32, c:c + 32].transpose(2, 0, 1), x.numpy())]
        assert hits, seed
        seen.add(hits[0])
    assert len(seen) > 10  # the offsets really vary
    # Zero padding: the image itself.
    assert np.array_equal(pad_crop(img, 32, 0, np.random.default_rng(1)).numpy(),
                          img.transpose(2, 0, 1).astype(np.float32))
    t = TrainTransform(size=32, crop="pad-crop", pad=4, copies=2)
    out = t(img, np.random.default_rng(3))
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="crop must be one of"):
        TrainTransform(crop="random")


def test_augment_config_is_validated_and_default_keeps_the_old_hash():
    from s4l.errors import UserError
    from s4l.training import config as C
    from s4l.training.presets import get_preset

    cfg = get_preset("supervised-10pct-smoke").config
    # Fields added after runs were recorded (data.augment, data.pad_crop,
    # objective.class_rotations) are left out of the hash at their defaults.
    assert {"data.augment", "data.pad_crop", "objective.class_rotations"} <= set(C.ADDED_FIELDS)
    old = {k: v for k, v in C.flatten(C.to_dict(cfg)).items() if k not in C.ADDED_FIELDS}
    assert C.semantic_dict(cfg) == {k: v for k, v in old.items() if k not in C.EXECUTION_ONLY}
    pc = C.apply_overrides(cfg, ["data.augment=pad-crop"])
    assert C.config_hash(pc) != C.config_hash(cfg)
    up = C.apply_overrides(cfg, ["objective.class_rotations=upright"])
    assert C.config_hash(up) != C.config_hash(cfg)
    C.validate(pc)
    with pytest.raises(UserError, match="data.augment"):
        C.validate(C.apply_overrides(cfg, ["data.augment=autoaugment"]))
