"""Find studies under a root: folders of view images (MURA layout and CSVs, or any plain
folder), and DICOM files grouped by StudyInstanceUID and body part (bonexray.dicom_studies)."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bonexray.dicom_studies import (
    DicomScan,
    describe_left_out,
    dicomdir_files,
    group_studies,
    is_dicomdir,
    walk_dicom,
)
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
    """One study: views of one body part of one patient. `key` names it: the absolute folder
    path for image folders, "StudyInstanceUID/body part" for DICOM."""

    key: str
    views: tuple[str, ...] = field(default_factory=tuple)  # absolute file paths, sorted
    body_part: str | None = None
    patient: str | None = None  # DICOM: a keyed hash of the PatientID, or None
    label: int | None = None  # 1 abnormal, 0 normal, None unknown
    split: str | None = None  # train / valid / test when the layout says so
    # DICOM only: the StudyInstanceUID, AccessionNumber, and each view's SOPInstanceUID.
    study_uid: str | None = None
    accession: str | None = None
    view_uids: tuple[str | None, ...] = ()

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


@dataclass(frozen=True)
class Scan:
    """The studies under a root, and what its DICOM files left out (None: no DICOM)."""

    studies: list[Study]
    dicom: DicomScan | None = None

    @property
    def left_out(self) -> str | None:
        """One line on the DICOM objects left out, or None."""
        return describe_left_out(self.dicom) if self.dicom is not None else None


def find_studies(root: str | Path) -> list[Study]:
    """Every study under `root` (see scan_studies)."""
    return scan_studies(root).studies


def scan_studies(root: str | Path, *, patient_key: str | None = None) -> Scan:
    """Every study under `root` (a folder, or a DICOMDIR file), sorted by key.

    Image folders: a study is a folder that holds view files directly, or a leaf folder
    (no sub-folders) without any view or DICOM file: that one is returned with no views so
    that it is reported, not lost. Views are files with a view extension, hidden files
    excepted, whatever their content (an undecodable one fails later, at decode, with its
    own error). MURA CSVs beside the data add labels and name views that are missing on
    disk (those then fail as missing).

    DICOM files (by name, or by the preamble for a name without an image extension)
    wherever they lie are grouped by StudyInstanceUID and body part from their headers
    (bonexray.dicom_studies); `patient_key` (default: the settings') keys the PatientID
    hash.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise StudyError(f"folder not found: {root_path}")
    if patient_key is None:
        from bonexray.settings import get_settings

        patient_key = get_settings().patient_key
    if root_path.is_file() and is_dicomdir(root_path):
        files = dicomdir_files(root_path)
        scan = group_studies(files, patient_key=patient_key, refused=_outside_roots(files))
        return Scan(studies=_dicom_studies(scan), dicom=scan)
    if not root_path.is_dir():
        raise StudyError(f"not a folder (or a DICOMDIR): {root_path}")
    root_path = root_path.resolve()
    labels, listed = _read_mura_csvs(root_path)

    found: dict[str, list[str]] = {}
    dicom_files: list[str] = []
    for dirpath, dirnames, filenames in _walk(root_path):
        views = [os.path.join(dirpath, f) for f in filenames if is_view_file(f)]
        others = [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and not is_view_file(f)]
        dicom = walk_dicom(others)
        dicom_files.extend(dicom)
        if views or (not dirnames and not dicom):
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
    dicom_scan = (group_studies(dicom_files, patient_key=patient_key,
                                refused=_outside_roots(dicom_files))
                  if dicom_files else None)
    for path in sorted(found):
        info = describe_path(path)
        label = labels.get(path, info["label"])
        studies.append(
            Study(
                key=path,
                views=tuple(sorted(found[path])),
                body_part=info["body_part"],  # type: ignore[arg-type]
                patient=info["patient"],  # type: ignore[arg-type]
                label=label,  # type: ignore[arg-type]
                split=info["split"],  # type: ignore[arg-type]
            )
        )
    if dicom_scan is not None:
        studies = sorted(studies + _dicom_studies(dicom_scan), key=lambda s: s.key)
    return Scan(studies=studies, dicom=dicom_scan)


def _outside_roots(paths: list[str]) -> list[str]:
    """Files (or symlinks to files) outside BONEXRAY_DATA_ROOTS: their headers are not
    read; each becomes a study of its own that fails with the reason."""
    from bonexray.security import data_roots, is_within

    roots = data_roots()
    return [p for p in paths if not is_within(p, roots)] if roots else []


def _dicom_studies(scan: DicomScan) -> list[Study]:
    return [Study(key=key, views=tuple(path for path, _ in views), body_part=part,
                  patient=patient, study_uid=uid, accession=accession,
                  view_uids=tuple(uid for _, uid in views))
            for key, uid, accession, patient, part, views in scan.studies]


def seeded_rank(seed: int, key: str) -> str:
    """A sort key that orders items (patients, exam groups) the same way for a seed and
    differently for another: the seeded splits of the importers and the trainer."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
