"""Tests for the one decode + resize (bonexray.imaging)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.imaging import (
    ImageError,
    decode_gray,
    is_view_file,
    load_view,
    resize_gray,
)


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


def _fails(path: Path, match: str | None = None) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        decode_gray(path)
    message = str(info.value)
    assert message and "\n" not in message
    return info.value


# --- decoding ------------------------------------------------------------------------------


def test_8bit_png_round_trips(tmp_path: Path) -> None:
    pixels = _noise(30, 50)
    out = decode_gray(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (30, 50)
    assert np.array_equal(out, pixels)


@pytest.mark.parametrize("top", [4095, 65535, 1023])
def test_16bit_png_is_scaled_not_clipped(tmp_path: Path, top: int) -> None:
    ramp = np.linspace(0, top, 40 * 60).reshape(40, 60).astype(np.uint16)
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really stored as 16-bit
    out = decode_gray(path)
    assert out.dtype == np.uint8 and out.shape == (40, 60)
    assert out.min() == 0 and out.max() == 255
    assert (out == 255).mean() < 0.01  # not all white
    assert len(np.unique(out)) > 200  # the range is spread over 8 bits
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order kept
    expected = np.round(ramp.astype(np.float64) * 255 / top)
    assert np.abs(out - expected).max() <= 1


def test_16bit_png_of_one_value_is_black(tmp_path: Path) -> None:
    flat = np.full((10, 10), 3000, dtype=np.uint16)
    out = decode_gray(_save(Image.fromarray(flat), tmp_path / "flat.png"))
    assert out.shape == (10, 10) and not out.any()


def test_jpeg_gray_and_rgb(tmp_path: Path) -> None:
    gray = np.full((32, 48), 120, dtype=np.uint8)
    out = decode_gray(_save(Image.fromarray(gray), tmp_path / "g.jpg", quality=95))
    assert out.shape == (32, 48) and abs(int(out.mean()) - 120) <= 2

    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: luma about 76
    out = decode_gray(_save(Image.fromarray(rgb), tmp_path / "c.jpeg", quality=95))
    assert out.shape == (32, 48) and out.ndim == 2
    assert 70 <= out.mean() <= 84


def test_rgba_transparent_pixels_are_black(tmp_path: Path) -> None:
    rgba = np.full((20, 20, 4), 255, dtype=np.uint8)
    rgba[:, :10, 3] = 0  # left half transparent (but white underneath)
    out = decode_gray(_save(Image.fromarray(rgba), tmp_path / "a.png"))
    assert out.shape == (20, 20)
    assert not out[:, :10].any()
    assert (out[:, 10:] == 255).all()


def test_la_png_transparent_pixels_are_black(tmp_path: Path) -> None:
    img = Image.new("LA", (10, 10), (200, 255))
    img.putpixel((0, 0), (200, 0))
    out = decode_gray(_save(img, tmp_path / "la.png"))
    assert out[0, 0] == 0 and out[5, 5] == 200


def test_palette_png(tmp_path: Path) -> None:
    img = Image.new("P", (8, 4))
    img.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 4, 4))
    img.paste(2, (4, 0, 8, 4))
    out = decode_gray(_save(img, tmp_path / "p.png"))
    assert out.shape == (4, 8)
    assert (out[:, :4] == 255).all()
    assert 70 <= out[:, 4:].mean() <= 84


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (8, 4))
    img.putpalette([255, 255, 255, 128, 128, 128] + [0] * (256 * 3 - 6))
    img.paste(1, (4, 0, 8, 4))
    out = decode_gray(_save(img, tmp_path / "pt.png", transparency=0))
    assert not out[:, :4].any()  # index 0 is transparent white -> black
    assert (out[:, 4:] == 128).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (24, 16), (0, 0, 0, 0))  # no ink: white
    img.paste((0, 0, 0, 255), (0, 0, 12, 16))  # full black ink on the left
    path = _save(img, tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = decode_gray(path)
    assert out.shape == (16, 24) and out.dtype == np.uint8
    assert out[:, :10].mean() < 30 and out[:, 14:].mean() > 225


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 60 wide, 30 high, bright top-left quadrant. Orientation 6: rotate 90 degrees clockwise
    # to display, so the bright block ends up top-right of a 30 wide, 60 high image.
    stored = np.zeros((30, 60), dtype=np.uint8)
    stored[:15, :30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(stored), tmp_path / "rot.jpg", exif=exif, quality=95)
    out = decode_gray(path)
    assert out.shape == (60, 30)
    expected = np.rot90(stored, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 8
    assert out[:30, 15:].mean() > 200 and out[:30, :15].mean() < 50
    # And through load_view, which may decode JPEG at a reduced scale.
    view = load_view(path, 16)
    assert view[:8, 8:12].mean() > 150 and view[:8, 4:8].mean() < 100


def test_tiny_image_is_upscaled(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)), tmp_path / "t.png")
    assert decode_gray(path).shape == (8, 8)
    out = load_view(path, 64)
    assert out.shape == (64, 64) and (out == 200).all()


def test_very_tall_image_is_letterboxed_keeping_aspect(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.full((2000, 64), 200, dtype=np.uint8)), tmp_path / "t.png")
    out = load_view(path, 64)
    assert out.shape == (64, 64)
    filled = np.nonzero(out.max(axis=0))[0]
    assert 1 <= len(filled) <= 3  # 64/2000 of the width
    assert not out[:, :30].any() and not out[:, 34:].any()  # black padding both sides
    assert (out[:, filled] > 150).all()
    stretched = load_view(path, 64, "stretch")
    assert (stretched == 200).all()


def test_jpeg_draft_gives_the_same_result(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:800, 0:600]
    smooth = ((xx + yy) * 255 // 1400).astype(np.uint8)
    path = _save(Image.fromarray(smooth), tmp_path / "big.jpg", quality=95)
    fast = load_view(path, 64)
    full = resize_gray(decode_gray(path), 64)
    assert np.abs(fast.astype(int) - full).max() <= 6


# --- failures ------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _fails(tmp_path / "nope.png", "not found")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    _fails(tmp_path / "dir.png")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _fails(path, "empty")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not\nan image\n")
    _fails(path, "not a decodable image")


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated_file_fails_instead_of_decoding_partially(tmp_path: Path, fmt: str,
                                                            name: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(200, 200)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    _fails(path)
    with pytest.raises(ImageError):
        load_view(path, 64)


# imaging silences this warning at import, but pytest restores the filters it found after
# collection; the verdict (ImageError) is what matters here.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width,height", [
    (12000, 12000),  # 144 Mpx: Pillow only warns (89 to 179 Mpx)
    (10000, 9000),  # 90 Mpx, just over the limit
    (20000, 20000),  # 400 Mpx: Pillow raises DecompressionBombError itself
])
def test_decompression_bomb(tmp_path: Path, width: int, height: int) -> None:
    path = _png_claiming(tmp_path / "bomb.png", width, height)
    error = _fails(path, "too large")
    assert str(width * height) in str(error)


def test_decompression_bomb_when_warnings_are_errors(tmp_path: Path) -> None:
    # An application (or pytest -W error) may turn warnings into exceptions: Pillow's
    # DecompressionBombWarning must still come out as an ImageError.
    path = _png_claiming(tmp_path / "bomb.png", 12000, 12000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fails(path, "too large")


def test_max_pixels_is_ours_to_set(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_noise(100, 100)), tmp_path / "a.png")
    with pytest.raises(ImageError, match="too large"):
        decode_gray(path, max_pixels=9999)
    assert decode_gray(path, max_pixels=10000).shape == (100, 100)


# --- resize_gray ---------------------------------------------------------------------------


def test_letterbox_wide_pads_top_and_bottom() -> None:
    pixels = np.full((50, 200), 100, dtype=np.uint8)
    out = resize_gray(pixels, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    rows = np.nonzero(out.max(axis=1))[0]
    assert rows.min() == 24 and rows.max() == 39  # 16 rows of content, centred
    assert (out[24:40] == 100).all()


def test_letterbox_keeps_square_as_is() -> None:
    pixels = _noise(64, 64)
    assert np.array_equal(resize_gray(pixels, 64), pixels)
    assert np.array_equal(resize_gray(pixels, 64, "stretch"), pixels)


def test_stretch_fills_the_square() -> None:
    pixels = np.full((50, 200), 100, dtype=np.uint8)
    out = resize_gray(pixels, 32, "stretch")
    assert out.shape == (32, 32) and (out == 100).all()


def test_letterbox_downscale_is_antialiased() -> None:
    stripes = np.zeros((256, 256), dtype=np.uint8)
    stripes[:, ::2] = 255
    out = resize_gray(stripes, 32)
    assert abs(float(out.mean()) - 127.5) < 10 and out.std() < 20


def test_unknown_resize_rule_names_the_choices() -> None:
    with pytest.raises(ValueError, match="letterbox, stretch"):
        resize_gray(np.zeros((4, 4), dtype=np.uint8), 8, "crop")


# --- is_view_file --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.png", "b.PNG", "c.Jpg", "d.jpeg", "e.JPEG", "image 1.png",
                                  "bild_é.jpg"])
def test_view_files(name: str) -> None:
    assert is_view_file(name)


@pytest.mark.parametrize("name", [".hidden.png", "._a.jpg", "notes.txt", "scan.dcm", "png",
                                  "a.png.txt", "README", ".png"])
def test_not_view_files(name: str) -> None:
    assert not is_view_file(name)


def test_sixteen_bit_decode_within_a_memory_budget(tmp_path):
    from bonexray.imaging import decode_bytes_needed, decode_gray

    rng = np.random.default_rng(3)
    data = rng.integers(300, 3800, size=(600, 500), dtype=np.uint16)
    path = tmp_path / "big16.png"
    Image.fromarray(data).save(path)  # mode I;16
    pixels = decode_gray(path)
    reference = np.round((data.astype(np.float64) - 300.0 - (data.min() - 300))
                         * (255.0 / (int(data.max()) - int(data.min())))).astype(np.uint8)
    assert np.array_equal(pixels, reference)
    needed = decode_bytes_needed(500, 600, "I;16")
    assert needed == 500 * 600 * 5
    with pytest.raises(ImageError, match="too large to decode.*BONEXRAY_DECODE_BUDGET_BYTES"):
        decode_gray(path, budget_bytes=needed - 1)
    assert decode_gray(path, budget_bytes=needed).shape == (600, 500)
