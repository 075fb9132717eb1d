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
    """A small FracAtlas copy: 40 leg (10 fractured), 20 hand (10), 5 mixed, and defects."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, str]] = []
    plan: list[tuple[tuple[str, ...], int, int]] = [
        (("leg",), 0, 30), (("leg",), 1, 10), (("hand",), 0, 10), (("hand",), 1, 10),
        (("hand", "shoulder"), 1, 5),
    ]
    n = 0
    for parts, fractured, count in plan:
        for _ in range(count):
            rows.append(_row(f"IMG{n:07d}.jpg", parts, fractured))
            n += 1
    for folder in ("Fractured", "Non_fractured"):
        (root / "images" / folder).mkdir(parents=True)
    for row in rows:
        folder = "Fractured" if row["fractured"] == "1" else "Non_fractured"
        pixels = rng.integers(0, 255, size=(40, 30), dtype=np.uint8)
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
    for s in studies:
        assert len(s.views) == 1 and s.views[0].endswith("/image1.jpg")
        stem = Path(s.path).parent.name.removeprefix("patient")
        assert s.path.endswith(f"study1_{'positive' if s.label else 'negative'}")
        truth = (fracatlas / "images" / ("Fractured" if s.label else "Non_fractured")
                 / f"{stem}.jpg")
        assert Path(s.views[0]).read_bytes() == truth.read_bytes()
    # Stratified: 20% of every (body part, label) stratum is held out.
    by = report.by_body_part
    assert by["valid"]["leg"] == [round(0.2 * 27), 2]
    assert by["valid"]["hand"] == [2, 2]
    assert by["valid"]["mixed"] == [0, 1]
    assert sum(by["train"]["leg"]) + sum(by["valid"]["leg"]) == 37


def test_split_depends_on_seed_only(fracatlas: Path, tmp_path: Path) -> None:
    def valid_ids(out: Path, seed: int) -> set[str]:
        import_fracatlas(fracatlas, out, seed=seed, link="symlink")
        return {Path(s.path).parent.name for s in find_studies(out) if s.split == "valid"}

    a = valid_ids(tmp_path / "a", 1)
    assert a == valid_ids(tmp_path / "b", 1)
    assert a != valid_ids(tmp_path / "c", 2)
    assert (tmp_path / "a" / "valid").is_dir()
    assert next((tmp_path / "a").rglob("image1.jpg")).is_symlink()


def test_conflict_rules(fracatlas: Path, tmp_path: Path) -> None:
    import_fracatlas(fracatlas, tmp_path / "csv", conflicts="csv")
    import_fracatlas(fracatlas, tmp_path / "folder", conflicts="folder")
    by_csv = {Path(s.path).parent.name: s.label for s in find_studies(tmp_path / "csv")}
    by_folder = {Path(s.path).parent.name: s.label for s in find_studies(tmp_path / "folder")}
    assert by_csv["patientIMG0000001"] == 0 and by_folder["patientIMG0000001"] == 1


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
    bad = CliRunner().invoke(cli, ["import", "fracatlas", str(tmp_path), str(tmp_path / "p")])
    assert bad.exit_code != 0 and "dataset.csv not found" in bad.output
    assert "Traceback" not in bad.output
