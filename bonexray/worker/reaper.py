"""The reaper: every worker, now and then, sends again what is unfinished, held by no live
lease and waiting in no queue. No leader: rows are taken with FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from bonexray.db import ledger
from bonexray.db.session import session_scope
from bonexray.db.tables import Job, utcnow
from bonexray.errors import one_line
from bonexray.settings import Settings

log = logging.getLogger(__name__)

# kombu's Redis transport keeps priority levels in keys of their own beside the queue's.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def message_study_ids(raw: bytes | str) -> list[int]:
    """Study ids in one kombu Redis message of ours ([] for anything else)."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [int(i) for i in args[0]["studies"]]
    except (ValueError, KeyError, IndexError, TypeError):
        return []


def waiting_study_ids(app: Celery, queue: str) -> set[int] | None:
    """Ids of the studies whose messages wait in the broker's queue; None when the broker
    cannot be read that way (not Redis)."""
    with app.connection_for_read() as conn:
        if not str(conn.transport_cls).startswith("redis"):
            return None
        client = conn.default_channel.client
        keys = [queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)]
        waiting: set[int] = set()
        for key in keys:
            for raw in client.lrange(key, 0, -1):
                waiting.update(message_study_ids(raw))
        return waiting


@dataclass(frozen=True)
class Resent:
    studies: int  # sent again
    chunks: int
    waiting: int  # unfinished, unleased, but their message still waits in the queue
    next_after: int = 0  # where the next pass goes on scanning (0: from the start)


def chunks_by_job(rows: Iterable[tuple[int, int]], size: int) -> list[tuple[int, list[int]]]:
    by_job: dict[int, list[int]] = {}
    for job_id, study_id in rows:
        by_job.setdefault(job_id, []).append(study_id)
    out = []
    for job_id, ids in sorted(by_job.items()):
        for start in range(0, len(ids), max(1, size)):
            out.append((job_id, ids[start : start + size]))
    return out


def resend_unfinished(*, engine: Engine, app: Celery, settings: Settings,
                      job_id: int | None = None, queue: str | None = None,
                      grace_seconds: float | None = None, after_id: int = 0,
                      limit: int = 10_000) -> Resent:
    """Send again the unfinished studies of broker jobs of `queue` (default: the settings'
    queue; or of one job, `job_id`, to its own queue) that no live lease holds, whose
    message is not waiting in the queue, and that were last sent more than
    `grace_seconds` ago (default: a lease; a message just sent may be on its way).

    At most `limit` candidates are looked at, by study id after `after_id`; the result's
    next_after says where a next pass goes on (a backlog is covered in slices). Only the
    rows found lost are locked, briefly (SKIP LOCKED: never a row another reaper or a
    claim holds); messages are published after that transaction commits.
    """
    from bonexray.jobs import send_chunks

    grace = settings.lease_seconds if grace_seconds is None else grace_seconds
    now = utcnow()
    sent_before = now - timedelta(seconds=grace)
    with session_scope(engine) as session:
        if job_id is not None:
            job = session.get(Job, job_id)
            queue = job.queue if job is not None else None
        queue = queue or settings.queue
        rows = ledger.unfinished_unleased(
            session=session, lease_seconds=settings.lease_seconds, sent_before=sent_before,
            job_id=job_id, queue=None if job_id is not None else queue, after_id=after_id,
            limit=limit)
    if not rows:
        return Resent(0, 0, 0)
    next_after = rows[-1][1] if len(rows) == limit else 0
    waiting = waiting_study_ids(app, queue)
    if waiting is None:  # cannot see the queue: only what waited past the visibility timeout
        sent_before = now - timedelta(seconds=max(grace, settings.visibility_timeout))
        waiting = set()
    candidates = [(j, s) for j, s in rows if s not in waiting]
    with session_scope(engine) as session:
        locked = set(ledger.lock_unleased(
            session=session, study_ids=[s for _, s in candidates],
            lease_seconds=settings.lease_seconds, sent_before=sent_before))
        lost = [(j, s) for j, s in candidates if s in locked]
        ledger.mark_sent(session=session, study_ids=[s for _, s in lost], now=now)
    # Published after the commit: a worker claiming these studies must not find them still
    # locked by this pass. Should publishing fail, they are marked sent and the next pass
    # after a lease takes them again.
    chunks = chunks_by_job(lost, settings.chunk_size)
    if chunks:
        send_chunks(app=app, settings=settings.replace(queue=queue),
                    database=ledger.database_id(engine), chunks=chunks)
        log.warning("reaper: sent again %d unfinished studies of %d job(s) in %d chunks "
                    "(no live lease, no waiting message)", len(lost),
                    len({j for j, _ in lost}), len(chunks))
    return Resent(studies=len(lost), chunks=len(chunks), waiting=len(rows) - len(candidates),
                  next_after=next_after)


class Reaper:
    """A thread of a worker's main process that runs resend_unfinished every
    reaper_interval seconds (jittered) for the queue the worker consumes, going through a
    backlog in slices; errors are logged and tried again next time."""

    def __init__(self, *, app: Celery, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self.after_id = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        from bonexray.db.session import open_database

        interval = max(1, self.settings.reaper_interval)
        while not self.stopped.wait(interval * random.uniform(0.75, 1.25)):
            try:
                done = resend_unfinished(engine=open_database(self.settings.database_url),
                                         app=self.app, settings=self.settings,
                                         after_id=self.after_id)
                self.after_id = done.next_after
            except Exception as exc:  # the database or broker away: the next pass retries
                log.warning("reaper pass failed: %s", one_line(exc, limit=200))


_reaper: Reaper | None = None


def start_reaper(app: Celery, settings: Settings) -> None:
    global _reaper
    if _reaper is None and settings.reaper_interval > 0:
        _reaper = Reaper(app=app, settings=settings)
        _reaper.start()
        log.info("reaper started: every ~%d s, leases of %d s", settings.reaper_interval,
                 settings.lease_seconds)


def stop_reaper(**_: Any) -> None:
    global _reaper
    if _reaper is not None:
        _reaper.stop()
        _reaper = None
