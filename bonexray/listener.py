"""`bonexray listen`: a DICOM C-STORE SCP that spools what a PACS sends and classifies each
study once it is complete.

- Accepts CR and DX For Presentation in the transfer syntaxes bonexray decodes (and
  C-ECHO); every other SOP class is refused at association, so results (SR) and other
  objects never come in. With an allow list, associations from other calling AE titles are
  refused.
- Each instance is written to `SPOOL/<StudyInstanceUID>/<SOPInstanceUID>.dcm` (files 0600,
  folders 0700), durably (written, fsynced, renamed) before the C-STORE is acknowledged:
  the spool is the record.
- A study is complete when no instance came for `stable_seconds`; then a job is registered
  for its folder through `enqueue`'s code path (or classified here with `embedded`), and a
  marker (`.enqueued`) records what it covered. A later instance re-opens the study: it is
  classified again, whole.
- Restarting loses nothing acknowledged: on start, every spooled study without a marker
  that covers its files is pending again.
- No PHI in the logs: pynetdicom's identifier logging is off, and bonexray logs job ids and
  counts only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonexray.errors import BonexrayError, one_line

log = logging.getLogger(__name__)

MARKER = ".enqueued"
# A folder `pull` is still filling: the listener leaves it alone (until it is this old).
PULLING = ".pulling"
PULLING_STALE_SECONDS = 3600.0
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Transfer syntaxes accepted (those bonexray decodes; see bonexray.dicom).
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, process 14, SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
# C-STORE statuses (PS3.4 Annex B.2.3).
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


class ListenError(BonexrayError, RuntimeError):
    """The listener cannot start (port taken, spool unusable, ...)."""


def _safe_name(uid: str) -> str:
    """A UID as a file name: as it is when it is a well-formed UID, else a hash of it."""
    uid = uid.strip().rstrip("\0")
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    import hashlib

    return "x" + hashlib.sha256(uid.encode(errors="replace")).hexdigest()[:40]


@dataclass(frozen=True)
class Pending:
    folder: Path
    instances: int
    newest_ns: int
    reopened: bool  # enqueued before, with fewer or older instances


class Spool:
    """The listener's record: one folder per study, one file per instance."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise ListenError(f"spool {self.root} unusable: {one_line(exc)}") from None

    def clean(self, older_than: float = 3600.0) -> int:
        """Remove the partial files of writes that never finished (a killed listener or
        pull), once they are `older_than` seconds old; returns how many."""
        removed = 0
        cutoff = time.time() - older_than
        for part in self.root.glob("*/.*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
        return removed

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably; returns its path (an existing one is replaced)."""
        folder = self.root / _safe_name(study_uid)
        folder.mkdir(mode=0o700, exist_ok=True)
        final = folder / f"{_safe_name(sop_uid)}.dcm"
        tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        return final

    def studies(self) -> Iterator[Path]:
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                yield folder

    @staticmethod
    def instances(folder: Path) -> list[Path]:
        return [p for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith(".")]

    @staticmethod
    def marker(folder: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def pending(self, *, stable_seconds: float, now: float | None = None) -> list[Pending]:
        """Studies complete (nothing new for `stable_seconds`) and not yet enqueued as they
        are now."""
        now = time.time() if now is None else now
        out = []
        for folder in self.studies():
            with contextlib.suppress(OSError):
                if now - (folder / PULLING).stat().st_mtime < PULLING_STALE_SECONDS:
                    continue
            files = self.instances(folder)
            if not files:
                continue
            newest = max(p.stat().st_mtime_ns for p in files)
            mark = self.marker(folder)
            if mark is not None and mark.get("newest_ns", -1) >= newest \
                    and mark.get("instances") == len(files):
                continue
            if now - newest / 1e9 < stable_seconds:
                continue
            out.append(Pending(folder=folder, instances=len(files), newest_ns=newest,
                               reopened=mark is not None))
        return out

    def mark(self, pending: Pending, *, job: int | None, note: str | None = None) -> None:
        """Record that `pending` (as it was) is enqueued: atomically, durably."""
        record = {"job": job, "instances": pending.instances, "newest_ns": pending.newest_ns,
                  "at": time.time(), "note": note}
        tmp = pending.folder / f".{MARKER}.{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, pending.folder / MARKER)
        _fsync_dir(pending.folder)


    def undelivered(self) -> list[tuple[Path, int]]:
        """(folder, job) of the studies whose latest job's results are not all sent."""
        out = []
        for folder in self.studies():
            mark = self.marker(folder)
            if mark and isinstance(mark.get("job"), int) and not mark.get("delivered"):
                out.append((folder, int(mark["job"])))
        return out

    def mark_delivered(self, folder: Path) -> None:
        mark = self.marker(folder) or {}
        mark["delivered"] = True
        tmp = folder / f".{MARKER}.{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(mark, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / MARKER)
        _fsync_dir(folder)

    @contextlib.contextmanager
    def filling(self, study_uid: str) -> Iterator[Path]:
        """While a study's folder is being filled (by `pull`), the listener skips it."""
        folder = self.root / _safe_name(study_uid)
        folder.mkdir(mode=0o700, exist_ok=True)
        flag = folder / PULLING
        flag.touch(mode=0o600)
        try:
            yield folder
        finally:
            flag.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quiet_pynetdicom() -> None:
    """pynetdicom logs identifiers (and, at DEBUG, whole datasets): off."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def store_handler(spool: Spool, received: Callable[[], None]) -> Callable[[Any], int]:
    """The C-STORE handler: the instance is spooled durably before the status is sent."""

    def handle(event: Any) -> int:
        try:
            study_uid = str(event.dataset.StudyInstanceUID)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
        except Exception as exc:  # an undecodable or incomplete dataset
            log.warning("refused an instance: %s", one_line(exc, limit=120))
            return CANNOT_UNDERSTAND
        try:
            spool.store(study_uid, sop_uid, event.encoded_dataset(include_meta=True))
        except OSError as exc:
            log.error("cannot spool an instance: %s", one_line(exc, limit=160))
            return OUT_OF_RESOURCES
        received()
        return SUCCESS

    return handle


def _submit_pending(spool: Spool, submit: Callable[[Pending], int | None],
                    stable_seconds: float, stop: threading.Event,
                    stats: ListenerStats) -> None:
    for pending in spool.pending(stable_seconds=stable_seconds):
        if stop.is_set():
            return
        try:
            job = submit(pending)
        except Exception as exc:  # database or broker away: try again next tick
            stats.errors += 1
            log.warning("a complete study waits in the spool: %s", one_line(exc, limit=200))
            return
        spool.mark(pending, job=job)
        stats.jobs += job is not None


def _deliver_finished(spool: Spool, deliver: Callable[[int], bool | None],
                      stop: threading.Event, stats: ListenerStats,
                      retry_at: dict[int, tuple[float, float]]) -> None:
    """Send the results of the spool's finished jobs; a job whose send failed waits twice
    as long each time (1 s to 5 min); an unreachable destination ends the pass.

    `deliver(job)`: True once nothing is left to send, False to try again later, None when
    the destination could not be reached at all."""
    now = time.monotonic()
    try:
        undelivered = spool.undelivered()
    except OSError as exc:
        log.error("spool: %s", one_line(exc, limit=200))
        return
    for folder, job in undelivered:
        if stop.is_set():
            return
        when, delay = retry_at.get(job, (0.0, 0.5))
        if when > now:
            continue
        try:
            done = deliver(job)
        except Exception as exc:  # database away: next tick
            stats.errors += 1
            log.warning("results of job %d not sent yet: %s", job, one_line(exc, limit=200))
            return
        if done:
            retry_at.pop(job, None)
            with contextlib.suppress(OSError):
                spool.mark_delivered(folder)
            continue
        delay = min(delay * 2, 300.0)
        retry_at[job] = (now + delay, delay)
        if done is None:  # the destination is away: the other jobs would fail alike
            return


@dataclass
class ListenerStats:
    received: int = 0
    jobs: int = 0
    errors: int = 0


def make_ae(ae_title: str, allow: tuple[str, ...]) -> Any:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from bonexray.dicom import RADIOGRAPHS

    ae = AE(ae_title=ae_title)
    for sop_class in RADIOGRAPHS:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    if allow:
        ae.require_calling_aet = list(allow)
    ae.maximum_pdu_size = 0  # no limit
    return ae


def serve(*, spool: Spool, submit: Callable[[Pending], int | None], ae_title: str,
          host: str, port: int, allow: tuple[str, ...], stable_seconds: float,
          stop: threading.Event, tick: float = 1.0,
          on_ready: Callable[[], None] | None = None,
          deliver: Callable[[int], bool | None] | None = None) -> ListenerStats:
    """Run the SCP until `stop` is set; every `tick` seconds submit the complete studies,
    and (with `deliver`) send the results of the spool's finished jobs.

    `submit` registers (and sends, or runs) a job for a pending study and returns its id;
    it raises to say "not now" (database or broker away): the study stays pending.
    `deliver(job)` sends a job's results (see _deliver_finished); the marker records a
    job whose results all went, so a restart sends what was not sent yet."""
    from pynetdicom import evt

    quiet_pynetdicom()
    stats = ListenerStats()
    lock = threading.Lock()

    def received() -> None:
        with lock:
            stats.received += 1

    spool.clean()
    ae = make_ae(ae_title, allow)
    handlers = [(evt.EVT_C_STORE, store_handler(spool, received)),
                (evt.EVT_C_ECHO, lambda event: SUCCESS)]
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {one_line(exc)}") from None
    log.info("listening as %s on %s:%d (%s), spool %s", ae_title, host, port,
             f"{len(allow)} allowed calling AE titles" if allow else "any calling AE title",
             spool.root)
    if on_ready is not None:
        on_ready()
    retry_at: dict[int, tuple[float, float]] = {}  # job -> (next try, delay): backoff
    try:
        while not stop.is_set():
            try:
                _submit_pending(spool, submit, stable_seconds, stop, stats)
            except OSError as exc:  # the spool's disk: full, or a folder removed
                stats.errors += 1
                log.error("spool: %s", one_line(exc, limit=200))
            if deliver is not None:
                _deliver_finished(spool, deliver, stop, stats, retry_at)
            stop.wait(tick)
    finally:
        server.shutdown()
    return stats
