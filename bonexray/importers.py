"""Import public radiograph datasets into the MURA layout (FracAtlas), reporting their defects."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonexray.imaging import ImageError, decode_gray

log = logging.getLogger(__name__)

FRACATLAS_PARTS = ("hand", "leg", "hip", "shoulder")
FRACATLAS_FOLDERS = {"Fractured": 1, "Non_fractured": 0}
LINK_MODES = ("copy", "hardlink", "symlink")
CONFLICT_RULES = ("skip", "csv", "folder")
REPORT_NAME = "import_report.json"
MANIFEST_NAME = "import_manifest.csv"


class DatasetError(ValueError):
    """A source folder that is not the dataset it claims to be, or an unusable output folder."""


@dataclass
class ImportReport:
    """What an import wrote and which of the source's defects it met."""

    source: str
    out: str
    seed: int
    valid_fraction: float
    studies: dict[str, int] = field(default_factory=dict)  # per split
    abnormal: dict[str, int] = field(default_factory=dict)  # per split
    # split -> body part -> [normal, abnormal]
    by_body_part: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): left out
    label_conflicts: list[tuple[str, int, int]] = field(default_factory=list)  # (file, csv, folder)
    missing_files: list[str] = field(default_factory=list)  # in the CSV, not on disk
    not_in_csv: list[str] = field(default_factory=list)  # on disk, not in the CSV
    no_body_part: list[str] = field(default_factory=list)  # no flag set: body part "unknown"
    conflict_rule: str = "skip"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "out": self.out, "seed": self.seed,
            "valid_fraction": self.valid_fraction, "studies": self.studies,
            "abnormal": self.abnormal, "by_body_part": self.by_body_part,
            "conflict_rule": self.conflict_rule,
            "unreadable": [{"file": f, "reason": r} for f, r in self.unreadable],
            "label_conflicts": [{"file": f, "csv": c, "folder": d}
                                for f, c, d in self.label_conflicts],
            "missing_files": self.missing_files, "not_in_csv": self.not_in_csv,
            "no_body_part": self.no_body_part,
        }


@dataclass(frozen=True)
class _Image:
    image_id: str
    path: Path  # where it is on disk
    body_part: str
    label: int


def fracatlas_body_part(row: dict[str, str]) -> str:
    """hand, leg, hip or shoulder from FracAtlas's flags; 'mixed' when several are set."""
    flags = [p for p in FRACATLAS_PARTS if row.get(p, "0").strip() == "1"]
    if len(flags) > 1 or row.get("mixed", "0").strip() == "1" and flags:
        return "mixed"
    return flags[0] if flags else "unknown"


def _read_csv(src: Path) -> dict[str, dict[str, str]]:
    path = src / "dataset.csv"
    if not path.is_file():
        raise DatasetError(f"{src} is not a FracAtlas folder: {path} not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        needed = {"image_id", "fractured", *FRACATLAS_PARTS}
        missing = needed - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path} lacks the columns {', '.join(sorted(missing))}")
        return {row["image_id"].strip(): row for row in reader}


