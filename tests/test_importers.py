"""FracAtlas importer: MURA layout, stratified split, and the dataset's defects reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bonexray.cli import cli
from bonexray.importers import DatasetError, fracatlas_body_part, import_fracatlas
from bonexray.studies import find_studies

COLUMNS = ("image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan",
           "fractured", "fracture_count", "frontal", "lateral", "oblique")


def _row(image_id: str, parts: tuple[str, ...], fractured: int) -> dict[str, str]:
    row = {c: "0" for c in COLUMNS}
    row["image_id"] = image_id
    for p in parts:
        row[p] = "1"
    row["mixed"] = "1" if len(parts) > 1 else "0"
    row["fractured"] = str(fractured)
    return row


def make_fracatlas(root: Path) -> Path:
    """A small FracAtlas copy of 65 images in exams of 1 to 3 consecutive ids (one body
    part and label each, parts alternating): 40 leg (10 fractured), 20 hand (10), 5 mixed;
    the 61st image shows the very pixels of the 21st (a duplicate under another id, named
    in duplicate_pair.txt); the dataset's defects (a truncated JPEG, a label conflict, a
    missing and an unlisted file).
    """
    rng = np.random.default_rng(0)
    rows: list[dict[str, str]] = []
    exams: list[tuple[tuple[str, ...], int, int]] = []
    budget = {(("leg",), 0): 30, (("leg",), 1): 10, (("hand",), 0): 10, (("hand",), 1): 10,
              (("hand", "shoulder"), 1): 5}
    while any(budget.values()):
        for key in budget:
            take = min(budget[key], 3 - len(exams) % 3)
            if take:
                exams.append((key[0], key[1], take))
                budget[key] -= take
    n = 0
    for number, (parts, fractured, size) in enumerate(exams):
        if number and exams[number - 1][0] == parts:
            n += 4  # ids left out between two exams of one body part (as in FracAtlas)
        for _ in range(size):
            row = _row(f"IMG{n:07d}.jpg", parts, fractured)
            row["hardware"] = "1" if fractured and n % 4 == 0 else "0"
            row["frontal"], row["lateral"] = ("1", "0") if n % 2 else ("0", "1")
            rows.append(row)
            n += 1
    for folder in ("Fractured", "Non_fractured"):
        (root / "images" / folder).mkdir(parents=True)
    original, copy = rows[20]["image_id"], rows[60]["image_id"]
    (root / "duplicate_pair.txt").write_text(f"{original} {copy}\n")
    pixels_of: dict[str, np.ndarray] = {}
    for row in rows:
        folder = "Fractured" if row["fractured"] == "1" else "Non_fractured"
        pixels = rng.integers(0, 255, size=(40, 30), dtype=np.uint8)
        if row["image_id"] == copy:
            pixels = pixels_of[original]
        pixels_of[row["image_id"]] = pixels
        Image.fromarray(pixels).convert("RGB").save(root / "images" / folder / row["image_id"],
                                                     quality=90)
    # Defects, as in the real dataset: a truncated JPEG, a label that disagrees with the
    # folder, a listed file that is missing, and a file that is not listed.
    truncated = root / "images" / "Non_fractured" / "IMG0000000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "images" / "Non_fractured" / "IMG0000001.jpg").rename(
        root / "images" / "Fractured" / "IMG0000001.jpg")
    (root / "images" / "Non_fractured" / "IMG0000002.jpg").unlink()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(
        root / "images" / "Fractured" / "IMG9999999.jpg")
    with (root / "dataset.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def _manifest(out: Path) -> list[dict[str, str]]:
    with (out / "import_manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def fracatlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fracatlas(tmp_path_factory.mktemp("fracatlas"))


def test_body_part_from_flags() -> None:
    assert fracatlas_body_part(_row("a", ("leg",), 0)) == "leg"
    assert fracatlas_body_part(_row("a", ("hand", "hip"), 0)) == "mixed"
    assert fracatlas_body_part(_row("a", (), 0)) == "unknown"


def test_import_writes_mura_layout_and_reports_defects(fracatlas: Path, tmp_path: Path) -> None:
    out = tmp_path / "mura"
    report = import_fracatlas(fracatlas, out, seed=3)
    assert [f for f, _ in report.unreadable] == ["IMG0000000.jpg"]
    assert "truncated" in report.unreadable[0][1].lower()
    assert report.label_conflicts == [("IMG0000001.jpg", 0, 1)]
    assert report.missing_files == ["IMG0000002.jpg"]
    assert report.not_in_csv == ["IMG9999999.jpg"]
    written = json.loads((out / "import_report.json").read_text())
    assert written["unreadable"][0]["file"] == "IMG0000000.jpg"
    assert written["label_conflicts"] == [{"file": "IMG0000001.jpg", "csv": 0, "folder": 1}]

    studies = find_studies(out)
    assert len(studies) == 65 - 3 == sum(report.studies.values())
    assert {s.body_part for s in studies} == {"leg", "hand", "mixed"}
    manifest = {row["path"]: row for row in _manifest(out)}
    for s in studies:
        assert len(s.views) == 1 and s.views[0].endswith("/image1.jpg")
        assert Path(s.key).name.endswith("positive" if s.label else "negative")
        row = manifest[Path(s.views[0]).relative_to(out).as_posix()]
        assert row["group"] == s.patient and row["split"] == s.split
        truth = (fracatlas / "images" / ("Fractured" if s.label else "Non_fractured")
                 / row["image_id"])
        assert Path(s.views[0]).read_bytes() == truth.read_bytes()
    # Train, valid and test, each near its share of the images (whole groups move).
    assert set(report.studies) == {"train", "valid", "test"}
    assert 0.1 * 62 <= report.studies["valid"] <= 0.3 * 62
    assert 0.1 * 62 <= report.studies["test"] <= 0.3 * 62
    assert sum(report.groups.values()) == report.grouping["groups"]
    assert all(report.abnormal[name] > 0 for name in report.studies)


def test_likely_same_exam_images_stay_on_one_side(fracatlas: Path, tmp_path: Path) -> None:
    out = tmp_path / "mura"
    report = import_fracatlas(fracatlas, out, seed=3, link="symlink")
    rows = {row["image_id"]: row for row in _manifest(out)}
    csv_rows = {r["image_id"]: r for r in csv.DictReader((fracatlas / "dataset.csv").open())}
    ids = sorted(rows)
    # Consecutive ids with the same body-part flags are one group (and so one side).
    for a, b in zip(ids, ids[1:], strict=False):
        same_parts = all(csv_rows[a][p] == csv_rows[b][p] for p in ("hand", "leg", "mixed"))
        if same_parts and int(b[3:10]) - int(a[3:10]) <= 3:
            assert rows[a]["group"] == rows[b]["group"], (a, b)
    # A duplicate under a distant id joins its original's group; unrelated images do not.
    original, copy = (fracatlas / "duplicate_pair.txt").read_text().split()
    assert int(copy[3:10]) - int(original[3:10]) > 30
    assert rows[copy]["group"] == rows[original]["group"]
    assert report.grouping["near_duplicate_pairs"] == 1
    example = report.grouping["near_duplicate_examples"][0]
    assert (example["a"], example["b"]) == (original, copy) and example["correlation"] > 0.95
    # No group straddles two splits; groups are many, not one per body part.
    sides: dict[str, set[str]] = {}
    for row in rows.values():
        sides.setdefault(row["group"], set()).add(row["split"])
    assert all(len(v) == 1 for v in sides.values())
    assert 20 <= report.grouping["groups"] == len(sides) < 62
    # Without grouping every image is its own group.
    flat = import_fracatlas(fracatlas, tmp_path / "flat", seed=3, link="symlink", max_gap=0,
                            near_duplicate=None)
    assert flat.grouping["groups"] == 62 and flat.grouping["near_duplicate_pairs"] == 0


def test_manifest_keeps_the_flags_and_the_report_counts_them(fracatlas: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "mura"
    report = import_fracatlas(fracatlas, out, seed=1, link="symlink")
    rows = _manifest(out)
    csv_rows = {r["image_id"]: r for r in csv.DictReader((fracatlas / "dataset.csv").open())}
    for row in rows:
        for flag in ("hardware", "multiscan", "frontal", "lateral", "oblique"):
            assert row[flag] == csv_rows[row["image_id"]][flag]
    hardware = sum(int(r["hardware"]) for r in rows)
    assert hardware > 0 and sum(f["hardware"] for f in report.flags.values()) == hardware
    assert json.loads((out / "import_report.json").read_text())["flags"] == report.flags


def test_split_depends_on_seed_only(fracatlas: Path, tmp_path: Path) -> None:
    def valid_ids(out: Path, seed: int) -> set[str]:
        import_fracatlas(fracatlas, out, seed=seed, link="symlink")
        return {row["image_id"] for row in _manifest(out) if row["split"] == "valid"}

    a = valid_ids(tmp_path / "a", 1)
    assert a == valid_ids(tmp_path / "b", 1)
    assert a != valid_ids(tmp_path / "c", 2)
    assert (tmp_path / "a" / "valid").is_dir()
    assert next((tmp_path / "a").rglob("image1.jpg")).is_symlink()


def test_conflict_rules(fracatlas: Path, tmp_path: Path) -> None:
    import_fracatlas(fracatlas, tmp_path / "csv", conflicts="csv")
    import_fracatlas(fracatlas, tmp_path / "folder", conflicts="folder")
    by_csv = {r["image_id"]: r["label"] for r in _manifest(tmp_path / "csv")}
    by_folder = {r["image_id"]: r["label"] for r in _manifest(tmp_path / "folder")}
    assert by_csv["IMG0000001.jpg"] == "0" and by_folder["IMG0000001.jpg"] == "1"


def test_refuses_what_is_not_fracatlas(tmp_path: Path, fracatlas: Path) -> None:
    with pytest.raises(DatasetError, match="dataset.csv not found"):
        import_fracatlas(tmp_path, tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(DatasetError, match="not an empty folder"):
        import_fracatlas(fracatlas, tmp_path / "out")
    with pytest.raises(DatasetError, match="copy, hardlink, symlink"):
        import_fracatlas(fracatlas, tmp_path / "new", link="move")


def test_cli_import(fracatlas: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["import", "fracatlas", str(fracatlas),
                                      str(tmp_path / "o"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "left out 1 unreadable" in result.output
    assert "1 with a CSV label that disagrees" in result.output
    assert "likely-same-exam groups" in result.output and "test:" in result.output
    bad_value = CliRunner().invoke(cli, ["import", "fracatlas", str(fracatlas),
                                         str(tmp_path / "q"), "--near-duplicate", "high"])
    assert bad_value.exit_code == 2 and "neither a correlation nor 'off'" in bad_value.output
    bad = CliRunner().invoke(cli, ["import", "fracatlas", str(tmp_path), str(tmp_path / "p")])
    assert bad.exit_code != 0 and "dataset.csv not found" in bad.output
    assert "Traceback" not in bad.output
