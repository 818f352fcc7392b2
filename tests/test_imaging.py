"""decode_image and eval_crop on real encoded files of every awkward kind."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from s4l.imaging import ImageError, PreprocessSpec, decode_image, eval_crop, load_eval_crop


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w=40, h=30) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize(
    "mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"]
)
def test_every_mode_becomes_rgb(mode):
    src = _gradient().convert(mode) if mode not in ("I;16",) else Image.fromarray(
        np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50
    )
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK", "LA") else "PNG"
    img = decode_image(_encode(src, fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 0
    img = decode_image(_encode(Image.fromarray(arr), "PNG"))
    out = np.asarray(img)
    assert out[0, 0, 0] == 0 and out[7, 7, 0] == 255


def test_cmyk_jpeg():
    img = decode_image(_encode(_gradient().convert("CMYK"), "JPEG"))
    assert img.mode == "RGB"


def test_exif_orientation_applied():
    src = _gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW for display
    img = decode_image(_encode(src, "JPEG", exif=exif, quality=95))
    assert img.size == (20, 40)


def test_animated_gif_first_frame():
    frames = [Image.new("P", (16, 16), color=i) for i in (1, 2, 3)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(data)
    assert img.size == (16, 16) and img.mode == "RGB"


def test_errors_have_codes(tmp_path):
    with pytest.raises(ImageError) as e:
        decode_image(b"")
    assert e.value.code == "empty"
    with pytest.raises(ImageError) as e:
        decode_image(np.random.default_rng(0).bytes(1000))
    assert e.value.code == "undecodable"
    full = _encode(_gradient(256, 256), "JPEG", quality=95)
    with pytest.raises(ImageError) as e:
        decode_image(full[: len(full) // 2])
    assert e.value.code == "truncated"
    with pytest.raises(ImageError) as e:
        decode_image(tmp_path / "missing.jpg")
    assert e.value.code == "undecodable"


def _png_header_claiming(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with one tiny IDAT: a decompression bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_checked_from_header():
    with pytest.raises(ImageError) as e:
        decode_image(_png_header_claiming(50_000, 50_000))
    assert e.value.code == "too_many_pixels"
    with pytest.raises(ImageError) as e:
        decode_image(_encode(_gradient(100, 100), "PNG"), max_pixels=5000)
    assert e.value.code == "too_many_pixels" and "10,000" in e.value.message


def test_eval_crop_geometry_and_dtype():
    spec = PreprocessSpec()
    out = eval_crop(_gradient(500, 375), spec)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    tiny = eval_crop(_gradient(1, 1), spec)
    assert tiny.shape == (224, 224, 3)
    small = eval_crop(_gradient(32, 32), PreprocessSpec(resize=36, crop=32))
    assert small.shape == (32, 32, 3)


def test_eval_crop_is_centre_crop_of_short_side_resize():
    # A 512x256 image: short side 256 already, so the crop is the exact central 224 window.
    arr = np.random.default_rng(0).integers(0, 255, (256, 512, 3), dtype=np.uint8)
    out = eval_crop(Image.fromarray(arr), PreprocessSpec())
    np.testing.assert_array_equal(out, arr[16:240, 144:368])


def test_area_resize_averages():
    # Downscaling 2x with area interpolation averages 2x2 blocks exactly.
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[::2, ::2] = 200
    out = eval_crop(Image.fromarray(arr), PreprocessSpec(resize=4, crop=4))
    assert np.all(out == 50)


def test_load_eval_crop_path_and_bytes_agree(tmp_path):
    p = tmp_path / "x.png"
    _gradient(300, 200).save(p)
    a = load_eval_crop(p)
    b = load_eval_crop(p.read_bytes())
    np.testing.assert_array_equal(a, b)


def test_spec_roundtrip_and_validation():
    s = PreprocessSpec(resize=73, crop=64, interpolation="bilinear")
    assert PreprocessSpec.from_dict(s.to_json()) == s
    assert PreprocessSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError):
        PreprocessSpec(interpolation="magic")
    with pytest.raises(ValueError):
        PreprocessSpec(resize=10, crop=20)


def test_undecodable_message_is_clean():
    with pytest.raises(ImageError) as e:
        decode_image(b"not an image at all")
    assert "BytesIO" not in e.value.message and "0x" not in e.value.message


def test_extreme_aspect_ratio_refused_before_resizing():
    with pytest.raises(ImageError) as e:
        eval_crop(Image.new("RGB", (200_000, 1)), PreprocessSpec())
    assert e.value.code == "too_many_pixels"
