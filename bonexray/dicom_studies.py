"""Studies from DICOM files: headers only, grouped by StudyInstanceUID and body part.

A folder tree (or a DICOMDIR) of DICOM files becomes studies wherever the files lie:

- one study per StudyInstanceUID and body part (a study that mixes body parts is split);
  its key is "StudyInstanceUID/part", or the bare StudyInstanceUID when the part is
  unknown;
- views are SOPInstanceUIDs: the same object sent twice (two files) is one view, read from
  the first of its files in path order;
- only CR and DX For Presentation objects are views; every other object (DX For
  Processing, structured reports, presentation states, secondary captures, other
  modalities) is left out and counted by its SOP class, so bonexray never classifies its
  own results; a DICOMDIR is an index, not an object;
- a file with the DICOM preamble whose header cannot be read is a study of its own (keyed
  by its path) whose one view fails with the reason: it is reported, not lost.

Only headers are read here (no pixel data): pixels are decoded by the worker.

Body part, in order: BodyPartExamined, the AnatomicRegionSequence, the series description,
the study description (the series first: it is the one that differs when a study mixes
parts). A value naming one of MURA's seven parts is mapped to it ("WRIST", "L WRIST",
"XR Wrist 3 views"); a text naming two parts ("Hand and wrist") names neither; another
BodyPartExamined is kept in lower case ("CSPINE" -> "cspine"); nothing found stays unknown.

No PHI leaves this module: the PatientID becomes a keyed hash (HMAC-SHA256 under
BONEXRAY_PATIENT_KEY; nothing without a key); names and dates are never read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonexray.dicom import RADIOGRAPHS, configure_pydicom, safe_reason, sop_class_name
from bonexray.errors import one_line

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Words naming MURA's body parts, in BodyPartExamined (DICOM PS3.16 Annex L defined terms)
# and in free-text descriptions; plural forms included.
_PART_WORDS = {
    "elbow": "elbow", "elbows": "elbow",
    "finger": "finger", "fingers": "finger", "thumb": "finger", "thumbs": "finger",
    "digit": "finger", "digits": "finger",
    "forearm": "forearm", "forearms": "forearm", "radius": "forearm", "ulna": "forearm",
    "hand": "hand", "hands": "hand",
    "humerus": "humerus", "humeri": "humerus", "upperarm": "humerus",
    "shoulder": "shoulder", "shoulders": "shoulder",
    "wrist": "wrist", "wrists": "wrist",
}
# Two-word names, matched before single words.
_PART_PHRASES = {("upper", "arm"): "humerus", ("fore", "arm"): "forearm"}
# SNOMED CT codes of the AnatomicRegionSequence (CID 4031 / 4042) for the seven parts.
_SNOMED_PARTS = {
    "127949000": "elbow", "16953009": "elbow", "76248009": "elbow",
    "7569003": "finger", "76505004": "finger",
    "14975008": "forearm",
    "85562004": "hand",
    "85050009": "humerus", "40983000": "humerus",
    "16982005": "shoulder", "91774008": "shoulder",
    "8205005": "wrist", "74670003": "wrist",
}
# The only tags read from each file (no pixel data, no names, no dates).
_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "AccessionNumber", "PatientID",
         "BodyPartExamined", "AnatomicRegionSequence", "StudyDescription",
         "SeriesDescription"]


@dataclass(frozen=True)
class Header:
    """What grouping needs from one DICOM file."""

    path: str
    sop_class: str
    sop_uid: str | None = None
    study_uid: str | None = None
    accession: str | None = None
    patient: str | None = None  # the keyed hash of the PatientID, never the id
    body_part: str | None = None


@dataclass
class DicomScan:
    """Studies found in DICOM files, and what was left out."""

    # (key, study_uid, accession, patient hash, body part, [(path, sop uid)]) per study
    studies: list[tuple[str, str | None, str | None, str | None, str | None,
                        list[tuple[str, str | None]]]] = field(default_factory=list)
    not_radiographs: Counter[str] = field(default_factory=Counter)  # SOP class name -> n
    duplicates: int = 0  # files holding an object already seen (same SOPInstanceUID)
    unreadable: int = 0  # files with the preamble but no readable header


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def part_from_text(text: str | None) -> str | None:
    """The one MURA body part a text names, or None when it names none or several."""
    if not text:
        return None
    words = _words(text)
    found = {part for pair, part in _PART_PHRASES.items()
             for i in range(len(words) - 1) if (words[i], words[i + 1]) == pair}
    found.update(_PART_WORDS[w] for w in words if w in _PART_WORDS)
    return found.pop() if len(found) == 1 else None


def _values(value: Any) -> list[str]:
    """An element's values as text (a multi-valued element gives several)."""
    if value is None:
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    return [text] if text else []


