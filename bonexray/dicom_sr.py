"""Results as DICOM: one Comprehensive 3D SR per study, following TID 1500 (highdicom).

Each scored DICOM study of a job gets a Measurement Report in its own study (same
StudyInstanceUID; patient and study modules copied from its views by highdicom), in a new
series, with one measurement group:

- a qualitative evaluation "Finding": Normal (SCT 17621005) or Abnormal (SCT 263654008),
  the study's stored prediction (its score against the model's threshold);
- the study probability as a measurement ("Probability of abnormality", a bonexray code,
  unit UCUM "1");
- the finding site (SNOMED CT code of the body part), when it is one of MURA's seven;
- the algorithm: its name (the registered model name) and version (the model's sha256),
  with bonexray's version and the threshold as parameters;
- every view the score came from as a source image (failed views are not referenced), and
  in the evidence sequence.

The SR is written only from the job's results and the views' own headers (read again from
their sources, without pixel data): nothing is invented, and a study whose files are gone
is reported, not written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonexray import __version__
from bonexray.dicom import safe_reason
from bonexray.errors import BonexrayError, one_line

log = logging.getLogger(__name__)

# SNOMED CT codes of MURA's body parts (finding sites).
PART_SITES = {
    "elbow": ("127949000", "Elbow region structure"),
    "finger": ("7569003", "Finger structure"),
    "forearm": ("14975008", "Forearm structure"),
    "hand": ("85562004", "Hand structure"),
    "humerus": ("85050009", "Bone structure of humerus"),
    "shoulder": ("16982005", "Shoulder region structure"),
    "wrist": ("8205005", "Wrist region structure"),
}
NORMAL = ("17621005", "Normal")
ABNORMAL = ("263654008", "Abnormal")
# A code of bonexray's own (a private coding scheme, "99" + name: PS3.16 8.2).
SCHEME = "99BONEXRAY"
PROBABILITY = ("ABNPROB", "Probability of abnormality")
SERIES_NUMBER = 9901
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


class DicomExportError(BonexrayError, ValueError):
    """A study's SR cannot be written (its source files are gone, ...)."""


@dataclass(frozen=True)
class StudyForSR:
    """What the SR of one study is written from (read from SQL)."""

    study_id: int
    study_uid: str
    body_part: str | None
    score: float
    prediction: str  # "normal" / "abnormal", as stored
    views: tuple[tuple[str, float], ...]  # (source, prob) of the views the score came from


@dataclass
class ExportReport:
    written: list[str] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # study id -> reason
    not_dicom: int = 0  # studies without a StudyInstanceUID (image folders, unreadable files)
    unscored: int = 0  # DICOM studies without a score (failed or empty)


