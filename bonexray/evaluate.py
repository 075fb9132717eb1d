"""Evaluate a job against its labels: MURA's figures with bootstrap CIs, stored in SQL."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from bonexray.db import query, store
from bonexray.db.tables import Job, Model, Study
from bonexray.errors import BonexrayError, InvalidValueError
from bonexray.metrics import json_safe, metrics_with_ci
from bonexray.pipeline.records import QUEUED
from bonexray.studies import SPLITS

log = logging.getLogger(__name__)

UNKNOWN_PART = "unknown"  # the group of studies whose folder names no body part
DEFAULT_RESAMPLES = 1000
DEFAULT_THRESHOLD = 0.5
ABNORMAL = "abnormal"
MANIFEST_NAME = "import_manifest.csv"  # what `bonexray import` writes beside the layout
# Manifest columns that are not flags to break results down by.
_NOT_FLAGS = {"image_id", "split", "body_part", "label", "group", "path"}


class NothingToEvaluateError(BonexrayError, ValueError):
    """The job has no study with a label to compare its predictions with."""


class ManifestError(BonexrayError, ValueError):
    """A breakdown by flags asked for without a manifest that carries them."""


def find_manifest(root: str | Path) -> Path | None:
    """The import manifest of a job's root: in the root or the nearest folder above it."""
    start = Path(root)
    for folder in (start, *start.parents):
        candidate = folder / MANIFEST_NAME
        if candidate.is_file():
            return candidate
    return None


def read_flags(manifest: str | Path, flags: Sequence[str]) -> dict[str, dict[str, str]]:
    """study folder (absolute, as jobs store it) -> {flag: value} from an import manifest.

    A study's flags are its views' (one view per study in FracAtlas); a study whose views
    disagree gets "mixed".
    """
    path = Path(manifest)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        available = sorted(columns - _NOT_FLAGS)
        missing = [f for f in flags if f not in columns or f in _NOT_FLAGS]
        if missing or "path" not in columns:
            raise ManifestError(f"{path} has no column {', '.join(missing) or 'path'}; its "
                                f"flags: {', '.join(available) or 'none'}")
        by_study: dict[str, dict[str, str]] = {}
        base = path.parent.resolve()
        for row in reader:
            study = str((base / row["path"]).parent)
            seen = by_study.setdefault(study, {})
            for flag in flags:
                value = row[flag].strip()
                seen[flag] = value if seen.get(flag, value) == value else "mixed"
    return by_study


def flag_breakdown(outcomes: Sequence[dict[str, Any]], flags_by_study: dict[str, dict[str, str]],
                   flags: Sequence[str], *, threshold: float, resamples: int,
                   seed: int) -> dict[str, dict[str, Any]]:
    """{flag: {value: figures}} for the labelled studies (value "?" when the manifest does
    not list the study); the figures as summarize_outcomes' overall ones."""
    result: dict[str, dict[str, Any]] = {}
    for flag in flags:
        values = {o["study"]: flags_by_study.get(o["study"], {}).get(flag, "?") for o in outcomes}
        result[flag] = {}
        for value in sorted(set(values.values())):
            subset = [o for o in outcomes if values[o["study"]] == value]
            if any(o["label"] is not None for o in subset):
                result[flag][value] = summarize_outcomes(
                    subset, threshold=threshold, resamples=resamples, seed=seed)["overall"]
    return result