def body_part_of(ds: Any) -> str | None:
    """A DICOM object's body part (the module docstring's rules)."""
    examined = _values(ds.get("BodyPartExamined", None))
    if examined:
        parts = {part_from_text(v) or v.lower()[:64] for v in examined}
        return parts.pop() if len(parts) == 1 else None
    for item in ds.get("AnatomicRegionSequence", None) or ():
        code = str(item.get("CodeValue", "") or "").strip()
        part = _SNOMED_PARTS.get(code) or part_from_text(str(item.get("CodeMeaning", "")))
        if part:
            return part
    for name in ("SeriesDescription", "StudyDescription"):
        part = part_from_text(str(ds.get(name, "") or ""))
        if part:
            return part
    return None


def patient_hash(patient_id: str | None, key: str) -> str | None:
    """HMAC-SHA256 of a PatientID under `key` (hex, 32 characters); None without either."""
    if not patient_id or not key:
        return None
    return hmac.new(key.encode(), patient_id.strip().encode(), hashlib.sha256).hexdigest()[:32]


def _text(ds: Any, name: str) -> str | None:
    """An element's (first) value as text; None when absent, empty or unreadable."""
    try:
        values = _values(ds.get(name, None))
    except Exception:  # a damaged element: as if absent
        return None
    return values[0].rstrip("\0") if values else None


def valid_uid(uid: str | None) -> str | None:
    """`uid` when it is a well-formed UID (digits and dots, at most 64 characters)."""
    return uid if uid and len(uid) <= 64 and _UID.match(uid) else None