def _code(value: str, scheme: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def build_sr(study: StudyForSR, *, model_name: str, model_sha256: str,
             threshold: str | None, sources: Sequence[Any]) -> Any:
    """The Comprehensive 3D SR of one study from its views' headers (`sources`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    finding = ABNORMAL if study.prediction == "abnormal" else NORMAL
    # The same study, model and views always give the same UIDs: an SR sent again (a retry
    # after a lost response) replaces itself in the PACS instead of adding a second one.
    evidence_uids = sorted(str(ds.SOPInstanceUID) for ds in sources)
    seed = ["bonexray-sr", study.study_uid, study.body_part or "", model_sha256,
            *evidence_uids]

    def uid(role: str) -> str:
        return str(generate_uid(entropy_srcs=[*seed, role]))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["bonexray", model_sha256]), name="bonexray",
            manufacturer_name="bonexray", model_name=model_name[:64]))
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name[:64], version=model_sha256,
        parameters=[f"bonexray {__version__}", f"threshold {threshold or 'unknown'}"])
    sites = []
    if study.body_part in PART_SITES:
        value, meaning = PART_SITES[study.body_part]
        sites.append(hd.sr.FindingSite(anatomic_location=_code(value, "SCT", meaning)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid("tracking"), identifier="musculoskeletal radiograph abnormality"),
        algorithm_id=algorithm,
        finding_sites=sites or None,
        measurements=[hd.sr.Measurement(
            name=_code(PROBABILITY[0], SCHEME, PROBABILITY[1]), value=float(study.score),
            unit=_code("1", "UCUM", "no units"), algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=codes.DCM.Finding, value=_code(finding[0], "SCT", finding[1]))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in sources],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_code("363680008", "SCT", "Radiographic imaging procedure"),
        imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=list(sources), content=report[0], series_instance_uid=uid("series"),
        series_number=SERIES_NUMBER, sop_instance_uid=uid("instance"), instance_number=1,
        manufacturer="bonexray", is_complete=True, is_final=False, is_verified=False,
        series_description="bonexray abnormality (not verified)")


def read_sources(views: Sequence[tuple[str, float]]) -> list[Any]:
    """The views' headers, without pixel data; DicomExportError names the first that fails."""
    import pydicom

    out = []
    for source, _ in views:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
        except Exception as exc:  # a file gone or damaged since it was scored
            raise DicomExportError(f"cannot read view {Path(source).name} again: "
                                   f"{one_line(exc, limit=160)}") from None
        # Type 2 attributes of the patient and study modules the SR copies: present, even
        # if empty (an archive's objects do not always carry them).
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        out.append(ds)
    return out


def job_srs(*, session: Any, job_id: int, report: ExportReport,
            studies: set[int] | None = None) -> Iterator[tuple[int, str, Any]]:
    """(study id, study key, SR dataset) for every scored DICOM study of a job (those in
    `studies` when given); the studies left out or failing are counted in `report`."""
    from sqlalchemy import select

    from bonexray.db.tables import Job, Model, Study, View
    from bonexray.errors import JobNotFoundError

    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id} in the database")
    model = session.get(Model, job.model_id)
    threshold = (model.meta or {}).get("threshold")
    rows = session.execute(select(Study.id, Study.key, Study.study_uid, Study.body_part,
                                  Study.score, Study.prediction)
                           .where(Study.job_id == job_id).order_by(Study.id)).all()
    chosen = []
    for row in rows:
        if studies is not None and row.id not in studies:
            continue
        if row.study_uid is None:
            report.not_dicom += 1
        elif row.score is None or row.prediction is None:
            report.unscored += 1
        else:
            chosen.append(row)
    views: dict[int, list[tuple[str, float]]] = {}
    if chosen:
        for study_id, source, prob in session.execute(
                select(View.study_id, View.source, View.prob)
                .where(View.study_id.in_([s.id for s in chosen]), View.prob.is_not(None))
                .order_by(View.study_id, View.id)):
            views.setdefault(study_id, []).append((source, prob))
    for row in chosen:
        study = StudyForSR(study_id=row.id, study_uid=row.study_uid, body_part=row.body_part,
                           score=row.score, prediction=row.prediction,
                           views=tuple(views.get(row.id, ())))
        try:
            sources = read_sources(study.views)
            sr = build_sr(study, model_name=model.name, model_sha256=model.sha256,
                          threshold=None if threshold is None else str(threshold),
                          sources=sources)
        except DicomExportError as exc:
            report.failed[row.id] = str(exc)
            continue
        except Exception as exc:  # highdicom's checks on a messy header: this study only
            report.failed[row.id] = f"cannot build its SR ({safe_reason(exc)})"
            continue
        yield row.id, row.key, sr


def export_job(*, session: Any, job_id: int, out_dir: str | Path) -> ExportReport:
    """Write the SR of every scored DICOM study of a job under `out_dir`, as
    `<StudyInstanceUID>/<SR SOPInstanceUID>.dcm`."""
    report = ExportReport()
    out = Path(out_dir)
    for study_id, _, sr in job_srs(session=session, job_id=job_id, report=report):
        target = out / str(sr.StudyInstanceUID) / f"{sr.SOPInstanceUID}.dcm"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sr.save_as(target, enforce_file_format=True)
        except OSError as exc:  # the output folder
            report.failed[study_id] = f"cannot write its SR: {one_line(exc, limit=200)}"
            continue
        report.written.append(str(target))
    log.info("job %d: %d SR objects written, %d failed, %d studies not DICOM, %d unscored",
             job_id, len(report.written), len(report.failed), report.not_dicom,
             report.unscored)
    return report