@dataclass(frozen=True)
class JobEvaluation:
    """Figures of a job against its labels, and the scored studies they come from."""

    job_id: int
    run: int | None  # the stored run number; None when not saved
    threshold: float
    resamples: int
    seed: int
    figures: dict[str, Any]  # {"overall": {...}, "by_body_part": {PART: {...}}}
    labels: np.ndarray  # of the labelled, scored studies, by path
    scores: np.ndarray
    body_parts: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The figures for strict JSON: undefined figures as null, intervals as lists."""
        return dict(json_safe(self.figures))


def _part(value: str | None) -> str:
    return value if value else UNKNOWN_PART


def summarize_outcomes(outcomes: Sequence[dict[str, Any]], *, threshold: float,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """{"overall": {...}, "by_body_part": {PART: {...}}} from study outcomes (dicts with
    body_part, label, score): metrics_with_ci of the labelled, scored studies, plus
    `unscored` (labelled without a score) and `unlabelled` (skipped) counts.

    Body parts are those of the labelled studies; a part whose labelled studies all lack
    a score is listed with n = 0 and undefined figures.
    """
    labelled = [o for o in outcomes if o["label"] is not None]
    scored = [o for o in labelled if o["score"] is not None]
    labels = np.array([int(o["label"]) for o in scored], dtype=np.int64)
    scores = np.array([float(o["score"]) for o in scored], dtype=np.float64)
    parts = np.array([_part(o["body_part"]) for o in scored], dtype=object)

    def figures(mask: np.ndarray, unscored: int, unlabelled: int) -> dict[str, Any]:
        result = metrics_with_ci(labels[mask], scores[mask], threshold,
                                 resamples=resamples, seed=seed)
        return {**result, "unscored": unscored, "unlabelled": unlabelled}

    overall = figures(np.ones(labels.size, dtype=bool), len(labelled) - len(scored),
                      len(outcomes) - len(labelled))
    overall["threshold"] = float(threshold)
    by_part: dict[str, Any] = {}
    for name in sorted({_part(o["body_part"]) for o in labelled}):
        unscored = sum(1 for o in labelled
                       if o["score"] is None and _part(o["body_part"]) == name)
        unlabelled = sum(1 for o in outcomes
                         if o["label"] is None and _part(o["body_part"]) == name)
        by_part[name] = figures(parts == name, unscored, unlabelled)
    return {"overall": overall, "by_body_part": by_part}


def job_threshold(*, session: Session, job_id: int) -> float:
    """The decision threshold in the metadata of the job's model (0.5 when it has none)."""
    job = session.get(Job, job_id)
    if job is None:
        raise query.JobNotFoundError(f"no job with id {job_id}")
    model = session.get(Model, job.model_id)
    raw = (model.meta or {}).get("threshold") if model is not None else None
    return DEFAULT_THRESHOLD if raw is None else float(raw)


def evaluate_job(*, session: Session, job_id: int, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0, threshold: float | None = None,
                 save: bool = True, exclude_partial: bool = False,
                 by_flags: Sequence[str] = (),
                 manifest: str | Path | None = None) -> JobEvaluation:
    """Compare a job's study scores with the labels its folders or MURA CSVs carry, at
    the model's threshold (or `threshold`), and store the figures as a new evaluation run.

    Partial studies (scored from some of their views) are counted in the overall figures'
    `partial`; with `exclude_partial` they are left out of the figures altogether.
    `by_flags` adds figures["by_flag"][FLAG][VALUE] from an import manifest (`manifest`,
    else the one found at the job's root or above it), e.g. with and without hardware.
    """
    model_threshold = job_threshold(session=session, job_id=job_id)
    threshold = model_threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InvalidValueError(f"threshold {threshold} outside 0..1")
    outcomes = query.study_outcomes(session=session, job_id=job_id)
    n_labelled = sum(1 for o in outcomes if o["label"] is not None)
    if n_labelled == 0:
        raise NothingToEvaluateError(
            f"job {job_id}: none of its {len(outcomes)} studies has a label (MURA "
            "study<N>_positive/_negative folders or *_labeled_studies.csv give them)"
        )
    queued = sum(1 for o in outcomes if o["status"] == QUEUED and o["label"] is not None)
    if queued:
        log.warning("job %d is not finished: %d labelled studies still queued count as "
                    "unscored", job_id, queued)
    n_partial = sum(1 for o in outcomes if o["label"] is not None and o.get("partial"))
    if exclude_partial:
        outcomes = [o for o in outcomes if not o.get("partial")]
    figures = summarize_outcomes(outcomes, threshold=threshold, resamples=resamples,
                                 seed=seed)
    figures["overall"]["partial"] = n_partial
    figures["overall"]["partial_excluded"] = bool(exclude_partial)
    if by_flags:
        job = session.get(Job, job_id)
        found = Path(manifest) if manifest is not None else find_manifest(job.root) \
            if job is not None else None
        if found is None:
            raise ManifestError(f"no {MANIFEST_NAME} at {job.root if job else '?'} or above "
                                "it; pass --manifest (written by `bonexray import`)")
        flags = read_flags(found, by_flags)
        matched = sum(1 for o in outcomes if o["study"] in flags)
        if not matched:
            raise ManifestError(f"{found} lists none of job {job_id}'s {len(outcomes)} studies "
                                "(was the data moved or copied since the import?)")
        if matched < len(outcomes):
            log.warning("%s lists %d of job %d's %d studies; the others count as flag '?'",
                        found, matched, job_id, len(outcomes))
        figures["by_flag"] = flag_breakdown(outcomes, flags, by_flags, threshold=threshold,
                                            resamples=resamples, seed=seed)
        figures["manifest"] = str(found)
    run = None
    if save:
        groups: dict[str | None, dict[str, Any]] = {None: figures["overall"]}
        groups.update(figures["by_body_part"])
        run = store.save_evaluation(session=session, job_id=job_id, groups=groups,
                                    threshold=threshold, resamples=resamples, seed=seed)
    scored = [o for o in outcomes if o["label"] is not None and o["score"] is not None]
    return JobEvaluation(
        job_id=job_id, run=run, threshold=threshold, resamples=resamples, seed=seed,
        figures=figures,
        labels=np.array([int(o["label"]) for o in scored], dtype=np.int64),
        scores=np.array([float(o["score"]) for o in scored], dtype=np.float64),
        body_parts=tuple(_part(o["body_part"]) for o in scored),
    )


