"""Results back to the PACS: each scored DICOM study's SR (bonexray.dicom_sr) sent by DICOM
C-STORE or by DICOMweb STOW-RS, so that it shows beside the images.

One `deliveries` row per (study key, model, destination): a study sent once is never sent
again for that model and destination (a later job over the same study skips it); a failed
send keeps its reason and attempt count, is shown by `status`, and is tried again by the
next delivery of the job (`bonexray send-results`, or the listener's next tick).
"""

from __future__ import annotations

import io
import logging
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from bonexray.errors import BonexrayError, InvalidValueError, one_line

log = logging.getLogger(__name__)

SENT, FAILED = "sent", "failed"
_DIMSE = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


class DeliveryError(BonexrayError, RuntimeError):
    """The destination cannot be reached at all."""


@dataclass(frozen=True)
class Destination:
    """Where SRs go: `AET@host:port` (C-STORE) or an `http(s)://` DICOMweb root (STOW-RS)."""

    text: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @property
    def is_stow(self) -> bool:
        return bool(self.url)


def parse_destination(text: str) -> Destination:
    text = text.strip()
    if text.startswith(("http://", "https://")):
        return Destination(text=text, url=text.rstrip("/"))
    match = _DIMSE.match(text)
    if not match or not 0 < int(match["port"]) < 65536:
        raise InvalidValueError(f"destination {text!r}: give AET@host:port (DICOM C-STORE) "
                                "or the http(s):// root of a DICOMweb server (STOW-RS)")
    return Destination(text=text, ae_title=match["aet"], host=match["host"],
                       port=int(match["port"]))


