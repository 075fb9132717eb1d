"""Import public radiograph datasets into the MURA layout (FracAtlas), reporting their defects."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from bonexray.errors import BonexrayError
from bonexray.imaging import ImageError, decode_gray
from bonexray.studies import seeded_rank

log = logging.getLogger(__name__)

FRACATLAS_PARTS = ("hand", "leg", "hip", "shoulder")
# Kept in the manifest (evaluate can break results down by them): metal hardware is
# nearly always a fractured image in FracAtlas, a shortcut a model can learn.
FRACATLAS_FLAGS = ("hardware", "multiscan", "frontal", "lateral", "oblique")
MAX_ID_GAP = 3  # consecutive ids this far apart (left-out images between) may be one exam
# Two images whose detail thumbnails correlate above this are taken for one exposure.
# Measured on FracAtlas (3,219 images): no random pair of 20,000 exceeds 0.95, and at 0.95
# the 82 pairs found are mostly exact duplicates under other ids; at 0.9 the rare random
# matches chain 224 images into one group (benchmarks/RESULTS.md).
NEAR_DUPLICATE = 0.95
THUMB = 64
FRACATLAS_FOLDERS = {"Fractured": 1, "Non_fractured": 0}
LINK_MODES = ("copy", "hardlink", "symlink")
CONFLICT_RULES = ("skip", "csv", "folder")
REPORT_NAME = "import_report.json"
MANIFEST_NAME = "import_manifest.csv"


class DatasetError(BonexrayError, ValueError):
    """A source folder that is not the dataset it claims to be, or an unusable output folder."""


@dataclass
class ImportReport:
    """What an import wrote and which of the source's defects it met."""

    source: str
    out: str
    seed: int
    valid_fraction: float
    test_fraction: float = 0.0
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
    # Likely-one-exam groups, split as wholes: per split, and how they were found.
    groups: dict[str, int] = field(default_factory=dict)  # per split
    grouping: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> flag -> count

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "out": self.out, "seed": self.seed,
            "valid_fraction": self.valid_fraction, "test_fraction": self.test_fraction,
            "studies": self.studies, "groups": self.groups, "grouping": self.grouping,
            "flags": self.flags,
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
    parts_key: tuple[str, ...] = ()  # the body-part flags as written (hand..mixed)
    flags: tuple[int, ...] = ()  # FRACATLAS_FLAGS, 0/1 each


def _flag(row: dict[str, str], name: str) -> int:
    return 1 if row.get(name, "0").strip() == "1" else 0


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


def _id_number(image_id: str) -> int | None:
    digits = re.findall(r"\d+", Path(image_id).stem)
    return int(digits[-1]) if digits else None


