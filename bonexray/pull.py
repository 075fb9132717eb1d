"""`bonexray pull`: search a DICOMweb server (QIDO-RS), retrieve the matching radiographs
(WADO-RS) into the listener's spool, and classify each study through `enqueue`'s code path.

- Search: studies by date range, modality and accession number; then their series of the
  wanted modalities (CR, DX by default: SR, PR and other series are never retrieved), and,
  with a body part, the series whose BodyPartExamined or description names it.
- Resumable: instances already in the spool are not retrieved again (a pull killed halfway
  finishes with what is missing).
- Idempotent: a study already scored with this model (same StudyInstanceUID) is skipped,
  as `enqueue` skips folders, unless `force`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from bonexray.errors import BonexrayError, InvalidValueError, one_line

log = logging.getLogger(__name__)

# DICOM JSON tags (PS3.18 F.2).
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, BODY_PART, SERIES_DESCRIPTION = "00080060", "00180015", "0008103E"


class PullError(BonexrayError, RuntimeError):
    """The DICOMweb server cannot be searched or read."""


def _no_urls(exc: BaseException) -> str:
    """An error's reason without the URLs it quotes (they hold UIDs, accession numbers)."""
    import re

    return re.sub(r"https?://\S+", "<url>", one_line(exc, limit=300))[:200]


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass
class PullReport:
    studies_found: int = 0
    skipped_done: int = 0  # already scored with this model
    instances_retrieved: int = 0
    instances_present: int = 0  # in the spool already
    jobs: list[int] = field(default_factory=list)
    folders: dict[int, Any] = field(default_factory=dict)  # job -> its spool folder
    failed: dict[str, str] = field(default_factory=dict)  # study UID -> reason


def date_range(since: str | None, until: str | None) -> str | None:
    """A QIDO StudyDate range from YYYY-MM-DD or YYYYMMDD bounds (either may be open)."""
    def norm(value: str | None) -> str:
        if not value:
            return ""
        digits = value.replace("-", "")
        if len(digits) != 8 or not digits.isdigit():
            raise InvalidValueError(f"date {value!r}: give YYYY-MM-DD")
        return digits
    low, high = norm(since), norm(until)
    return f"{low}-{high}" if low or high else None


def search(client: Any, *, dates: str | None, modalities: Sequence[str],
           accession: str | None, body_part: str | None,
           limit: int | None) -> dict[str, list[str]]:
    """{study UID: [series UIDs to retrieve]} for the studies matching the filters."""
    from bonexray.dicom_studies import part_from_text

    filters: dict[str, Any] = {}
    if dates:
        filters["StudyDate"] = dates
    if accession:
        filters["AccessionNumber"] = accession
    try:
        studies = client.search_for_studies(search_filters=filters, limit=limit,
                                            get_remaining=limit is None)
    except Exception as exc:  # requests' and the server's errors alike
        raise PullError(f"QIDO-RS search failed: {_no_urls(exc)}") from None
    wanted = {m.upper() for m in modalities}
    out: dict[str, list[str]] = {}
    for study in studies:
        uid = _value(study, STUDY_UID)
        if uid is None:
            continue
        try:
            series = client.search_for_series(
                study_instance_uid=uid, fields=[BODY_PART, SERIES_DESCRIPTION],
                get_remaining=True)
        except Exception as exc:
            raise PullError(f"QIDO-RS series search failed: {_no_urls(exc)}") from None
        chosen = []
        for item in series:
            if (_value(item, MODALITY) or "").upper() not in wanted:
                continue
            if body_part:
                named = part_from_text(_value(item, BODY_PART)) or part_from_text(
                    _value(item, SERIES_DESCRIPTION))
                if named is not None and named != body_part:
                    continue
            if (series_uid := _value(item, SERIES_UID)) is not None:
                chosen.append(series_uid)
        if chosen:
            out[uid] = chosen
    return out


def scored_with_model(engine: Engine, model_id: int, study_uids: Sequence[str]) -> set[str]:
    """Those StudyInstanceUIDs an earlier job scored (done) with this model."""
    from bonexray.db.session import session_scope
    from bonexray.db.tables import Job, Study
    from bonexray.pipeline.records import DONE

    done: set[str] = set()
    wanted = sorted(set(study_uids))
    with session_scope(engine) as session:
        for start in range(0, len(wanted), 500):
            done.update(session.scalars(
                select(Study.study_uid).distinct().join(Job, Job.id == Study.job_id)
                .where(Job.model_id == model_id, Study.status == DONE,
                       Study.study_uid.in_(wanted[start:start + 500]))))
    return done


def retrieve(client: Any, spool: Any, study_uid: str, series: Sequence[str],
             report: PullReport) -> None:
    """Every instance of `series` not in the spool yet, written there."""
    from bonexray.listener import _safe_name

    folder = spool.root / _safe_name(study_uid)
    present = {p.stem for p in folder.glob("*.dcm")} if folder.is_dir() else set()
    for series_uid in series:
        try:
            instances = client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=series_uid,
                get_remaining=True)
        except Exception as exc:
            raise PullError(f"QIDO-RS instance search failed: {_no_urls(exc)}") from None
        for item in instances:
            sop_uid = _value(item, SOP_UID)
            if sop_uid is None:
                continue
            if _safe_name(sop_uid) in present:
                report.instances_present += 1
                continue
            try:
                ds = client.retrieve_instance(study_uid, series_uid, sop_uid)
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
            except Exception as exc:
                raise PullError(f"WADO-RS retrieval failed: {_no_urls(exc)}") from None
            spool.store(study_uid, sop_uid, buffer.getvalue())
            report.instances_retrieved += 1


def pull(*, client: Any, engine: Engine, model: Any, spool: Any,
         submit: Callable[[Any], int | None], dates: str | None = None,
         modalities: Sequence[str] = ("CR", "DX"), accession: str | None = None,
         body_part: str | None = None, limit: int | None = None,
         force: bool = False) -> PullReport:
    """Search, retrieve into the spool, and submit each retrieved study (see the module)."""
    from bonexray.listener import Pending

    report = PullReport()
    found = search(client, dates=dates, modalities=modalities, accession=accession,
                   body_part=body_part, limit=limit)
    report.studies_found = len(found)
    done = set() if force else scored_with_model(engine, model.id, list(found))
    report.skipped_done = len(done)
    for study_uid, series in found.items():
        if study_uid in done:
            continue
        with spool.filling(study_uid) as folder:  # a listener on this spool waits
            try:
                retrieve(client, spool, study_uid, series, report)
            except PullError as exc:
                report.failed[study_uid] = str(exc)
                continue
            files = spool.instances(folder)
            if not files:
                continue
            pending = Pending(folder=folder, instances=len(files),
                              newest_ns=max(p.stat().st_mtime_ns for p in files),
                              reopened=force)
            job = submit(pending)
            spool.mark(pending, job=job)
        if job is not None:
            report.jobs.append(job)
            report.folders[job] = folder
    log.info("pull: %d studies found, %d skipped as scored, %d instances retrieved, %d "
             "jobs", report.studies_found, report.skipped_done, report.instances_retrieved,
             len(report.jobs))
    return report
