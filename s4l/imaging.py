"""Image decoding and THE evaluation crop, shared by training, evaluation and the service.

Torch-free on purpose: the server imports it. Training's eval transform, feature extraction
and the HTTP service all call `eval_crop`, so the uint8 crop a model sees cannot drift between
them (S4L_REFERENCE.md "Preprocessing": short side to 256 with area interpolation, centre crop
224; pixels are scaled to [-1, 1] afterwards, in torch or inside the ONNX graph).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# 40 megapixels: above any real photo a user would send for classification, far below the
# 2.5 gigapixels of a 50,000 x 50,000 "decompression bomb". Configurable per call.
DEFAULT_MAX_PIXELS = 40_000_000

_INTERPOLATIONS = {
    # "area" is TF's AREA resize; for downscaling PIL's BOX filter averages exactly the source
    # pixels each output pixel covers, the same antialiased area average.
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An image that cannot be used. `code` is one of ERROR_CODES."""

    ERROR_CODES = ("empty", "undecodable", "truncated", "too_many_pixels")

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _open(data: bytes | str | os.PathLike) -> tuple[Image.Image, str]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if not raw:
            raise ImageError("empty", "the image is empty (0 bytes)")
        name = "<bytes>"
        fp: Any = io.BytesIO(raw)
    else:
        path = Path(data)
        name = str(path)
        try:
            if path.stat().st_size == 0:
                raise ImageError("empty", f"{name}: the image file is empty (0 bytes)")
        except FileNotFoundError as e:
            raise ImageError("undecodable", f"{name}: no such file") from e
        fp = path
    try:
        # Image.open only parses the header: width and height are known before any pixel
        # data is decoded, so the pixel limit below is checked before the expensive part.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", f"{name}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).replace(repr(fp), "the data") if name == "<bytes>" else str(e)
        raise ImageError("undecodable", f"{name}: not a decodable image ({reason})") from e
    return img, name


def decode_image(
    data: bytes | str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode bytes or a file into an RGB PIL image.

    EXIF orientation is applied, every mode (L, LA, P, RGBA, CMYK, I;16, ...) becomes RGB
    (transparency composited on black, as a plain `convert("RGB")` does for RGBA), and only
    the first frame of an animation is used. `max_pixels` (width*height, None = no limit) is
    checked from the header before decoding; a truncated file is an error, never a silently
    grey-padded image.
    """
    img, name = _open(data)
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}",
        )
    if w < 1 or h < 1:
        raise ImageError("undecodable", f"{name}: image has no pixels ({w}x{h})")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Another library switched PIL to padding truncated files with grey; we refuse them.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except OSError as e:
        msg = str(e)
        code = "truncated" if "truncated" in msg.lower() or "premature" in msg.lower() else "undecodable"
        raise ImageError(code, f"{name}: {msg}") from e
    except (ValueError, SyntaxError, struct.error) as e:
        raise ImageError("undecodable", f"{name}: {e}") from e
    return rgb


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grey: scale the full range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        maxv = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / maxv * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr8[:, :, None], 3, axis=2))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr8[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """The eval transform: short side to `resize` (aspect kept), centre crop `crop` x `crop`."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "area"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; valid: {sorted(_INTERPOLATIONS)}"
            )
        if not (0 < self.crop <= self.resize):
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop} resize={self.resize}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str) -> PreprocessSpec:
        if isinstance(d, str):
            d = json.loads(d)
        return cls(**{k: d[k] for k in ("resize", "crop", "interpolation") if k in d})

    @classmethod
    def for_image_size(cls, size: int) -> PreprocessSpec:
        """The spec for models trained at `size` px: ImageNet's 256/224 ratio, scaled."""
        return cls(resize=round(size * 256 / 224), crop=size)


def eval_crop(img: Image.Image, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """THE eval crop: uint8 RGB array [crop, crop, 3] from a decoded RGB image."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))
    if nw * nh > DEFAULT_MAX_PIXELS:
        # An extreme aspect ratio (e.g. 40,000,000 x 1) passes the decode limit but would
        # resize to billions of pixels.
        raise ImageError(
            "too_many_pixels",
            f"a {w}x{h} image resizes to {nw}x{nh} for the eval crop: aspect ratio too extreme",
        )
    if (nw, nh) != (w, h):
        resample = _INTERPOLATIONS[spec.interpolation]
        if resample == Image.Resampling.BOX and (nw > w or nh > h):
            # BOX is an area average for downscaling only; upscaling uses bilinear, as TF's
            # AREA resize does when the output is larger than the input.
            resample = Image.Resampling.BILINEAR
        img = img.resize((nw, nh), resample=resample)
    left = (nw - spec.crop) // 2
    top = (nh - spec.crop) // 2
    out = np.asarray(img.crop((left, top, left + spec.crop, top + spec.crop)), dtype=np.uint8)
    return np.ascontiguousarray(out)


def load_eval_crop(
    data: bytes | str | os.PathLike,
    spec: PreprocessSpec = PreprocessSpec(),
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """decode_image + eval_crop in one call."""
    return eval_crop(decode_image(data, max_pixels=max_pixels), spec)