def _encoded(ds: Any) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def send_dimse(datasets: Sequence[Any], dest: Destination, calling_aet: str,
               timeout: float = 10) -> dict[str, str | None]:
    """C-STORE each dataset in one association: {SOPInstanceUID: None or the reason}."""
    from pynetdicom import AE

    from bonexray.listener import quiet_pynetdicom

    quiet_pynetdicom()
    ae = AE(ae_title=calling_aet)
    # A PACS that does not answer costs seconds, not the operating system's TCP timeout.
    ae.connection_timeout, ae.acse_timeout = timeout, timeout
    ae.dimse_timeout, ae.network_timeout = 2 * timeout, 2 * timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"{dest.text}: association refused or no answer")
    out: dict[str, str | None] = {}
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                out[uid] = "the association was aborted"
                continue
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted context; aborted
                out[uid] = f"C-STORE not possible: {one_line(exc, limit=160)}"
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            # 0x0000 success; 0xB000, 0xB007, 0xB006: stored with a warning.
            out[uid] = None if code in (0x0000, 0xB000, 0xB006, 0xB007) \
                else (f"C-STORE status 0x{code:04X}" if code >= 0 else "no C-STORE response")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def send_stow(datasets: Sequence[Any], dest: Destination,
              timeout: float = 60) -> dict[str, str | None]:
    """STOW-RS all datasets in one multipart request to `{url}/studies`."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for ds in datasets:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(_encoded(ds))
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        f"{dest.url}/studies", data=body.getvalue(), method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                 f"boundary={boundary}",
                 "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            code, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:  # 400/409 may still have stored some instances
        code, answer = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"{dest.text}: {one_line(exc, limit=160)}") from None
    stored = _stow_stored(answer)
    default = None if 200 <= code < 300 else f"STOW-RS HTTP {code}"
    if stored is None:  # no per-instance answer: the status says it for all
        return {str(ds.SOPInstanceUID): default for ds in datasets}
    return {str(ds.SOPInstanceUID): None if str(ds.SOPInstanceUID) in stored
            else (default or "STOW-RS: not among the stored instances") for ds in datasets}


def _stow_stored(body: bytes) -> set[str] | None:
    """The SOPInstanceUIDs a STOW-RS response lists as stored (ReferencedSOPSequence,
    0008,1199), or None when it lists none in a form we read."""
    import json

    try:
        answer = json.loads(body or b"null")
    except ValueError:
        return None
    if not isinstance(answer, dict) or "00081199" not in answer:
        return None
    items = (answer["00081199"] or {}).get("Value") or []
    return {str(((item.get("00081155") or {}).get("Value") or [""])[0]) for item in items}


@dataclass
class DeliveryReport:
    job: int
    sent: int = 0
    already: int = 0  # sent earlier for this study, model and destination
    failed: dict[int, str] = field(default_factory=dict)  # study id -> reason
    # Of those, the ones a retry cannot fix (their SR could not be built).
    permanent: set[int] = field(default_factory=set)
    not_dicom: int = 0
    unscored: int = 0


def deliver_job(*, engine: Engine, job_id: int, destination: Destination,
                calling_aet: str = "BONEXRAY") -> DeliveryReport:
    """Send the SR of every scored DICOM study of a job not yet sent to `destination` for
    this model; record each outcome. Raises DeliveryError when the destination cannot be
    reached at all (every study stays to be sent, its attempt recorded)."""
    from bonexray.db.session import session_scope
    from bonexray.db.tables import Delivery, Job, Study
    from bonexray.dicom_sr import ExportReport, job_srs
    from bonexray.errors import JobNotFoundError

    report = DeliveryReport(job=job_id)
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id} in the database")
        model_id = job.model_id
        keys = dict(session.execute(select(Study.id, Study.key)
                                    .where(Study.job_id == job_id)).all())
        sent_keys = set(session.scalars(
            select(Delivery.key).where(Delivery.model_id == model_id,
                                       Delivery.destination == destination.text,
                                       Delivery.status == SENT,
                                       Delivery.key.in_(list(keys.values()) or [""]))))
        todo = {sid for sid, key in keys.items() if key not in sent_keys}
        report.already = len(keys) - len(todo)
        built = ExportReport()
        srs = list(job_srs(session=session, job_id=job_id, report=built, studies=todo))
        report.not_dicom, report.unscored = built.not_dicom, built.unscored
        failed_build = dict(built.failed)
    outcomes: dict[int, tuple[str | None, str | None]] = {}  # study -> (sr uid, error)
    for study_id, reason in failed_build.items():
        outcomes[study_id] = (None, reason)
    unreachable: str | None = None
    if srs:
        try:
            datasets = [sr for _, _, sr in srs]
            sent = (send_stow(datasets, destination) if destination.is_stow
                    else send_dimse(datasets, destination, calling_aet))
        except DeliveryError as exc:
            unreachable = str(exc)
            sent = {str(sr.SOPInstanceUID): unreachable for _, _, sr in srs}
        for study_id, _, sr in srs:
            uid = str(sr.SOPInstanceUID)
            outcomes[study_id] = (uid, sent.get(uid, "no outcome"))
    _record(engine, job_id=job_id, model_id=model_id, destination=destination.text,
            keys=keys, outcomes=outcomes)
    for study_id, (_, error) in outcomes.items():
        if error is None:
            report.sent += 1
        else:
            report.failed[study_id] = error
    report.permanent = set(failed_build)
    log.info("job %d: %d SR sent, %d failed, %d sent before", job_id, report.sent,
             len(report.failed), report.already)
    if unreachable is not None:
        raise DeliveryError(unreachable)
    return report


def _record(engine: Engine, *, job_id: int, model_id: int, destination: str,
            keys: dict[int, str], outcomes: dict[int, tuple[str | None, str | None]]) -> None:
    from sqlalchemy.exc import IntegrityError

    from bonexray.db.session import session_scope

    if not outcomes:
        return
    try:
        with session_scope(engine) as session:
            _record_rows(session, job_id=job_id, model_id=model_id, destination=destination,
                         keys=keys, outcomes=outcomes)
    except IntegrityError:
        # Another process (send-results beside a listener) recorded the same study first:
        # its row stands; the SR UIDs are the same, so the PACS holds one SR.
        log.warning("job %d: another sender recorded these deliveries first", job_id)


def _record_rows(session: Any, *, job_id: int, model_id: int, destination: str,
                 keys: dict[int, str],
                 outcomes: dict[int, tuple[str | None, str | None]]) -> None:
    from bonexray.db.tables import Delivery, utcnow

    existing = {d.key: d for d in session.scalars(
        select(Delivery).where(Delivery.model_id == model_id,
                               Delivery.destination == destination,
                               Delivery.key.in_([keys[s] for s in outcomes])))}
    for study_id, (sr_uid, error) in outcomes.items():
        row = existing.get(keys[study_id])
        if row is None:
            row = Delivery(key=keys[study_id], model_id=model_id, destination=destination,
                           attempts=0)
            session.add(row)
        if row.status == SENT:
            continue
        row.job_id, row.study_id = job_id, study_id
        row.status = SENT if error is None else FAILED
        row.attempts = (row.attempts or 0) + 1
        row.sr_uid, row.error, row.updated_at = sr_uid, error, utcnow()


def delivery_counts(session: Any, job_id: int) -> dict[str, Any]:
    """{"sent": n, "failed": m, "last_error": text or None} for a job's deliveries."""
    from sqlalchemy import func

    from bonexray.db.tables import Delivery

    counts = dict(session.execute(select(Delivery.status, func.count())
                                  .where(Delivery.job_id == job_id)
                                  .group_by(Delivery.status)).all())
    last = session.scalar(select(Delivery.error).where(Delivery.job_id == job_id,
                                                       Delivery.status == FAILED)
                          .order_by(Delivery.updated_at.desc()).limit(1))
    return {"sent": int(counts.get(SENT, 0)), "failed": int(counts.get(FAILED, 0)),
            "last_error": last}
