"""The ledger of work: the database's identity, leases on studies (claim, heartbeat,
release), the view a careful decode is reading, and what the reaper may send again."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Engine,
    Table,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from bonexray.db.tables import DatabaseIdentity, Job, Study, View, utcnow
from bonexray.pipeline.records import FAILED, QUEUED, StudyTask

log = logging.getLogger(__name__)

_identities: dict[str, str] = {}
_identities_lock = threading.Lock()


class ForeignMessageError(ValueError):
    """A task message written for another database than this worker's."""


def database_id(engine: Engine) -> str:
    """The id made with this database's schema (read once per process and URL)."""
    key = engine.url.render_as_string(hide_password=False)
    with _identities_lock:
        found = _identities.get(key)
    if found is not None:
        return found
    with Session(engine) as session:
        found = session.scalar(select(DatabaseIdentity.id).limit(1))
    if found is None:  # the migration makes the row; only a hand-edited database lacks it
        raise ForeignMessageError("this database has no identity row (database_identity)")
    with _identities_lock:
        _identities[key] = found
    return found


def _async_commit(session: Session) -> None:
    """Commit this transaction without waiting for the WAL flush (PostgreSQL). For lease
    bookkeeping only: should the database crash and lose it, a study merely looks
    unclaimed and is claimed again; results are never written this way."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit = off"))


def crash_reason(crashes: int, view: str) -> str:
    return (f"worker process died {crashes} times while decoding {view} (killed, e.g. out "
            "of memory): not tried again")


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # The command name (field 2) may hold spaces and parentheses: split after it.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino:x}"
    except OSError:
        return "0"


def process_identity() -> str:
    """This process as a lease holder: host:pid:namespace.start. The namespace and start
    time tell a restarted process that got the same pid (or a container's process with the
    same hostname and pid) from this one."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_pid_namespace()}.{_process_start(pid) or 0}"


def _owner_is_dead(claimed_by: str) -> bool:
    """True when the lease holder ran on this host, in this pid namespace, and its process
    is gone (or the pid now belongs to another process): its studies are free at once."""
    host, _, rest = claimed_by.partition(":")
    pid, _, token = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    namespace, _, start = token.partition(".")
    if token and namespace != _pid_namespace():
        return False  # another container's process: its pids are not ours to check
    current = _process_start(int(pid))
    if current is None:
        return True
    return bool(start) and start != current


@dataclass(frozen=True)
class Claim:
    """What a worker holds after claiming a chunk's studies."""

    tasks: tuple[StudyTask, ...]  # claimed, by id: to classify
    # Claimed before and never finished: to decode one view at a time, those without a
    # crash against them first (a chunk-mate of a poisonous study finishes before it).
    suspects: tuple[int, ...]
    failed: int  # failed while claiming (claimed too often without finishing)
    skipped: int  # finished already, held by a live worker, or not of this job


