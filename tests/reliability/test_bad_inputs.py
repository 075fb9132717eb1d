"""A messy archive through a real worker into Postgres: every file that looks like a view ends
as exactly one scored view or one error row, and the study, the job and the worker go on."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bonexray.imaging import is_view_file
from tests.reliability.conftest import enqueue, study_rows, wait_finished


def _gray(h: int, w: int) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) % 251).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", len(idat)) + b"IDAT"
            + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def _encoded(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def build_corpus(root: Path) -> tuple[Path, dict[str, str]]:
    """The archive, and for each view file whether it must be scored or fail (and why)."""
    study = root / "XR_ELBOW" / "patient Zoë Müller-SSmith" / "study1_positive"
    study.mkdir(parents=True)
    rgb = Image.fromarray(np.stack([_gray(80, 120)] * 3, axis=-1), "RGB")
    sixteen = Image.fromarray(_gray(64, 96).astype(np.uint16) * 200)
    exif = rgb.getexif()
    exif[0x0112] = 6  # orientation: rotate 90
    good_png = _encoded(Image.fromarray(_gray(64, 64)), "PNG")
    good_jpg = _encoded(rgb, "JPEG", quality=90)
    files = {
        "gray8.png": good_png,
        "gray16.png": _encoded(sixteen, "PNG"),
        "rgba.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "palette.png": _encoded(rgb.convert("P"), "PNG"),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "exif rotated.jpeg": _encoded(rgb, "JPEG", exif=exif),
        "tiny 8x8.png": _encoded(Image.fromarray(_gray(8, 8)), "PNG"),
        "narrow 64x2000.png": _encoded(Image.fromarray(_gray(2000, 64)), "PNG"),
        "UPPER CASE ÄÖ.JPG": good_jpg,
        "zero.png": b"",
        "text.png": b"this is not an image, just text named like one\n",
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "bomb 100mp.png": _png_header_only(10_000, 10_000),  # Pillow only warns here
        "bomb 400mp.png": _png_header_only(20_000, 20_000),  # Pillow raises (not OSError)
        "deleted before processing.png": good_png,
        ".hidden.png": good_png,  # hidden: not a view
        "notes.txt": b"not a view",
        "scan.dcm": b"DICM",  # named DICOM, unreadable: a failed study of its own
        "Thumbs.db": b"\x00" * 10,
    }
    for name, data in files.items():
        (study / name).write_bytes(data)
    expect = {
        "gray8.png": "scored", "gray16.png": "scored", "rgba.png": "scored",
        "palette.png": "scored", "cmyk.jpg": "scored", "exif rotated.jpeg": "scored",
        "tiny 8x8.png": "scored", "narrow 64x2000.png": "scored", "UPPER CASE ÄÖ.JPG": "scored",
        "zero.png": "empty file", "text.png": "not a decodable image",
        "truncated.png": "corrupt image", "truncated.jpg": "corrupt image",
        "bomb 100mp.png": "image too large", "bomb 400mp.png": "image too large",
        "deleted before processing.png": "file not found",
    }
    # A study whose every view is bad fails as a study; an empty folder is reported empty.
    broken = root / "XR_HAND" / "patient 2" / "study1_negative"
    broken.mkdir(parents=True)
    (broken / "only.png").write_bytes(b"")
    (root / "XR_HAND" / "patient 3" / "study1_negative").mkdir(parents=True)
    return study, expect


def test_every_view_is_scored_or_has_an_error_row(tmp_path, cheap_model, env, pg_url, workers):
    root = tmp_path / "archive"
    study, expect = build_corpus(root)
    on_disk = sorted(p.name for p in study.iterdir() if is_view_file(p.name))
    assert on_disk == sorted(expect)  # the corpus's own check: these, and only these, are views

    summary = enqueue(root, cheap_model, env)
    # Three folders, and scan.dcm: a file named DICOM whose header cannot be read is a
    # study of its own, failing with its reason (reported, not dropped).
    assert summary["studies"] == 4 and summary["views"] == len(expect) + 2
    (study / "deleted before processing.png").unlink()  # gone between enqueue and the worker
    worker = workers(env, tmp_path / "worker.log")
    p = wait_finished(pg_url, summary["job"])
    assert (p["done"], p["failed"], p["empty"]) == (1, 2, 1), p

    rows = study_rows(pg_url, summary["job"])
    views = rows[str(study)]["views"]
    assert sorted(Path(v).name for v in views) == sorted(expect)  # one row per view file
    for name, outcome in expect.items():
        prob, error = views[str(study / name)]
        if outcome == "scored":
            assert error is None and prob is not None and 0.0 <= prob <= 1.0, (name, error)
        else:
            assert prob is None and error is not None and outcome in error, (name, error)
            assert "\n" not in error and len(error) < 400
    scored = sum(outcome == "scored" for outcome in expect.values())
    assert p["views_scored"] == scored and p["views_failed"] == len(expect) - scored + 2
    dicom = rows[str(study / "scan.dcm")]
    assert dicom["status"] == "failed" and "DICOM" in dicom["views"][str(study / "scan.dcm")][1]
    assert rows[str(study)]["status"] == "done"
    broken = rows[str(root / "XR_HAND" / "patient 2" / "study1_negative")]
    assert broken["status"] == "failed" and "all 1 failed" in broken["error"]
    assert rows[str(root / "XR_HAND" / "patient 3" / "study1_negative")]["status"] == "empty"

    # The worker is still there and takes the next job.
    again = enqueue(root / "XR_HAND", cheap_model, env, "--force")
    assert wait_finished(pg_url, again["job"])["finished"]
    assert worker.proc.poll() is None
    assert "Müller" not in worker.log()  # INFO logs name jobs and counts, not patient folders
