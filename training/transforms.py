"""Training and evaluation image transforms, exactly as the S4L release preprocesses images.

S4L_REFERENCE.md "Preprocessing" and the release's `preprocess.py` / `inception_preprocessing.py`:

- train (`inception_crop|resize(224)|flip_lr|-1_to_1`): TF `sample_distorted_bounding_box` with
  its defaults (area 0.05-1, aspect 0.75-1.33, at least 10% of the image covered, 100 tries,
  whole image as the fallback; `sample_crop_box` reproduces the kernel's sampling, including
  that it samples the crop HEIGHT uniformly, not the area), then TF1 `resize_images` bilinear
  (align_corners=False, half_pixel_centers=False: the legacy TF1 sampling grid, no antialias;
  `half_pixel_centers=True` gives torch's `interpolate` grid instead), then a random
  horizontal flip. Pixels stay float (no rounding back to uint8) until x / 127.5 - 1.
- HSV noise (supervised 1%, exemplar): `apply_hsv_noise`, the release's `hsvnoise`; it can be
  deferred to the GPU (`TrainTransform(defer_hsv=True)` + `apply_deferred_hsv`).
- exemplar (`crop_inception_patches(8,224)|hsvnoise|flip_lr|-1_to_1`): 8 independent inception
  crops of one image, each with its own HSV noise and flip.
- rotation (`rotate`): `rotate4`, exact rot90 copies labelled 0..3, run on any device.
- eval (`resize_small(256)|crop(224)|-1_to_1`): `s4l.imaging.eval_crop` (THE eval crop the
  service also uses) then `to_model_input`.

Randomness is explicit: every random transform takes a `numpy.random.Generator`, so a sample's
augmentation is a pure function of the generator's seed (`s4l.training.data` seeds it from
(seed, stream, epoch, index), which makes resumed and multi-worker runs identical).
Flip and HSV noise commute (HSV noise is per pixel), so the release's two orders
(`flip_lr|hsvnoise` for supervised 1%, `hsvnoise|flip_lr` for exemplar) are the same function.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from s4l.imaging import PreprocessSpec, eval_crop

# TF sample_distorted_bounding_box defaults, as used by the release's inception crop.
AREA_RANGE = (0.05, 1.0)
ASPECT_RANGE = (0.75, 1.33)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 100

# Training crops: the release's inception crop, or the CIFAR benchmarks' pad-and-crop.
CROPS = ("inception", "pad-crop")

# The release's hsvnoise defaults.
HSV_HUE_ADD = (-0.1, 0.1)
HSV_SV_POW = (-2.0, 2.0)
HSV_SV_MUL = (-0.5, 0.5)
HSV_SV_ADD = (-0.1, 0.1)


# --------------------------------------------------------------------------------------------
# Inception crop


def _random_crop(rng: np.random.Generator, width: int, height: int, min_rel: float,
                 max_rel: float, aspect: float) -> tuple[int, int, int, int] | None:
    """One attempt of TF's GenerateRandomCrop: (top, left, h, w) or None if it fails."""
    if max_rel <= 0 or aspect <= 0 or width <= 0 or height <= 0 or min_rel > max_rel:
        return None
    min_area = min_rel * width * height
    max_area = max_rel * width * height
    h = int(round(math.sqrt(min_area / aspect)))
    max_h = int(round(math.sqrt(max_area / aspect)))
    if round(max_h * aspect) > width:
        # The largest max_h with round(max_h * aspect) <= width.
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
        h += int(rng.integers(0, max_h - h + 1))  # closed range [h, max_h]
    w = int(round(h * aspect))
    area = w * h
    if area < min_area:  # rounding: try a slightly bigger box once
        h += 1
        w = int(round(h * aspect))
        area = w * h
    if area < min_area or area > max_area or not (0 < w <= width) or not (0 < h <= height):
        return None
    # TF draws the offset from [0, size - crop), so a crop smaller than the image never
    # touches the bottom/right edge; kept for fidelity.
    top = int(rng.integers(0, height - h)) if h < height else 0
    left = int(rng.integers(0, width - w)) if w < width else 0
    return top, left, h, w