class _Groups:
    """Union-find over image indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def thumbnail(pixels: np.ndarray, side: int = THUMB) -> np.ndarray:
    """A gray image's detail at side x side (stretched, minus its Gaussian blur of radius
    side/8) as a zero-mean, unit-norm float32 vector: the dot product of two is their
    correlation. Without the blur removed, the shared layout of radiographs (bright
    anatomy on a dark field) makes unrelated images correlate above 0.9."""
    img = Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.BILINEAR)
    small = np.asarray(img, dtype=np.float32) - np.asarray(
        img.filter(ImageFilter.GaussianBlur(side / 8)), dtype=np.float32)
    small = small.reshape(-1) - small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


def near_duplicate_pairs(thumbs: np.ndarray, threshold: float,
                         block: int = 1024) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of rows whose correlation exceeds `threshold`, in blocks of rows so
    that memory stays block x n whatever the dataset's size."""
    pairs: list[tuple[int, int, float]] = []
    n = thumbs.shape[0]
    for start in range(0, n, block):
        corr = thumbs[start:start + block] @ thumbs.T
        rows, cols = np.nonzero(corr > threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c:
                pairs.append((i, c, float(corr[r, c])))
    return pairs


def group_images(images: list[_Image], thumbs: np.ndarray | None, *,
                 max_gap: int = MAX_ID_GAP,
                 near_duplicate: float | None = NEAR_DUPLICATE) -> tuple[list[int], dict[str, Any]]:
    """Each image's group (the index of the group's first image) and how groups were found.

    FracAtlas names no patient. Two images are taken for one exam when (a) their ids are
    consecutive (at most `max_gap` apart, nothing in between) with the same body-part flags,
    or (b) their thumbnails correlate above `near_duplicate` (re-takes, other windows of
    one exposure). Groups are the transitive closure: splitting by group keeps every
    likely-same-exam pair on one side.
    """
    groups = _Groups(len(images))
    numbered = sorted((num, i) for i, im in enumerate(images)
                      if (num := _id_number(im.image_id)) is not None)
    consecutive = 0
    for (num_a, a), (num_b, b) in zip(numbered, numbered[1:], strict=False):
        if num_b - num_a <= max_gap and images[a].parts_key == images[b].parts_key:
            consecutive += groups.union(a, b)
    duplicates: list[tuple[int, int, float]] = []
    if thumbs is not None and near_duplicate is not None and len(images) > 1:
        duplicates = near_duplicate_pairs(thumbs, near_duplicate)
    joined_by_look = sum(groups.union(a, b) for a, b, _ in duplicates)
    owner = [groups.find(i) for i in range(len(images))]
    sizes = Counter(owner)
    info = {
        "rule": f"consecutive ids (gap <= {max_gap}) with the same body-part flags, or "
                + (f"thumbnail correlation > {near_duplicate}" if near_duplicate is not None
                   else "no visual check"),
        "groups": len(sizes), "images": len(images), "largest": max(sizes.values()),
        "sizes": {str(k): v for k, v in sorted(Counter(sizes.values()).items())},
        "consecutive_links": consecutive, "near_duplicate_pairs": len(duplicates),
        "near_duplicate_joins": joined_by_look,
        "near_duplicate_examples": [
            {"a": images[a].image_id, "b": images[b].image_id, "correlation": round(c, 4)}
            for a, b, c in sorted(duplicates, key=lambda t: -t[2])[:20]],
    }
    return owner, info


def grouped_split(images: list[_Image], owner: list[int], *, seed: int,
                  fractions: dict[str, float]) -> dict[str, str]:
    """image_id -> split, whole groups at a time, seeded, stratified as groups allow.

    A group's stratum is (its most common body part, whether any image is abnormal). In a
    seeded order, each group of a stratum goes to the split furthest below its share of the
    stratum's images (`fractions`, the rest to train); ties go to train, then to the splits
    in the order of `fractions`. A stratum of a few small groups can leave a held-out split
    without any of them (the report's counts per split show it).
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(owner):
        members.setdefault(g, []).append(i)
    strata: dict[tuple[str, int], list[int]] = {}
    for g, idx in members.items():
        part = Counter(images[i].body_part for i in idx).most_common(1)[0][0]
        label = max(images[i].label for i in idx)
        strata.setdefault((part, label), []).append(g)
    shares = {"train": 1.0 - sum(fractions.values()), **fractions}
    split: dict[str, str] = {}
    for groups in strata.values():
        groups.sort(key=lambda g: seeded_rank(seed, images[g].image_id))  # seeded, stable
        total = sum(len(members[g]) for g in groups)
        placed = dict.fromkeys(shares, 0)
        for g in groups:
            # The split whose share is missed by most so far (ties: train first).
            name = max(shares, key=lambda k: (shares[k] * total - placed[k], k == "train"))
            placed[name] += len(members[g])
            for i in members[g]:
                split[images[i].image_id] = name
    return split


def stratified_split(images: list[_Image], *, seed: int,
                     valid_fraction: float) -> dict[str, str]:
    """image_id -> 'train' / 'valid', every image on its own (no grouping)."""
    return grouped_split(images, list(range(len(images))), seed=seed,
                         fractions={"valid": valid_fraction})


def _inspect(path: Path, full: bool) -> tuple[str | None, np.ndarray | None]:
    """Why the image cannot be used (None: it can) and its thumbnail. `full` decodes every
    byte (a truncated JPEG fails); otherwise a reduced JPEG draft is enough."""
    try:
        pixels = decode_gray(path, draft_size=None if full else 4 * THUMB)
    except ImageError as exc:
        return str(exc), None
    return None, thumbnail(pixels)


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
                     valid_fraction: float = 0.2, test_fraction: float = 0.2,
                     link: str = "copy", conflicts: str = "skip", check: bool = True,
                     max_gap: int = MAX_ID_GAP, near_duplicate: float | None = NEAR_DUPLICATE,
                     threads: int = 2,
                     progress: Callable[[int], None] | None = None) -> ImportReport:
    """Write FracAtlas (dataset.csv + images/Fractured, images/Non_fractured) as MURA layout.

    FracAtlas names no patient, so images that are likely one exam are grouped (see
    group_images) and each group becomes one "patient": OUT/{train,valid,test}/XR_<PART>/
    patient<first id of the group>/study<k>_<positive|negative>/image1.<ext>, one study
    per image. Whole groups are split, seeded and stratified by (body part, label) as
    groups allow. Images that do not decode whole (truncated JPEGs) are left out; an image
    whose CSV label disagrees with its folder is left out (`conflicts="skip"`) or
    labelled by the CSV or the folder. OUT/import_manifest.csv lists every image with its
    split, group and flags (hardware, multiscan, frontal, lateral, oblique); every defect
    is in OUT/import_report.json and the returned report.
    """
    if link not in LINK_MODES:
        raise DatasetError(f"unknown link mode {link!r}; choose one of {', '.join(LINK_MODES)}")
    if conflicts not in CONFLICT_RULES:
        raise DatasetError(
            f"unknown conflict rule {conflicts!r}; choose one of {', '.join(CONFLICT_RULES)}")
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid_fraction must be within (0, 1), got {valid_fraction}")
    if not 0.0 <= test_fraction < 1.0 or valid_fraction + test_fraction >= 1.0:
        raise DatasetError(f"test_fraction must be within [0, 1) and leave images to train "
                           f"on (valid {valid_fraction} + test {test_fraction} >= 1)")
    if max_gap < 0:
        raise DatasetError(f"max_gap must be >= 0, got {max_gap}")
    if near_duplicate is not None and not -1.0 <= near_duplicate <= 1.0:
        raise DatasetError(f"near_duplicate is a correlation within [-1, 1], got "
                           f"{near_duplicate}")
    source = Path(src).expanduser().resolve()
    root = Path(out).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"refusing to write into {root}: it exists and is not an empty folder")
    rows = _read_csv(source)
    files = _on_disk(source)
    report = ImportReport(source=str(source), out=str(root), seed=seed,
                          valid_fraction=valid_fraction, test_fraction=test_fraction,
                          conflict_rule=conflicts)
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
        candidates.append(_Image(
            image_id, path, part, label,
            parts_key=tuple(row.get(p, "").strip() for p in (*FRACATLAS_PARTS, "mixed")),
            flags=tuple(_flag(row, f) for f in FRACATLAS_FLAGS)))

    looks = near_duplicate is not None
    thumbs: list[np.ndarray | None] = [None] * len(candidates)
    if check or looks:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            reasons = []
            jobs = pool.map(lambda p: _inspect(p, check), [im.path for im in candidates])
            for n, (reason, thumb) in enumerate(jobs, 1):
                reasons.append(reason)
                thumbs[n - 1] = thumb
                if progress is not None:
                    progress(n)
        report.unreadable = [(im.image_id, r) for im, r in zip(candidates, reasons, strict=True)
                             if r is not None]
    bad = {i for i, _ in report.unreadable}
    kept = [n for n, im in enumerate(candidates) if im.image_id not in bad]
    images = [candidates[n] for n in kept]
    if not images:
        raise DatasetError(f"{source}: no usable image to import")

    matrix = np.stack([thumbs[n] for n in kept]) if looks else None  # type: ignore[misc]
    owner, report.grouping = group_images(images, matrix, max_gap=max_gap,
                                          near_duplicate=near_duplicate)
    fractions = {"valid": valid_fraction, **({"test": test_fraction} if test_fraction else {})}
    split = grouped_split(images, owner, seed=seed, fractions=fractions)
    largest = report.grouping["largest"]
    if largest > 0.05 * len(images):
        log.warning("one group holds %d of %d images: the split can hardly be stratified "
                    "(are ids consecutive within one body part? --max-gap 0)", largest,
                    len(images))
    root.mkdir(parents=True, exist_ok=True)
    manifest = []
    study_numbers: Counter[tuple[str, str, int]] = Counter()
    groups_by_split: dict[str, set[int]] = {}
    for im, group in zip(images, owner, strict=True):
        name = split[im.image_id]
        outcome = "positive" if im.label else "negative"
        patient = Path(images[group].image_id).stem
        study_numbers[(im.body_part, patient, group)] += 1
        k = study_numbers[(im.body_part, patient, group)]
        rel = (Path(name) / f"XR_{im.body_part.upper()}" / f"patient{patient}"
               / f"study{k}_{outcome}" / f"image1{im.path.suffix.lower()}")
        _place(im.path, root / rel, link)
        manifest.append((im.image_id, name, im.body_part, im.label, patient, *im.flags,
                         rel.as_posix()))
        groups_by_split.setdefault(name, set()).add(group)
        report.studies[name] = report.studies.get(name, 0) + 1
        report.abnormal[name] = report.abnormal.get(name, 0) + im.label
        counts = report.by_body_part.setdefault(name, {}).setdefault(im.body_part, [0, 0])
        counts[im.label] += 1
        flags = report.flags.setdefault(name, dict.fromkeys(FRACATLAS_FLAGS, 0))
        for flag, value in zip(FRACATLAS_FLAGS, im.flags, strict=True):
            flags[flag] += value
    report.groups = {name: len(g) for name, g in sorted(groups_by_split.items())}
    with (root / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("image_id", "split", "body_part", "label", "group", *FRACATLAS_FLAGS,
                         "path"))
        writer.writerows(manifest)
    (root / REPORT_NAME).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    totals = Counter(im.body_part for im in images)
    log.info("imported %d FracAtlas images (%s) in %d likely-same-exam groups to %s; left "
             "out %d unreadable, %d label conflicts (%s), %d missing", len(images),
             dict(sorted(totals.items())), report.grouping["groups"], root,
             len(report.unreadable), len(report.label_conflicts), conflicts,
             len(report.missing_files))
    return report
