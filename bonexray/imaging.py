"""The one decode + resize: any view file -> uint8 grayscale, used by trainer, export and worker."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bonexray.errors import BonexrayError, InvalidValueError, one_line
from bonexray.settings import MAX_IMAGE_PIXELS

# File name endings that make a file a view (compared case-insensitively).
VIEW_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})

# The resize rules a model can be exported with; the name travels in the model's metadata.
RESIZE_RULES = ("letterbox", "stretch")
DEFAULT_RESIZE = "letterbox"

# Pillow warns (and does not fail) between MAX_IMAGE_PIXELS and twice that; we check the
# size ourselves before decoding, so its warning is only noise. Set once, at import, since
# warning filters are process-wide and not safe to toggle per thread.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS
# Memory one decode may use, bytes (BONEXRAY_DECODE_BUDGET_BYTES).
DEFAULT_DECODE_BUDGET = 1 << 30

# Bytes per pixel of Pillow's modes as decoded; anything else counts as 4.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2,
               "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "CMYK": 4,
               "I": 4, "F": 4}


class ImageError(BonexrayError, ValueError):
    """A view file that cannot be turned into pixels; the message is one line."""


def is_dicom_path(path: str | Path) -> bool:
    """A DICOM file by its name (.dcm, .dicom) or, for a name without an image suffix, by
    the DICOM preamble ("DICM" at byte 128): DICOM archives often name files by UID."""
    suffix = Path(path).suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix in VIEW_EXTENSIONS:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_view_file(name: str) -> bool:
    """True for a non-hidden file name with a view extension."""
    return not name.startswith(".") and Path(name).suffix.lower() in VIEW_EXTENSIONS


def _to_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: Pillow's convert('L') clips at 255, so scale through numpy
        # from the image's own range (archives store 10-, 12- and 16-bit data alike).
        return _scale_to_uint8(np.asarray(img), mode)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become black (the usual radiograph background), not whatever
        # colour happens to sit under the alpha channel.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale an integer or float image from its own range to uint8 without a float64 copy:
    integer data through a lookup table (one uint8 output beside the input), float data
    in float32 slices."""
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageError(f"image of mode {mode} holds non-finite values")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    if arr.dtype.kind in "ui" and int(hi) - int(lo) < (1 << 20):
        span = int(hi) - int(lo)
        table = np.round(np.arange(span + 1, dtype=np.float64) * (255.0 / span))
        lut = table.astype(np.uint8)
        if int(lo) >= 0 and int(hi) <= 0xFFFF:  # indexed by the raw value: no copy
            full = np.zeros(int(hi) + 1, dtype=np.uint8)
            full[int(lo) :] = lut
            return full[arr]
        return lut[(arr.astype(np.int64, copy=False) - int(lo))]
    out = np.empty(arr.shape, dtype=np.uint8)
    scale = np.float32(255.0 / (float(hi) - float(lo)))
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    step = 1 << 22
    for start in range(0, flat_in.size, step):
        part = flat_in[start : start + step].astype(np.float32)
        part -= np.float32(lo)
        part *= scale
        np.rint(part, out=part)
        flat_out[start : start + step] = part
    return out


def decode_bytes_needed(width: int, height: int, mode: str) -> int:
    """Peak memory of decoding an image of this size and mode to uint8 (an estimate: the
    decoded image, one working copy of the same size, the uint8 result)."""
    pixels = width * height
    per_pixel = _MODE_BYTES.get(mode, 4)
    return pixels * (2 * per_pixel + 1)


def decode_gray(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                draft_size: int | None = None,
                budget_bytes: int = DEFAULT_DECODE_BUDGET) -> np.ndarray:
    """Decode a view file to a uint8 [H, W] array, EXIF orientation applied.

    Raises ImageError with a one-line reason for anything that is not a whole, decodable
    image of a sane size. `draft_size` lets JPEG decode at a reduced scale that is still at
    least that many pixels on each side (much faster, same result after resizing).
    """
    if is_dicom_path(path):
        from bonexray.dicom import decode_dicom

        return decode_dicom(path, max_pixels=max_pixels, budget_bytes=budget_bytes)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image too large: {width}x{height} = {width * height} pixels "
                    f"> limit {max_pixels}"
                )
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels: {width}x{height}")
            needed = decode_bytes_needed(width, height, img.mode)
            if budget_bytes and needed > budget_bytes:
                raise ImageError(
                    f"image too large to decode: {width}x{height} {img.mode} needs about "
                    f"{needed >> 20} MiB > budget {budget_bytes >> 20} MiB "
                    "(BONEXRAY_DECODE_BUDGET_BYTES)"
                )
            if draft_size and img.format == "JPEG" and img.mode in ("L", "RGB"):
                img.draft("L", (draft_size, draft_size))
            img.load()
            return _to_uint8(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("not a file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except UnidentifiedImageError:
        size = _file_size(path)
        if size == 0:
            raise ImageError("empty file (0 bytes)") from None
        raise ImageError("not a decodable image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception where the application turns warnings into
        # errors (python -W error, pytest filterwarnings): it is the same verdict.
        raise ImageError(f"image too large: {one_line(exc, limit=300)}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as exc:
        # Pillow reports truncated and corrupt data as OSError (and a few older decoders as
        # SyntaxError/ValueError). Never LOAD_TRUNCATED_IMAGES: a cut-off file fails its view.
        raise ImageError(f"corrupt image: {one_line(exc, limit=300)}") from None


def _file_size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1


def resize_gray(pixels: np.ndarray, size: int, rule: str = DEFAULT_RESIZE) -> np.ndarray:
    """Resize a uint8 [H, W] array to [size, size].

    letterbox: keep the aspect ratio, scale the longer side to `size`, pad with black,
    centred (nothing of the anatomy is cropped away). stretch: scale each axis to `size`.
    Pillow's antialiased bilinear filter in mode L (cheaper than RGB; channels are
    repeated inside the model graph).
    """
    if rule not in RESIZE_RULES:
        raise InvalidValueError(f"unknown resize rule {rule!r}"
                                f"; choose one of {', '.join(RESIZE_RULES)}")
    img = Image.fromarray(pixels, mode="L")
    h, w = pixels.shape
    if rule == "stretch":
        if (w, h) != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    top, left, new_h, new_w = content_box(h, w, size, rule)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if (new_w, new_h) == (size, size):
        return np.asarray(img, dtype=np.uint8)
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = np.asarray(img, dtype=np.uint8)
    return out


def content_box(height: int, width: int, size: int,
                rule: str = DEFAULT_RESIZE) -> tuple[int, int, int, int]:
    """Where a height x width view lies in the size x size model input: (top, left,
    rows, columns). letterbox pads around it; stretch fills the input."""
    if rule == "stretch":
        return 0, 0, size, size
    scale = size / max(width, height)
    new_w = max(1, min(size, round(width * scale)))
    new_h = max(1, min(size, round(height * scale)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def load_view(path: str | Path, size: int, rule: str = DEFAULT_RESIZE, *,
              max_pixels: int = DEFAULT_MAX_PIXELS,
              budget_bytes: int = DEFAULT_DECODE_BUDGET) -> np.ndarray:
    """Decode and resize one view: uint8 [size, size]. Raises ImageError."""
    pixels = decode_gray(path, max_pixels=max_pixels, draft_size=size,
                         budget_bytes=budget_bytes)
    return resize_gray(pixels, size, rule)