def _on_disk(src: Path) -> dict[str, tuple[Path, int]]:
    found: dict[str, tuple[Path, int]] = {}
    for folder, label in FRACATLAS_FOLDERS.items():
        base = src / "images" / folder
        if not base.is_dir():
            raise DatasetError(f"{src} is not a FracAtlas folder: {base} not found")
        for entry in sorted(base.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                found[entry.name] = (entry, label)
    return found


def _rank(seed: int, image_id: str) -> str:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def stratified_split(images: list[_Image], *, seed: int,
                     valid_fraction: float) -> dict[str, str]:
    """image_id -> 'train' / 'valid', valid_fraction of every (body part, label) stratum."""
    strata: dict[tuple[str, int], list[str]] = {}
    for im in images:
        strata.setdefault((im.body_part, im.label), []).append(im.image_id)
    split: dict[str, str] = {}
    for ids in strata.values():
        ids.sort(key=lambda i: _rank(seed, i))  # a seeded shuffle, stable across platforms
        k = round(valid_fraction * len(ids))
        for n, image_id in enumerate(ids):
            split[image_id] = "valid" if n < k else "train"
    return split


def _check(path: Path) -> str | None:
    try:
        decode_gray(path)
    except ImageError as exc:
        return str(exc)
    return None


def _place(src: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        dst.symlink_to(src.resolve())
    elif link == "hardlink":
        try:
            os.link(src, dst)
        except OSError:  # another filesystem: a copy is what can be had
            shutil.copy2(src, dst)
    else:
        shutil.copy2(src, dst)


def import_fracatlas(src: str | Path, out: str | Path, *, seed: int = 0,
                     valid_fraction: float = 0.2, link: str = "copy",
                     conflicts: str = "skip", check: bool = True, threads: int = 2,
                     progress: Callable[[int], None] | None = None) -> ImportReport:
    """Write FracAtlas (dataset.csv + images/Fractured, images/Non_fractured) as MURA layout.

    Each image becomes its own study, OUT/{train,valid}/XR_<PART>/patient<ID>/
    study1_<positive|negative>/image1.<ext>, split per (body part, label) stratum. Images
    that do not decode whole (truncated JPEGs) are left out; an image whose CSV label
    disagrees with its folder is left out (`conflicts="skip"`) or labelled by the CSV or
    the folder. Every defect is listed in OUT/import_report.json and the returned report.
    """
    if link not in LINK_MODES:
        raise DatasetError(f"unknown link mode {link!r}; choose one of {', '.join(LINK_MODES)}")
    if conflicts not in CONFLICT_RULES:
        raise DatasetError(
            f"unknown conflict rule {conflicts!r}; choose one of {', '.join(CONFLICT_RULES)}")
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid_fraction must be within (0, 1), got {valid_fraction}")
    source = Path(src).expanduser().resolve()
    root = Path(out).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"refusing to write into {root}: it exists and is not an empty folder")
    rows = _read_csv(source)
    files = _on_disk(source)
    report = ImportReport(source=str(source), out=str(root), seed=seed,
                          valid_fraction=valid_fraction, conflict_rule=conflicts)
    report.missing_files = sorted(set(rows) - set(files))
    report.not_in_csv = sorted(set(files) - set(rows))

    candidates: list[_Image] = []
    for image_id in sorted(set(rows) & set(files)):
        row = rows[image_id]
        path, folder_label = files[image_id]
        try:
            csv_label = int(row["fractured"].strip())
        except ValueError:
            csv_label = -1
        if csv_label != folder_label:
            report.label_conflicts.append((image_id, csv_label, folder_label))
            if conflicts == "skip" or (conflicts == "csv" and csv_label not in (0, 1)):
                continue
        label = csv_label if conflicts == "csv" else folder_label
        part = fracatlas_body_part(row)
        if part == "unknown":
            report.no_body_part.append(image_id)
        candidates.append(_Image(image_id, path, part, label))

    if check:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            reasons = []
            for n, reason in enumerate(pool.map(_check, [im.path for im in candidates]), 1):
                reasons.append(reason)
                if progress is not None:
                    progress(n)
        report.unreadable = [(im.image_id, r) for im, r in zip(candidates, reasons, strict=True)
                             if r is not None]
        bad = {i for i, _ in report.unreadable}
        images = [im for im in candidates if im.image_id not in bad]
    else:
        images = candidates
    if not images:
        raise DatasetError(f"{source}: no usable image to import")

    split = stratified_split(images, seed=seed, valid_fraction=valid_fraction)
    root.mkdir(parents=True, exist_ok=True)
    manifest = []
    for im in images:
        name = split[im.image_id]
        outcome = "positive" if im.label else "negative"
        stem = Path(im.image_id).stem
        rel = (Path(name) / f"XR_{im.body_part.upper()}" / f"patient{stem}"
               / f"study1_{outcome}" / f"image1{im.path.suffix.lower()}")
        _place(im.path, root / rel, link)
        manifest.append((im.image_id, name, im.body_part, im.label, rel.as_posix()))
        report.studies[name] = report.studies.get(name, 0) + 1
        report.abnormal[name] = report.abnormal.get(name, 0) + im.label
        counts = report.by_body_part.setdefault(name, {}).setdefault(im.body_part, [0, 0])
        counts[im.label] += 1
    with (root / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("image_id", "split", "body_part", "label", "path"))
        writer.writerows(manifest)
    (root / REPORT_NAME).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    totals = Counter(im.body_part for im in images)
    log.info("imported %d FracAtlas images (%s) to %s; left out %d unreadable, %d label "
             "conflicts (%s), %d missing", len(images), dict(sorted(totals.items())), root,
             len(report.unreadable), len(report.label_conflicts), conflicts,
             len(report.missing_files))
    return report
