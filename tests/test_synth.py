"""Tests for the synthetic MURA-style studies."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.imaging import load_view
from bonexray.studies import find_studies
from bonexray.synth import BODY_PARTS, SIGNS, render_view, write_synthetic_mura


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth") / "MURA-syn"
    summary = write_synthetic_mura(out, studies=28, seed=3, image_size=64)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_arguments_write_identical_bytes(tmp_path: Path) -> None:
    a = write_synthetic_mura(tmp_path / "a" / "MURA", studies=9, seed=5, image_size=48)
    b = write_synthetic_mura(tmp_path / "b" / "MURA", studies=9, seed=5, image_size=48)
    files_a, files_b = _files(Path(a.root)), _files(Path(b.root))
    assert files_a == files_b
    assert len(files_a) == a.views + 4
    c = write_synthetic_mura(tmp_path / "c" / "MURA", studies=9, seed=6, image_size=48)
    assert _files(Path(c.root)) != files_a


def test_layout_is_found_with_labels_parts_patients_and_splits(tree) -> None:
    out, summary = tree
    assert summary.root == str(out.resolve())
    studies = find_studies(out)
    assert len(studies) == summary.studies == 28
    assert sum(len(s.views) for s in studies) == summary.views
    assert sum(s.label for s in studies) == summary.abnormal
    assert {s.split: 0 for s in studies}.keys() == {"train", "valid"}
    for split in ("train", "valid"):
        found = [s for s in studies if s.split == split]
        assert len(found) == summary.by_split[split]
        # Every body part in both splits, as soon as there are 14 studies.
        assert {s.body_part for s in found} == {p.lower() for p in BODY_PARTS}
        assert {s.label for s in found} == {0, 1}
    patients: dict[str, set[str | None]] = {}
    for s in studies:
        path = Path(s.key)
        assert path.parts[-4] == s.split
        assert path.parts[-3] == f"XR_{s.body_part.upper()}"
        assert path.parts[-2] == f"patient{s.patient}"
        assert len(s.patient) == 5 and s.patient.isdigit()
        assert path.name.endswith("_positive" if s.label else "_negative")
        assert 1 <= len(s.views) <= 4
        assert [Path(v).name for v in s.views] == [
            f"image{k}.png" for k in range(1, len(s.views) + 1)]
        patients.setdefault(s.patient, set()).add(s.split)
    # A patient belongs to one split.
    assert all(len(splits) == 1 for splits in patients.values())


def test_csvs_follow_mura(tree) -> None:
    out, summary = tree
    studies = {s.key: s for s in find_studies(out)}
    rows = 0
    for split in ("train", "valid"):
        with (out / f"{split}_labeled_studies.csv").open(newline="") as fh:
            labeled = list(csv.reader(fh))
        assert len(labeled) == summary.by_split[split]
        for path, label in labeled:
            assert path.startswith(f"{out.name}/{split}/XR_") and path.endswith("/")
            study = studies[str(out.parent / path.rstrip("/"))]
            assert study.label == int(label)
        with (out / f"{split}_image_paths.csv").open(newline="") as fh:
            images = [row for row in csv.reader(fh)]
        assert all(len(row) == 1 and row[0].endswith(".png") for row in images)
        assert all((out.parent / row[0]).is_file() for row in images)
        rows += len(images)
    assert rows == summary.views


def test_views_decode(tree) -> None:
    out, _ = tree
    views = [v for s in find_studies(out) for v in s.views]
    shapes = set()
    for view in views[:40]:
        pixels = load_view(view, 64)
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint8
        assert pixels.max() > 100
    for view in views:
        with Image.open(view) as img:
            assert img.mode == "L" and img.format == "PNG"
            shapes.add(img.size)
            assert 48 <= img.width <= 80 and 48 <= img.height <= 80
    assert any(w != h for w, h in shapes)


def test_refuses_non_empty_folder_and_bad_counts(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=str(tmp_path)):
        write_synthetic_mura(tmp_path, studies=2)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="at least 1"):
        write_synthetic_mura(tmp_path / "new", studies=0)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = write_synthetic_mura(empty, studies=1, image_size=32)
    assert summary.studies == 1 and sum(summary.by_split.values()) == 1


def test_render_view_rejects_unknown_names() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="WRIST"):
        render_view(rng, body_part="knee", abnormal=False, sign=None, size=64)
    with pytest.raises(ValueError, match="hardware"):
        render_view(rng, body_part="wrist", abnormal=True, sign="tumour", size=64)
    with pytest.raises(ValueError):
        render_view(rng, body_part="wrist", abnormal=False, sign="fracture", size=64)


@pytest.mark.parametrize("sign", SIGNS)
def test_sign_is_local_and_not_a_brightness_shift(sign: str) -> None:
    # The same RNG state renders the same anatomy with or without the sign, so the
    # difference between the two images is the sign itself.
    normal_means, shifts, local = [], [], []
    for k, part in enumerate(BODY_PARTS * 2):
        normal = render_view(np.random.default_rng(k), body_part=part, abnormal=False,
                             sign=None, size=128)
        abnormal = render_view(np.random.default_rng(k), body_part=part, abnormal=True,
                               sign=sign, size=128)
        assert normal.shape == abnormal.shape
        diff = abnormal.astype(np.int16) - normal.astype(np.int16)
        changed = np.abs(diff) > 30
        assert changed.sum() >= 25, part  # big enough to survive a resize to 64 px
        assert changed.mean() < 0.15, part  # a sign, not a different picture
        ys, xs = np.nonzero(changed)
        box = np.abs(diff[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
        local.append(box.mean())
        normal_means.append(normal.mean())
        shifts.append(abnormal.mean() - normal.mean())
    # Inside the sign's region the images differ a lot ...
    assert min(local) > 8
    # ... while the global mean moves much less than it varies among normal views.
    assert np.abs(shifts).mean() < 0.5 * np.std(normal_means)


def test_render_view_varies_size_and_is_deterministic() -> None:
    shapes = set()
    for k in range(20):
        a = render_view(np.random.default_rng(k), body_part=BODY_PARTS[k % 7],
                        abnormal=k % 2 == 1, sign=None, size=100)
        b = render_view(np.random.default_rng(k), body_part=BODY_PARTS[k % 7],
                        abnormal=k % 2 == 1, sign=None, size=100)
        assert a.dtype == np.uint8 and a.ndim == 2
        assert np.array_equal(a, b)
        assert 75 <= a.shape[0] <= 125 and 75 <= a.shape[1] <= 125
        shapes.add(a.shape)
    assert len(shapes) > 10