def sample_crop_box(height: int, width: int, rng: np.random.Generator, *,
                    area_range: tuple[float, float] = AREA_RANGE,
                    aspect_range: tuple[float, float] = ASPECT_RANGE,
                    min_object_covered: float = MIN_OBJECT_COVERED,
                    max_attempts: int = MAX_ATTEMPTS) -> tuple[int, int, int, int]:
    """TF `sample_distorted_bounding_box` on the whole image: (top, left, crop_h, crop_w).

    Each attempt draws an aspect ratio (width / height) uniformly, then a crop height uniformly
    between the heights giving the min and max area; the box must cover at least
    `min_object_covered` of the image. After `max_attempts` failures: the whole image.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    lo, hi = aspect_range
    for _ in range(max_attempts):
        aspect = rng.random() * (hi - lo) + lo
        box = _random_crop(rng, width, height, area_range[0], area_range[1], aspect)
        if box is not None and box[2] * box[3] >= max(1.0, min_object_covered * height * width):
            return box
    return 0, 0, height, width


def _axis_weights(in_size: int, out_size: int, half_pixel_centers: bool):
    scale = in_size / out_size
    o = torch.arange(out_size, dtype=torch.float64)
    src = (o + 0.5) * scale - 0.5 if half_pixel_centers else o * scale
    src = src.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    frac = (src - i0.double()).to(torch.float32)
    return i0, i1, frac


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], *,
                    half_pixel_centers: bool = False) -> torch.Tensor:
    """Bilinear resize of float `[..., H, W]` to `size` (no antialiasing, like TF1).

    half_pixel_centers=False is TF1 `resize_images`' legacy grid (source = dst * in/out), the
    release's; True is the half-pixel grid of torch `interpolate(align_corners=False)`.
    """
    oh, ow = size
    h, w = x.shape[-2], x.shape[-1]
    if (h, w) == (oh, ow):
        return x
    y0, y1, fy = _axis_weights(h, oh, half_pixel_centers)
    x0, x1, fx = _axis_weights(w, ow, half_pixel_centers)
    fy = fy.to(x.device).view(-1, 1)
    fx = fx.to(x.device)
    dev = x.device
    rows = torch.lerp(x.index_select(-2, y0.to(dev)), x.index_select(-2, y1.to(dev)), fy)
    return torch.lerp(rows.index_select(-1, x0.to(dev)), rows.index_select(-1, x1.to(dev)), fx)


def _as_hwc_uint8(img: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)
    arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {list(arr.shape)}")
    return arr


def inception_crop(img: Image.Image | np.ndarray, size: int | tuple[int, int],
                   rng: np.random.Generator, *, area_range=AREA_RANGE, aspect_range=ASPECT_RANGE,
                   min_object_covered: float = MIN_OBJECT_COVERED,
                   max_attempts: int = MAX_ATTEMPTS,
                   half_pixel_centers: bool = False) -> torch.Tensor:
    """Inception crop + bilinear resize: float `[3, size, size]` with values in [0, 255]."""
    arr = _as_hwc_uint8(img)
    top, left, h, w = sample_crop_box(arr.shape[0], arr.shape[1], rng, area_range=area_range,
                                      aspect_range=aspect_range,
                                      min_object_covered=min_object_covered,
                                      max_attempts=max_attempts)
    # np.array copies: a PIL-backed array is read-only, which torch.from_numpy warns about.
    crop = torch.from_numpy(np.array(arr[top:top + h, left:left + w], dtype=np.float32))
    crop = crop.permute(2, 0, 1).contiguous()
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    return resize_bilinear(crop, out_hw, half_pixel_centers=half_pixel_centers).contiguous()


def pad_crop(img: Image.Image | np.ndarray, size: int, pad: int,
             rng: np.random.Generator) -> torch.Tensor:
    """The CIFAR benchmarks' crop (Oliver et al. 2018, FixMatch, USB): resize to `size` if
    needed, reflect-pad by `pad` pixels, take a random `size` x `size` window (a translation of up
    to `pad` pixels): float `[3, size, size]` in [0, 255]. NOT the release's preprocessing; the
    config field `data.augment = "pad-crop"` selects it."""
    arr = _as_hwc_uint8(img)
    if arr.shape[0] != size or arr.shape[1] != size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    if pad > 0:
        arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    crop = np.array(arr[top:top + size, left:left + size], dtype=np.float32)
    return torch.from_numpy(crop).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# HSV noise


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] on dim -3 to HSV in [0, 1] (hue as a fraction of the colour circle)."""
    r, g, b = rgb.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    # 1/0 = inf is never selected: where() picks 0 there, so no NaN reaches the output.
    inv_delta = torch.where(delta > 0, delta.reciprocal(), 0.0)
    hue = torch.where(
        maxc == r, (g - b) * inv_delta,
        torch.where(maxc == g, (b - r) * inv_delta + 2.0, (r - g) * inv_delta + 4.0),
    )
    hue = hue * (1.0 / 6.0)  # in [-1/6, 5/6): one wrap suffices
    hue = torch.where(delta > 0, torch.where(hue < 0, hue + 1.0, hue), 0.0)
    sat = delta * torch.where(maxc > 0, maxc.reciprocal(), 0.0)
    return torch.stack([hue, sat, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: each channel is v * (1 - s + s * ramp(hue))."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6.0
    ramps = (
        ((h6 - 3.0).abs() - 1.0).clamp(0.0, 1.0),
        (2.0 - (h6 - 2.0).abs()).clamp(0.0, 1.0),
        (2.0 - (h6 - 4.0).abs()).clamp(0.0, 1.0),
    )
    return torch.stack([v * (1.0 - s + s * ramp) for ramp in ramps], dim=-3)


@dataclasses.dataclass(frozen=True)
class HSVNoise:
    """One draw of the release's hsvnoise: hue += hue_add (mod 1); for c in (s, v):
    c = c ** pow[c] * mul[c] + add[c]; everything clipped to [0, 1]."""

    hue_add: float = 0.0
    sv_pow: tuple[float, float] = (1.0, 1.0)
    sv_mul: tuple[float, float] = (1.0, 1.0)
    sv_add: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> HSVNoise:
        """hue + U(-0.1, 0.1); S and V each independently ** 2^U(-2, 2), * 2^U(-0.5, 0.5),
        + U(-0.1, 0.1) (the release's defaults)."""
        hue = float(rng.uniform(*HSV_HUE_ADD))
        pw = 2.0 ** rng.uniform(*HSV_SV_POW, size=2)
        mul = 2.0 ** rng.uniform(*HSV_SV_MUL, size=2)
        add = rng.uniform(*HSV_SV_ADD, size=2)
        return cls(hue, (float(pw[0]), float(pw[1])), (float(mul[0]), float(mul[1])),
                   (float(add[0]), float(add[1])))

    def as_tensor(self) -> torch.Tensor:
        """The 7 numbers [hue_add, pow_s, pow_v, mul_s, mul_v, add_s, add_v] (float32)."""
        return torch.tensor([self.hue_add, *self.sv_pow, *self.sv_mul, *self.sv_add],
                            dtype=torch.float32)


def apply_hsv_noise(x: torch.Tensor, noise: HSVNoise | torch.Tensor) -> torch.Tensor:
    """Apply `noise` to float RGB `[..., 3, H, W]` in [0, 255]; returns the same range.

    `noise` is one `HSVNoise`, or a tensor `[..., 7]` (`HSVNoise.as_tensor()` rows) whose
    leading dims match x's, one draw per image: the batched form runs on any device.
    """
    if isinstance(noise, HSVNoise):
        hue_add, (ps, pv), (ms, mv), (as_, av) = noise.hue_add, noise.sv_pow, noise.sv_mul, noise.sv_add
    else:
        if noise.shape[-1] != 7 or noise.shape[:-1] != x.shape[:-3]:
            raise ValueError(f"HSV parameters {list(noise.shape)} do not match images {list(x.shape)}")
        hue_add, ps, pv, ms, mv, as_, av = noise.to(x.dtype)[..., None, None].unbind(-3)
    hsv = rgb_to_hsv(x / 255.0)
    h, s, v = hsv.unbind(-3)
    h = torch.remainder(1.0 + h + hue_add, 1.0)
    s = s.pow(ps) * ms + as_
    v = v.pow(pv) * mv + av
    hsv = torch.stack([h, s, v], dim=-3).clamp(0.0, 1.0)
    return hsv_to_rgb(hsv) * 255.0


def apply_deferred_hsv(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """HSV noise on model inputs in [-1, 1] (e.g. on the GPU, after the loader):
    `x [..., 3, H, W]`, `params [..., 7]` as yielded by a loader built with hsv_on_device."""
    return apply_hsv_noise((x + 1.0) * 127.5, params) / 127.5 - 1.0


def hsv_noise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The release's `hsvnoise` with a fresh draw from `rng`."""
    return apply_hsv_noise(x, HSVNoise.sample(rng))


# --------------------------------------------------------------------------------------------
# Rotation and scaling


def rotate4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's `rotate`: 4 exact rot90 copies of square images, labels 0..3.

    `[N, C, H, W]` -> (`[4N, C, H, W]`, labels `[4N]`), image-major: copy r of image i is at
    4*i + r. `[C, H, W]` -> (`[4, C, H, W]`, `[4]`). Rotation r turns the image by r * 90
    degrees counter-clockwise (the release's transpose(reverse_width(img)) for r = 1). Pure
    indexing: exact in any dtype and on any device.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"rotate4 expects [C, H, W] or [N, C, H, W], got {list(x.shape)}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate4 needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    rots = [x] + [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    if x.dim() == 3:
        out = torch.stack(rots, dim=0)
        labels = torch.arange(4, device=x.device)
    else:
        out = torch.stack(rots, dim=1).flatten(0, 1)
        labels = torch.arange(4, device=x.device).repeat(x.shape[0])
    return out, labels


def to_model_input(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HWC image (or NHWC batch) -> float32 CHW (NCHW) in [-1, 1] as x / 127.5 - 1.

    The release's `-1_to_1`; the ONNX graph applies the same scaling to its uint8 input.
    """
    t = torch.from_numpy(np.array(x, copy=True)) if isinstance(x, np.ndarray) else x
    if t.dtype != torch.uint8:
        raise ValueError(f"to_model_input expects uint8 pixels, got {t.dtype}")
    if t.dim() == 3 and t.shape[-1] == 3:
        t = t.permute(2, 0, 1)
    elif t.dim() == 4 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"to_model_input expects [H, W, 3] or [N, H, W, 3], got {list(t.shape)}")
    return (t.to(torch.float32) / 127.5 - 1.0).contiguous()


# --------------------------------------------------------------------------------------------
# Whole transforms


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Release training preprocessing for one image: `copies` x (inception crop, resize, flip,
    optional HSV noise), scaled to [-1, 1]; returns float32 `[copies, 3, size, size]`.

    copies=1 is `inception_crop|resize|flip_lr` (add hsv_noise=True for supervised 1%);
    copies=8 with hsv_noise=True is the exemplar pipeline. HSV noise costs a few ms per
    224 px copy on a CPU core; with defer_hsv=True `draw` returns the copies without it plus
    the drawn parameters `[copies, 7]`, for `apply_deferred_hsv` on the GPU (same draws from
    the same generator, so the result equals the CPU path up to float rounding).
    """

    size: int = 224
    copies: int = 1
    hsv_noise: bool = False
    flip: bool = True
    area_range: tuple[float, float] = AREA_RANGE
    aspect_range: tuple[float, float] = ASPECT_RANGE
    min_object_covered: float = MIN_OBJECT_COVERED
    max_attempts: int = MAX_ATTEMPTS
    half_pixel_centers: bool = False
    defer_hsv: bool = False
    crop: str = "inception"   # or "pad-crop" (pad_crop: the CIFAR benchmarks' crop)
    pad: int = 4

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if self.size < 1 or self.copies < 1:
            raise ValueError(f"need size >= 1 and copies >= 1, got {self.size}, {self.copies}")
        if not 0 < self.area_range[0] <= self.area_range[1] <= 1:
            raise ValueError(f"area_range must satisfy 0 < lo <= hi <= 1, got {self.area_range}")
        if self.defer_hsv and not self.hsv_noise:
            raise ValueError("defer_hsv needs hsv_noise=True")

    def draw(self, img: Image.Image | np.ndarray,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(copies `[K, 3, S, S]` in [-1, 1], HSV parameters `[K, 7]` if deferred else None)."""
        arr = _as_hwc_uint8(img)
        out, params = [], []
        for _ in range(self.copies):
            if self.crop == "pad-crop":
                x = pad_crop(arr, self.size, self.pad, rng)
            else:
                x = inception_crop(arr, self.size, rng, area_range=self.area_range,
                                   aspect_range=self.aspect_range,
                                   min_object_covered=self.min_object_covered,
                                   max_attempts=self.max_attempts,
                                   half_pixel_centers=self.half_pixel_centers)
            if self.flip and rng.random() < 0.5:
                x = x.flip(-1)
            if self.hsv_noise:
                noise = HSVNoise.sample(rng)
                if self.defer_hsv:
                    params.append(noise.as_tensor())
                else:
                    x = apply_hsv_noise(x, noise)
            out.append(x)
        return torch.stack(out) / 127.5 - 1.0, (torch.stack(params) if params else None)

    def __call__(self, img: Image.Image | np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        if self.defer_hsv:
            raise ValueError("this transform defers its HSV noise: call draw()")
        return self.draw(img, rng)[0]


def exemplar_transform(size: int = 224, copies: int = 8) -> TrainTransform:
    """The release's exemplar preprocessing: 8 inception crops, each with HSV noise and flip."""
    return TrainTransform(size=size, copies=copies, hsv_noise=True)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """`s4l.imaging.eval_crop` then `to_model_input`: float32 `[1, 3, crop, crop]` in [-1, 1]."""

    spec: PreprocessSpec = PreprocessSpec()

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return to_model_input(eval_crop(img, self.spec))[None]