def claim_studies(*, session: Session, job_id: int, study_ids: Sequence[int], worker: str,
                  lease_seconds: int, max_crashes: int, max_attempts: int,
                  now: datetime | None = None) -> Claim:
    """Lease the studies of `study_ids` that belong to the job, are unfinished, and that no
    live worker holds; read their views from SQL.

    A study is free when nobody holds it, its lease ran out, its holder's process on this
    host is gone, or `worker` holds it already (a retry after a database error: not counted
    again). A study whose previous holder died while decoding one of its views counts a
    crash against that view; at `max_crashes` the view fails and the study goes on without
    it. A study claimed `max_attempts` times fails.
    """
    now = now or utcnow()
    expired = now - timedelta(seconds=lease_seconds)
    _async_commit(session)
    rows = session.execute(
        select(Study.id, Study.claimed_by, Study.heartbeat_at, Study.attempts,
               Study.decoding, Study.crashes, Study.n_views, Study.key)
        .where(Study.id.in_(sorted(set(study_ids))), Study.job_id == job_id,
               Study.status == QUEUED)
        .order_by(Study.id)
        # Another worker claiming the same studies (a duplicate message) waits for this
        # claim and then finds them leased; skipping locked rows would drop them instead.
        .with_for_update()
    ).all()
    claimed: list[tuple[int, str, bool]] = []  # (id, path, suspect)
    crash_counts: dict[int, int] = {}
    crashed_views: dict[int, tuple[str, str]] = {}
    failed: dict[int, str] = {}
    updates: list[dict[str, Any]] = []
    candidates: dict[int, tuple[str, bool, int]] = {}  # id -> (path, suspect, crashes)
    for row in rows:
        mine = row.claimed_by == worker
        free = (row.claimed_by is None or mine or row.heartbeat_at is None
                or row.heartbeat_at < expired or _owner_is_dead(row.claimed_by))
        if not free:
            continue
        attempts = row.attempts + (0 if mine else 1)
        crashes, decoding = row.crashes, row.decoding
        if decoding is not None and not mine:
            crashes += 1
            if crashes >= max_crashes:
                crashed_views[row.id] = (decoding, crash_reason(crashes, decoding))
                crashes, decoding = 0, None
                log.error("study %d: a view killed its worker %d times; it fails, the rest "
                          "of the study goes on", row.id, row.crashes + 1)
        if attempts > max_attempts:
            failed[row.id] = (f"claimed {attempts - 1} times without finishing: every worker "
                              "holding it was lost")
            continue
        updates.append({"b_id": row.id, "b_old_by": row.claimed_by,
                        "b_old_beat": row.heartbeat_at, "b_attempts": attempts,
                        "b_crashes": crashes, "b_decoding": decoding})
        candidates[row.id] = (row.key, attempts > 1, crashes)
    won: set[int] = set()
    table = cast(Table, Study.__table__)  # Core statements, not ORM bulk updates
    # Each update is conditional on what was read: SQLite takes no row locks, and a second
    # claimer that read the same rows first must find them changed.
    fresh = [u["b_id"] for u in updates if u["b_old_by"] is None and u["b_old_beat"] is None
             and u["b_decoding"] is None]
    if fresh:  # the usual case, one statement: studies nobody has held yet
        won.update(session.scalars(
            update(table)
            .where(table.c.id.in_(fresh), table.c.status == QUEUED,
                   table.c.claimed_by.is_(None), table.c.heartbeat_at.is_(None))
            .values(claimed_by=worker, heartbeat_at=now, attempts=table.c.attempts + 1)
            .returning(table.c.id)))
    fresh_ids = set(fresh)
    again = [u for u in updates if u["b_id"] not in fresh_ids]
    if again:  # taken over from a lost worker, or retried by this one
        session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"), table.c.status == QUEUED,
                   table.c.claimed_by.is_not_distinct_from(bindparam("b_old_by")),
                   table.c.heartbeat_at.is_not_distinct_from(bindparam("b_old_beat")))
            .values(claimed_by=worker, heartbeat_at=now, attempts=bindparam("b_attempts"),
                    crashes=bindparam("b_crashes"), decoding=bindparam("b_decoding")),
            again)
        won.update(session.scalars(select(Study.id).where(
            Study.id.in_(sorted(u["b_id"] for u in again)), Study.claimed_by == worker,
            Study.heartbeat_at == now)))
    for study_id in sorted(won):
        path, suspect, crashes = candidates[study_id]
        claimed.append((study_id, path, suspect))
        crash_counts[study_id] = crashes
    for study_id in set(crashed_views) - won:
        del crashed_views[study_id]
    for study_id, error in failed.items():
        session.execute(
            update(Study).where(Study.id == study_id, Study.status == QUEUED)
            .values(status=FAILED, error=error, worker=worker, finished_at=now,
                    claimed_by=None, heartbeat_at=None, decoding=None))
    for study_id, (view, reason) in crashed_views.items():
        session.execute(update(View).where(View.study_id == study_id, View.source == view)
                        .values(prob=None, error=reason))
    tasks = _tasks_from_views(session, claimed)
    # A study queued by a bonexray older than the ledger has views but no view rows.
    n_views = {row.id: row.n_views for row in rows}
    orphans = [t.id for t in tasks if not t.views and not t.failed and n_views[t.id]]
    if orphans:
        session.execute(
            update(Study).where(Study.id.in_(orphans), Study.status == QUEUED)
            .values(status=FAILED, worker=worker, finished_at=now, claimed_by=None,
                    heartbeat_at=None, error="queued by an older bonexray: its views are not "
                    "in the database; enqueue the folder again"))
        failed.update(dict.fromkeys(orphans, "orphan"))
        gone = set(orphans)
        tasks = tuple(t for t in tasks if t.id not in gone)
        claimed = [c for c in claimed if c[0] not in gone]
    suspects = sorted((sid for sid, _, suspect in claimed if suspect),
                      key=lambda sid: (crash_counts[sid], sid))
    return Claim(tasks=tasks, suspects=tuple(suspects),
                 failed=len(failed), skipped=len(set(study_ids)) - len(claimed) - len(failed))


def _tasks_from_views(session: Session,
                      claimed: list[tuple[int, str, bool]]) -> tuple[StudyTask, ...]:
    if not claimed:
        return ()
    pending: dict[int, list[str]] = {}
    failed: dict[int, list[tuple[str, str]]] = {}
    for study_id, path, error in session.execute(
        select(View.study_id, View.source, View.error)
        .where(View.study_id.in_([sid for sid, _, _ in claimed]))
        .order_by(View.study_id, View.id)
    ):
        if error is None:
            pending.setdefault(study_id, []).append(path)
        else:
            failed.setdefault(study_id, []).append((path, error))
    return tuple(StudyTask(id=sid, key=key, views=tuple(pending.get(sid, ())),
                           failed=tuple(failed.get(sid, ())))
                 for sid, key, _ in claimed)


