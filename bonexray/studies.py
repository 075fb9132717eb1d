"""Find studies (folders of views) under a root: MURA layout and CSVs, or any plain folder."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bonexray.errors import BonexrayError
from bonexray.imaging import is_view_file

log = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"_(positive|negative)$", re.IGNORECASE)
_PATIENT_RE = re.compile(r"^patient(.+)$", re.IGNORECASE)
_PART_RE = re.compile(r"^XR_(.+)$", re.IGNORECASE)
SPLITS = ("train", "valid", "test")


class StudyError(BonexrayError, ValueError):
    """The folder to search is missing or unusable."""


@dataclass(frozen=True)
class Study:
    """One study: a folder of views of one body part of one patient."""

    path: str  # absolute folder path
    views: tuple[str, ...] = field(default_factory=tuple)  # absolute file paths, sorted
    body_part: str | None = None
    patient: str | None = None
    label: int | None = None  # 1 abnormal, 0 normal, None unknown
    split: str | None = None  # train / valid / test when the layout says so

    @property
    def is_empty(self) -> bool:
        return not self.views


def describe_path(path: str) -> dict[str, str | int | None]:
    """Body part, patient, label and split read from a study folder's path (MURA layout)."""
    parts = Path(path).parts
    info: dict[str, str | int | None] = {
        "body_part": None, "patient": None, "label": None, "split": None,
    }
    match = _LABEL_RE.search(parts[-1]) if parts else None
    if match:
        info["label"] = 1 if match.group(1).lower() == "positive" else 0
    for part in reversed(parts[:-1]):
        if info["patient"] is None and (m := _PATIENT_RE.match(part)):
            info["patient"] = m.group(1)
        elif info["body_part"] is None and (m := _PART_RE.match(part)):
            info["body_part"] = m.group(1).lower()
        elif info["split"] is None and part.lower() in SPLITS:
            info["split"] = part.lower()
    return info


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    # Symlinked folders are not followed: an archive must not lead the search outside it.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, filenames


def _read_csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [row for row in csv.reader(fh) if row and row[0].strip()]


def _csv_path_to_abs(raw: str, csv_dir: Path, root: Path) -> Path | None:
    """MURA CSVs name paths from above the dataset folder (MURA-v1.1/valid/...): find where."""
    rel = Path(raw.strip().rstrip("/"))
    if rel.is_absolute():
        return rel
    for base in (csv_dir, *csv_dir.parents, root):
        candidate = base / rel
        if candidate.exists():
            return candidate.resolve()
    # Drop leading components until the rest exists under the CSV's folder.
    for i in range(1, len(rel.parts)):
        candidate = csv_dir.joinpath(*rel.parts[i:])
        if candidate.exists():
            return candidate.resolve()
    return None


def _read_mura_csvs(root: Path) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Labels by study folder and listed views by study folder, from MURA's CSV files."""
    labels: dict[str, int] = {}
    listed: dict[str, set[str]] = {}
    csv_dirs = [root, *[p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]]
    for csv_dir in csv_dirs:
        for csv_file in sorted(csv_dir.glob("*_labeled_studies.csv")):
            for row in _read_csv_rows(csv_file):
                if len(row) < 2 or row[1].strip() not in ("0", "1"):
                    log.warning("%s: skipping malformed row", csv_file.name)
                    continue
                study = _csv_path_to_abs(row[0], csv_dir, root)
                if study is not None:
                    labels[str(study)] = int(row[1].strip())
        for csv_file in sorted(csv_dir.glob("*_image_paths.csv")):
            for row in _read_csv_rows(csv_file):
                raw = Path(row[0].strip())
                parent = _csv_path_to_abs(str(raw.parent), csv_dir, root)
                if parent is not None and is_view_file(raw.name):
                    listed.setdefault(str(parent), set()).add(str(parent / raw.name))
    return labels, listed


def find_studies(root: str | Path) -> list[Study]:
    """Every study under `root`, sorted by path.

    A study is a folder that holds view files directly, or a leaf folder (no sub-folders)
    without any: that one is returned with no views so that it is reported, not lost.
    Views are files with a view extension, hidden files excepted, whatever their content
    (an undecodable one fails later, at decode, with its own error). MURA CSVs beside the
    data add labels and name views that are missing on disk (those then fail as missing).
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise StudyError(f"folder not found: {root_path}")
    if not root_path.is_dir():
        raise StudyError(f"not a folder: {root_path}")
    root_path = root_path.resolve()
    labels, listed = _read_mura_csvs(root_path)

    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in _walk(root_path):
        views = [os.path.join(dirpath, f) for f in filenames if is_view_file(f)]
        if views or not dirnames:
            found[dirpath] = views
    for study_path, view_paths in listed.items():
        if study_path in found or Path(study_path).is_relative_to(root_path):
            found.setdefault(study_path, [])
            known = set(found[study_path])
            found[study_path].extend(v for v in view_paths if v not in known)
    for study_path in labels:
        if Path(study_path).is_relative_to(root_path):
            found.setdefault(study_path, [])

    studies = []
    for path in sorted(found):
        info = describe_path(path)
        label = labels.get(path, info["label"])
        studies.append(
            Study(
                path=path,
                views=tuple(sorted(found[path])),
                body_part=info["body_part"],  # type: ignore[arg-type]
                patient=info["patient"],  # type: ignore[arg-type]
                label=label,  # type: ignore[arg-type]
                split=info["split"],  # type: ignore[arg-type]
            )
        )
    return studies


def seeded_rank(seed: int, key: str) -> str:
    """A sort key that orders items (patients, exam groups) the same way for a seed and
    differently for another: the seeded splits of the importers and the trainer."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
