"""DICOM radiographs to the array every view becomes: uint8 [H, W], bone bright.

The DICOM branch of `bonexray.imaging.load_view`, for training and inference alike. The
rules, in order (DICOM PS3.3 C.11, "Softcopy VOI LUT" and "Presentation LUT"):

1. Only CR (1.2.840.10008.5.1.4.1.1.1) and DX For Presentation
   (1.2.840.10008.5.1.4.1.1.1.1) are radiographs to classify. Every other object (DX For
   Processing, structured reports, presentation states, secondary captures, ...) raises
   SkippedObject naming its class, so bonexray never classifies its own results.
2. Modality LUT: RescaleSlope/RescaleIntercept, or a Modality LUT Sequence.
3. VOI: a VOI LUT Sequence before WindowCenter/WindowWidth (the first of several windows,
   with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID); no VOI at all: a robust window
   from the 0.5th to the 99.5th percentile of the pixels that are not PixelPaddingValue.
4. Polarity, after VOI and about its output range: inverted when PresentationLUTShape is
   INVERSE, or when the image is MONOCHROME1 and gives no shape. (pydicom's
   apply_presentation_lut leaves CR MONOCHROME1 without a shape as it is, and "invert if
   MONOCHROME1" inverts DX MONOCHROME1 + INVERSE twice.)
5. A multi-frame object is refused with a clear message (a radiograph is one frame; a
   multi-frame CR/DX is rare and ambiguous: split it into single-frame objects first).

Pixel data in a transfer syntax no installed decoder handles fails its view with a
one-line reason naming the syntax; nothing else is lost. Decoders (the `dicom` extra):
pydicom itself (uncompressed, RLE), python-gdcm (JPEG Baseline/Extended/Lossless, JPEG-LS,
JPEG 2000; BSD), pylibjpeg-openjpeg (JPEG 2000; MIT), pylibjpeg-rle (RLE, fast; MIT),
pyjpegls (JPEG-LS; MIT). pylibjpeg-libjpeg (GPLv3) is not used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bonexray.errors import one_line
from bonexray.imaging import ImageError

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
RADIOGRAPHS = {CR: "CR Image", DX_FOR_PRESENTATION: "DX Image For Presentation"}
# The percentiles of the robust window used when an image carries no VOI.
ROBUST_WINDOW = (0.5, 99.5)


def safe_reason(exc: BaseException) -> str:
    """An exception from a DICOM reader as a short reason without the header bytes it may
    quote (they can hold patient data): its type and its words, byte strings cut out."""
    text = re.sub(r"""b(['"]).*?\1""", "b'...'", one_line(exc, limit=400))
    text = re.sub(r"'[^']{24,}'", "'...'", text)  # long quoted values
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return f"{type(exc).__name__}: {text[:160]}"


_configured = False


def configure_pydicom() -> None:
    """Once per process: pydicom reads invalid values without warning about them (its
    warnings quote the values, which can be patient data)."""
    global _configured
    if not _configured:
        import pydicom.config

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        _configured = True


class SkippedObject(ImageError):
    """A DICOM object that is not a radiograph to classify (its SOP class is named)."""


def sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else "unknown SOP class"


def check_radiograph(ds: Any) -> None:
    """Raise SkippedObject unless `ds` is a CR or DX For Presentation image (ImageError when
    it names no SOP class at all)."""
    uid = str(getattr(ds, "SOPClassUID", "") or "")
    if not uid:
        raise ImageError("not a readable DICOM object: no SOPClassUID (a truncated or damaged "
                         "file?)")
    if uid not in RADIOGRAPHS:
        raise SkippedObject(f"skipped: {sop_class_name(uid)} ({uid}) is not a CR or DX For "
                            "Presentation radiograph")


def decode_dicom(path: str | Path, *, max_pixels: int, budget_bytes: int = 0) -> np.ndarray:
    """Decode a CR/DX object to uint8 [H, W] with bone bright (the rules above).

    Raises SkippedObject for objects that are not radiographs and ImageError, with a
    one-line reason, for anything that cannot be decoded."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise ImageError("reading DICOM needs the dicom extra: pip install "
                         "'bonexray[dicom]'") from None

    configure_pydicom()
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise ImageError("not a readable DICOM file: no DICOM preamble or file meta") \
            from None
    except OSError as exc:
        raise ImageError(f"cannot read the file: {one_line(exc, limit=200)}") from None
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise ImageError(f"not a readable DICOM file ({safe_reason(exc)})") from None
    check_radiograph(ds)
    try:
        return _decode(ds, max_pixels=max_pixels, budget_bytes=budget_bytes)
    except ImageError:
        raise
    except Exception as exc:  # a malformed header: this view fails, never its chunk
        raise ImageError(f"malformed DICOM header ({safe_reason(exc)})") from None


def _decode(ds: Any, *, max_pixels: int, budget_bytes: int) -> np.ndarray:
    if "PixelData" not in ds:
        raise ImageError("DICOM object has no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows < 1 or cols < 1:
        raise ImageError(f"DICOM image has no pixels: {cols}x{rows}")
    if rows * cols > max_pixels:
        raise ImageError(f"image too large: {cols}x{rows} = {rows * cols} pixels "
                         f"> limit {max_pixels}")
    if frames > 1:
        raise ImageError(f"multi-frame DICOM object ({frames} frames): a radiograph view is "
                         "one frame; split it into single-frame objects first")
    needed = rows * cols * 8 * 3  # the stored array, float64 work copies
    if budget_bytes and needed > budget_bytes:
        raise ImageError(f"image too large to decode: {cols}x{rows} needs about "
                         f"{needed >> 20} MiB > budget {budget_bytes >> 20} MiB")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", "unknown") if meta is not None else "unknown"
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # every decoder raises its own types
        name = getattr(syntax, "name", str(syntax))
        raise ImageError(f"cannot decode pixel data in {name} ({syntax}): "
                         f"{safe_reason(exc)}") from None
    if stored.ndim == 3:  # RGB or similar: luminance
        stored = stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if stored.shape != (rows, cols):
        raise ImageError(f"pixel data of shape {stored.shape} for a {cols}x{rows} image")
    return to_display(ds, stored)


# Integer images whose stored values span at most this many levels are mapped through a
# lookup table built once per image (every rule computed on the levels, not the pixels).
_LUT_LEVELS = 1 << 17


def to_display(ds: Any, stored: np.ndarray) -> np.ndarray:
    """Stored pixel values -> uint8 with bone bright: Modality LUT, VOI, polarity.

    Integer images (all CR/DX) go through a lookup table over their stored levels, with the
    robust window's percentiles taken from the levels' histogram: the same figures as
    computing every pixel (`_display_pixels`), several times faster on a 5-megapixel image.
    """
    if stored.dtype.kind in "ui" and stored.size:
        low, high = int(stored.min()), int(stored.max())
        if stored.dtype.kind == "u" and high < _LUT_LEVELS:
            low, offset = 0, stored  # indexed as stored: no shifted copy of the image
        else:
            offset = stored.astype(np.int64) - low
        if high - low < _LUT_LEVELS:
            levels = np.arange(low, high + 1, dtype=np.int64)
            counts = np.bincount(offset.ravel(), minlength=levels.size)
            return _display_levels(ds, levels, counts)[offset]
    return _display_pixels(ds, stored)


def _display_pixels(ds: Any, stored: np.ndarray) -> np.ndarray:
    """to_display computed pixel by pixel (float data, or a range too wide for a table)."""
    from pydicom.pixels import apply_modality_lut

    padding = _padding_mask(ds, stored)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)

    def bounds() -> tuple[float, ...]:
        real = values if padding is None else values[~padding]
        return tuple(np.percentile(real if real.size else values, ROBUST_WINDOW))

    return _finish(ds, _voi(ds, values, bounds), padding)


def _display_levels(ds: Any, levels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The uint8 shown for each stored level (`counts`: how many pixels hold it)."""
    from pydicom.pixels import apply_modality_lut

    padding = _padding_mask(ds, levels)
    values = np.asarray(apply_modality_lut(levels, ds), dtype=np.float64)

    def bounds() -> tuple[float, ...]:
        real = counts if padding is None else np.where(padding, 0, counts)
        return _weighted_percentiles(values, real if real.any() else counts, ROBUST_WINDOW)

    return _finish(ds, _voi(ds, values, bounds), padding)


def _voi(ds: Any, values: np.ndarray, bounds: Callable[[], tuple[float, ...]]) -> np.ndarray:
    """Modality values -> [0, 1]: the VOI LUT Sequence, else the first window, else the
    robust window between `bounds()` (the 0.5th and 99.5th percentiles of real pixels)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        return _voi_lut(ds, values)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _window(ds, values)
    return _robust_window(values, bounds())


def _finish(ds: Any, shown: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    if _inverted(ds):
        shown = 1.0 - shown
    if padding is not None:
        shown[padding] = 0.0  # not part of the image: background, whatever the polarity
    return np.round(np.clip(shown, 0.0, 1.0) * 255.0).astype(np.uint8)


def _weighted_percentiles(values: np.ndarray, counts: np.ndarray,
                          percents: tuple[float, ...]) -> tuple[float, ...]:
    """np.percentile (linear) of the multiset holding counts[i] copies of values[i]."""
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(counts[order])
    n = int(cumulative[-1])
    out = []
    for p in percents:
        h = (n - 1) * p / 100.0
        k = int(np.floor(h))
        below = values[np.searchsorted(cumulative, k, side="right")]
        above = values[np.searchsorted(cumulative, min(k + 1, n - 1), side="right")]
        out.append(float(below + (h - k) * (above - below)))
    return tuple(out)


def _padding_mask(ds: Any, stored: np.ndarray) -> np.ndarray | None:
    """True where the stored value is PixelPaddingValue (up to its range limit, if any)."""
    if "PixelPaddingValue" not in ds:
        return None
    first = float(ds.PixelPaddingValue)
    last = float(ds.get("PixelPaddingRangeLimit", first))
    low, high = min(first, last), max(first, last)
    return (stored >= low) & (stored <= high)


def _first(value: Any) -> float:
    """The first of a multi-valued element (several windows: the first one)."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _window(ds: Any, values: np.ndarray) -> np.ndarray:
    """WindowCenter/WindowWidth (the first pair), as PS3.3 C.11.2.1.2, to [0, 1]."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _voi_lut(ds: Any, values: np.ndarray) -> np.ndarray:
    """The first VOI LUT of the VOI LUT Sequence, to [0, 1] of its output range.

    The lookup is done here, in int64 (pydicom 3.0's apply_voi indexes in the LUT's own
    8/16-bit type, which wraps for an 8-bit LUT of 4096 entries). LUTData may arrive as a
    list (US) or as bytes (OW: 16-bit words even for 8-bit entries)."""
    item = ds.VOILUTSequence[0]
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        lut = np.frombuffer(bytes(raw), dtype="<u2").astype(np.float64)
    else:
        lut = np.asarray(raw if isinstance(raw, list | tuple | np.ndarray) else [raw],
                         dtype=np.float64).ravel()
    lut = lut[:entries]
    if lut.size == 0:
        raise ImageError("VOI LUT Sequence holds an empty LUT")
    index = np.clip(np.round(values).astype(np.int64) - first_mapped, 0, lut.size - 1)
    top = float(2 ** bits - 1) if 0 < bits <= 16 else float(lut.max() or 1.0)
    if bits == 16 and 0 < lut.max() < 4096:
        # Some vendors declare 16 bits for a LUT that holds 12-bit data: use its real range
        # rather than showing an all-but-black image.
        top = 4095.0
    return lut[index] / top


def _robust_window(values: np.ndarray, bounds: Any) -> np.ndarray:
    """No VOI in the header: the 0.5th-99.5th percentile range of the real (not padding)
    pixels, `bounds`, to [0, 1]."""
    low, high = (float(b) for b in bounds)
    if high <= low:
        high = low + 1.0
    return (values - low) / (high - low)


def _inverted(ds: Any) -> bool:
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    if shape:
        return shape == "INVERSE"
    return str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