def heartbeat(*, session: Session, study_ids: Sequence[int], worker: str) -> int:
    """Renew `worker`'s leases on the unfinished studies among `study_ids`."""
    _async_commit(session)
    result = session.execute(
        update(Study)
        .where(Study.id.in_(sorted(study_ids)), Study.claimed_by == worker,
               Study.status == QUEUED)
        .values(heartbeat_at=utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def release(*, session: Session, study_ids: Sequence[int], worker: str) -> None:
    """Give up `worker`'s leases (a sick worker): the claim does not count as an attempt."""
    if not study_ids:
        return
    session.execute(
        update(Study)
        .where(Study.id.in_(sorted(study_ids)), Study.claimed_by == worker,
               Study.status == QUEUED)
        .values(claimed_by=None, heartbeat_at=None, decoding=None,
                attempts=Study.attempts - 1)
    )


def mark_decoding(*, session: Session, study_id: int, worker: str, view: str | None) -> None:
    """Record the view a careful decode is about to read (None: done decoding)."""
    _async_commit(session)
    session.execute(
        update(Study).where(Study.id == study_id, Study.claimed_by == worker)
        .values(decoding=view, heartbeat_at=utcnow())
    )


def unfinished_unleased(*, session: Session, lease_seconds: int, sent_before: datetime | None,
                        job_id: int | None = None, queue: str | None = None,
                        after_id: int = 0, limit: int = 10_000,
                        now: datetime | None = None) -> list[tuple[int, int]]:
    """(job id, study id), by study id from `after_id` on, of unfinished studies of broker
    jobs (of `queue`, or of `job_id`) that no live lease holds and whose last message (if
    any) is older than `sent_before`. Takes no locks: see lock_unleased."""
    now = now or utcnow()
    conditions = [*_unleased(now, lease_seconds, sent_before), Job.mode == "celery",
                  Study.id > after_id]
    if job_id is not None:
        conditions.append(Study.job_id == job_id)
    if queue is not None:
        conditions.append(Job.queue == queue)
    rows = session.execute(
        select(Study.job_id, Study.id)
        .join(Job, Job.id == Study.job_id)
        .where(*conditions)
        .order_by(Study.id)
        .limit(limit)
    ).all()
    return [(row.job_id, row.id) for row in rows]


def _unleased(now: datetime, lease_seconds: int,
              sent_before: datetime | None) -> list[ColumnElement[bool]]:
    expired = now - timedelta(seconds=lease_seconds)
    conditions = [Study.status == QUEUED,
                  or_(Study.heartbeat_at.is_(None), Study.heartbeat_at < expired)]
    if sent_before is not None:
        conditions.append(or_(Study.sent_at.is_(None), Study.sent_at < sent_before))
    return conditions


def lock_unleased(*, session: Session, study_ids: Sequence[int], lease_seconds: int,
                  sent_before: datetime | None, now: datetime | None = None) -> list[int]:
    """Those of `study_ids` still unfinished, unleased and not sent since `sent_before`,
    locked for this transaction; rows another reaper or a claim holds are skipped."""
    if not study_ids:
        return []
    now = now or utcnow()
    return list(session.scalars(
        select(Study.id)
        .where(Study.id.in_(sorted(study_ids)), *_unleased(now, lease_seconds, sent_before))
        .order_by(Study.id)
        .with_for_update(skip_locked=True)
    ))


def any_live_lease(*, session: Session, lease_seconds: int, now: datetime | None = None
                   ) -> bool:
    """True when some worker holds a live lease on any study of this database."""
    expired = (now or utcnow()) - timedelta(seconds=lease_seconds)
    return session.scalar(
        select(Study.id).where(Study.status == QUEUED, Study.heartbeat_at >= expired).limit(1)
    ) is not None


def mark_sent(*, session: Session, study_ids: Sequence[int], now: datetime | None = None) -> None:
    if study_ids:
        session.execute(update(Study).where(Study.id.in_(sorted(study_ids)))
                        .values(sent_at=now or utcnow()))


def count_leased(*, session: Session, job_id: int, lease_seconds: int,
                 now: datetime | None = None) -> int:
    """The job's unfinished studies that a live lease holds (in flight)."""
    expired = (now or utcnow()) - timedelta(seconds=lease_seconds)
    return int(session.scalar(
        select(func.count()).select_from(Study)
        .where(Study.job_id == job_id, Study.status == QUEUED, Study.heartbeat_at >= expired)
    ) or 0)