def mura_study_name(path: str, *, root: str, relative_to: str | None = None) -> str:
    """A study path as MURA's CSVs write it: `MURA-v1.1/valid/XR_WRIST/patient1/study1_positive/`.

    Relative to `relative_to` when given; else from the folder that holds the split folder
    (train/valid/test), else from the parent of the job's root. Always `/` and a trailing `/`.
    """
    pure = PurePosixPath(path)
    if relative_to is not None:
        rel = os.path.relpath(path, relative_to)
    else:
        parts = pure.parts
        splits = [i for i, part in enumerate(parts) if part.lower() in SPLITS and i >= 2]
        if splits:
            rel = str(PurePosixPath(*parts[splits[-1] - 1:]))
        else:
            rel = os.path.relpath(path, str(PurePosixPath(root).parent))
    return rel.replace(os.sep, "/").rstrip("/") + "/"


def write_mura_predictions(*, session: Session, job_id: int, out: str | Path | TextIO,
                           relative_to: str | None = None) -> dict[str, int]:
    """Write a job's study predictions in MURA's official format (`study/,label` rows, no
    header; 1 abnormal, 0 normal), by path, to a file path or an open text stream. Studies
    without a prediction are left out and counted, and so are DICOM studies (keyed by
    StudyInstanceUID, not by a folder: `export-dicom` is their format):
    {"written": n, "unscored": m, "not_folders": k}."""
    job = session.get(Job, job_id)
    if job is None:
        raise query.JobNotFoundError(f"no job with id {job_id}")
    rows = session.execute(
        select(Study.key, Study.prediction).where(Study.job_id == job_id)
    ).all()
    folders = [(key, prediction) for key, prediction in rows if os.path.isabs(key)]
    scored = sorted((path, prediction) for path, prediction in folders
                    if prediction is not None)
    def write(fh: TextIO) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        for path, prediction in scored:
            writer.writerow([mura_study_name(path, root=job.root, relative_to=relative_to),
                             1 if prediction == ABNORMAL else 0])

    if isinstance(out, (str, Path)):
        target = Path(out)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"{target.parent}: no such folder for the predictions file")
        with target.open("w", newline="", encoding="utf-8") as fh:
            write(fh)
    else:
        write(out)
    return {"written": len(scored), "unscored": len(folders) - len(scored),
            "not_folders": len(rows) - len(folders)}