def read_header(path: str, *, patient_key: str = "") -> Header:
    """The grouping header of one DICOM file, without its pixel data.

    Raises ImageError (one line) when the file has no readable DICOM header."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from bonexray.imaging import ImageError

    configure_pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except InvalidDicomError:
        raise ImageError("not a readable DICOM header: no DICOM preamble or file meta") \
            from None
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise ImageError(f"not a readable DICOM header ({safe_reason(exc)})") from None
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class:
        meta = getattr(ds, "file_meta", None)
        sop_class = _text(meta, "MediaStorageSOPClassUID") if meta is not None else None
    if not sop_class:
        raise ImageError("not a readable DICOM header: no SOPClassUID (a truncated or "
                         "damaged file?)")
    try:
        part = body_part_of(ds)
    except Exception:  # a damaged sequence or description: the part stays unknown
        part = None
    accession = _text(ds, "AccessionNumber")
    return Header(path=path, sop_class=sop_class, sop_uid=_text(ds, "SOPInstanceUID"),
                  study_uid=_text(ds, "StudyInstanceUID"),
                  accession=accession[:64] if accession else None,
                  patient=patient_hash(_text(ds, "PatientID"), patient_key),
                  body_part=part)



def dicomdir_files(path: str | Path) -> list[str]:
    """The files a DICOMDIR references (absolute paths), in its order."""
    from pydicom.fileset import FileSet

    from bonexray.studies import StudyError

    try:
        fs = FileSet(str(path))
    except Exception as exc:  # pydicom raises many kinds on a malformed DICOMDIR
        raise StudyError(f"{path}: not a readable DICOMDIR: {one_line(exc, limit=200)}") \
            from None
    return [str(Path(instance.path).resolve()) for instance in fs]


def is_dicomdir(path: str | Path) -> bool:
    """A DICOMDIR file: named so, or a Media Storage Directory object."""
    if Path(path).name.upper() == "DICOMDIR":
        return True
    try:
        import pydicom

        meta = pydicom.filereader.read_file_meta_info(str(path))
    except Exception:
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def group_studies(paths: Iterable[str], *, patient_key: str = "", threads: int = 8,
                  refused: Iterable[str] = ()) -> DicomScan:
    """Read the headers of `paths` (DICOM files) and group them into studies. `refused`
    files (outside the data roots) are not read: each is a study of its own that fails."""
    refused = sorted(set(refused))
    ordered = sorted(set(paths) - set(refused))
    scan = DicomScan()
    if not ordered and not refused:
        return scan
    try:
        import pydicom  # noqa: F401
    except ImportError:
        from bonexray.studies import StudyError

        raise StudyError(f"{len(ordered)} DICOM files found (e.g. {ordered[0]}); reading them "
                         "needs the dicom extra: pip install 'bonexray[dicom]'") from None

    def read(path: str) -> Header | str:
        from bonexray.imaging import ImageError

        try:
            return read_header(path, patient_key=patient_key)
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        headers = list(pool.map(read, ordered))

    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    seen: set[str] = set()
    unreadable: list[str] = []
    for path, header in zip(ordered, headers, strict=True):
        if isinstance(header, str):
            unreadable.append(path)
            continue
        if header.sop_class == MEDIA_STORAGE_DIRECTORY:
            continue
        if header.sop_class not in RADIOGRAPHS:
            scan.not_radiographs[sop_class_name(header.sop_class) if header.sop_class
                                 else "no SOPClassUID"] += 1
            continue
        if header.sop_uid is not None:
            if header.sop_uid in seen:
                scan.duplicates += 1
                continue
            seen.add(header.sop_uid)
        if header.study_uid is None:  # Type 1, yet missing: the file is its own study
            groups[(path, None)] = {"key": path, "uid": None, "accession": header.accession,
                                    "patient": header.patient, "part": header.body_part,
                                    "views": [(path, valid_uid(header.sop_uid))]}
            continue
        # Grouped by the UID as written; stored (study_uid, sop_uid) only when well formed.
        group = groups.setdefault((header.study_uid, header.body_part), {
            "key": f"{header.study_uid}/{header.body_part}" if header.body_part
            else header.study_uid,
            "uid": valid_uid(header.study_uid), "accession": header.accession,
            "patient": header.patient, "part": header.body_part, "views": []})
        group["views"].append((path, valid_uid(header.sop_uid)))
    for path in [*unreadable, *refused]:  # a study that fails, with its reason, at decode
        groups[(path, None)] = {"key": path, "uid": None, "accession": None, "patient": None,
                                "part": None, "views": [(path, None)]}
    scan.unreadable = len(unreadable)
    for g in sorted(groups.values(), key=lambda g: g["key"]):
        scan.studies.append((g["key"], g["uid"], g["accession"], g["patient"], g["part"],
                             g["views"]))
    if scan.not_radiographs or scan.duplicates or scan.unreadable:
        log.info("DICOM: %d studies; left out %d objects that are not radiographs, %d "
                 "duplicate objects; %d unreadable headers", len(scan.studies),
                 sum(scan.not_radiographs.values()), scan.duplicates, scan.unreadable)
    return scan


def describe_left_out(scan: DicomScan) -> str | None:
    """One line on what a scan left out, or None when nothing was."""
    parts = [f"{n} {name}" for name, n in sorted(scan.not_radiographs.items(),
                                                 key=lambda kv: (-kv[1], kv[0]))]
    line = []
    if parts:
        line.append(f"left out {sum(scan.not_radiographs.values())} DICOM objects that are not "
                    f"CR/DX For Presentation radiographs ({', '.join(parts)})")
    if scan.duplicates:
        line.append(f"{scan.duplicates} duplicate files (an SOPInstanceUID seen already) "
                    "counted once")
    if scan.unreadable:
        line.append(f"{scan.unreadable} files with an unreadable DICOM header fail as "
                    "studies of their own")
    return "; ".join(line) if line else None


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def walk_dicom(paths: Sequence[str], threads: int = 8) -> list[str]:
    """Those of `paths` that are regular DICOM files (by name, or by the preamble read in
    a pool of threads). FIFOs, sockets and devices are never opened."""
    from bonexray.imaging import is_dicom_path

    regular = [p for p in paths if _is_regular(p)]
    if len(regular) < 64:
        return [p for p in regular if is_dicom_path(p)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = list(pool.map(is_dicom_path, regular))
    return [p for p, yes in zip(regular, found, strict=True) if yes]
