"""The ledger: claims, heartbeats, crash counting, names that cannot be stored, what the
reaper may send again, and the state `status` reports. SQLite and Postgres alike."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bonexray.db import ledger, query, store
from bonexray.db.tables import BatchStat as BatchStatRow
from bonexray.db.tables import Job, Model, Study, View, utcnow
from bonexray.pipeline.records import BatchStat
from bonexray.studies import Study as FoundStudy
from tests.db.conftest import make_studies

LEASE = 30


def _job(session: Session, model: Model, n: int, mode: str = "celery", **kwargs: Any) -> Job:
    job = store.create_job(session=session, root="/archive", model_id=model.id,
                           studies=make_studies(n, **kwargs), mode=mode, options={},
                           sent=mode == "celery")
    session.flush()
    return job


def _ids(session: Session, job: Job) -> list[int]:
    return [sid for sid, _ in store.queued_studies(session=session, job_id=job.id)]


def _claim(session: Session, job: Job, ids: list[int], worker: str, **kwargs: Any
           ) -> ledger.Claim:
    args: dict[str, Any] = {"lease_seconds": LEASE, "max_crashes": 3, "max_attempts": 8}
    args.update(kwargs)
    return ledger.claim_studies(session=session, job_id=job.id, study_ids=ids, worker=worker,
                                **args)


def _study(session: Session, study_id: int) -> Study:
    study = session.get(Study, study_id)
    assert study is not None
    session.refresh(study)
    return study


def test_claim_reads_views_from_sql_and_excludes_live_leases(session: Session,
                                                             model: Model) -> None:
    job = _job(session, model, 3)
    other = _job(session, model, 1)
    ids = _ids(session, job)
    first = _claim(session, job, ids[:2] + _ids(session, other), "host-a:1")
    assert [t.id for t in first.tasks] == ids[:2]  # the other job's study is not taken
    assert first.tasks[0].views == (f"{first.tasks[0].key}/image1.png",
                                    f"{first.tasks[0].key}/image2.png")
    assert first.skipped == 1 and first.suspects == ()
    # A second worker with the same (duplicate) message gets only what nobody holds.
    second = _claim(session, job, ids, "host-b:2")
    assert [t.id for t in second.tasks] == ids[2:] and second.skipped == 2
    # The holder itself, retrying after a database error, keeps its claim, uncounted.
    again = _claim(session, job, ids[:2], "host-a:1")
    assert [t.id for t in again.tasks] == ids[:2] and again.suspects == ()
    assert _study(session, ids[0]).attempts == 1


def test_expired_lease_or_dead_local_holder_frees_the_study(session: Session,
                                                            model: Model) -> None:
    job = _job(session, model, 2)
    ids = _ids(session, job)
    past = utcnow() - timedelta(seconds=LEASE + 5)
    _claim(session, job, ids[:1], "host-a:1", now=past)  # its heartbeat is old now
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid of this host that no longer runs
    _claim(session, job, ids[1:], f"{socket.gethostname()}:{dead}")
    taken = _claim(session, job, ids, "host-b:2")
    assert [t.id for t in taken.tasks] == ids
    assert taken.suspects == tuple(ids)  # their first holders were lost: decode carefully
    assert [_study(session, i).attempts for i in ids] == [2, 2]
    # A live local holder keeps its lease.
    live = _job(session, model, 1)
    (live_id,) = _ids(session, live)
    _claim(session, live, [live_id], f"{socket.gethostname()}:{os.getpid()}")
    assert _claim(session, live, [live_id], "host-b:2").tasks == ()


def test_view_that_killed_its_worker_fails_after_max_crashes(session: Session,
                                                             model: Model) -> None:
    job = _job(session, model, 1)
    (sid,) = _ids(session, job)
    bad = f"{_study(session, sid).key}/image2.png"
    start = utcnow()
    for crash in range(1, 4):  # each holder's lease runs out before the next claim
        claim = _claim(session, job, [sid], f"host:{1000 + crash}",
                       now=start + timedelta(seconds=crash * 2 * LEASE))
        (task,) = claim.tasks
        ledger.mark_decoding(session=session, study_id=sid, worker=f"host:{1000 + crash}",
                             view=bad)
        # ...and the process dies here, the lease runs out.
        assert bad in task.views
    claim = _claim(session, job, [sid], "host:2000", now=start + timedelta(seconds=8 * LEASE))
    (task,) = claim.tasks
    assert bad not in task.views and len(task.views) == 1
    ((path, reason),) = task.failed
    assert path == bad and "died 3 times while decoding" in reason and bad in reason
    view = session.execute(select(View.prob, View.error).where(View.source == bad)).one()
    assert view.prob is None and view.error == reason
    assert _study(session, sid).decoding is None


def test_study_claimed_too_often_fails(session: Session, model: Model) -> None:
    job = _job(session, model, 1)
    (sid,) = _ids(session, job)
    start = utcnow() - timedelta(seconds=10 * LEASE)
    for k in range(3):
        claim = _claim(session, job, [sid], f"host:{k}", max_attempts=3,
                       now=start + timedelta(seconds=k * 2 * LEASE))
        assert len(claim.tasks) == 1
    claim = _claim(session, job, [sid], "host:9", max_attempts=3)
    assert claim.tasks == () and claim.failed == 1
    study = _study(session, sid)
    assert study.status == "failed" and "claimed 3 times without finishing" in study.error


def test_release_and_heartbeat(session: Session, model: Model) -> None:
    job = _job(session, model, 2)
    ids = _ids(session, job)
    old = utcnow() - timedelta(seconds=LEASE - 1)
    _claim(session, job, ids, "host:1", now=old)
    assert ledger.heartbeat(session=session, study_ids=ids, worker="host:2") == 0
    assert ledger.heartbeat(session=session, study_ids=ids, worker="host:1") == 2
    assert ledger.count_leased(session=session, job_id=job.id, lease_seconds=LEASE) == 2
    ledger.release(session=session, study_ids=ids[:1], worker="host:1")
    study = _study(session, ids[0])
    assert (study.claimed_by, study.attempts) == (None, 0)
    assert ledger.count_leased(session=session, job_id=job.id, lease_seconds=LEASE) == 1


def test_unfinished_unleased_is_what_the_reaper_may_send(session: Session,
                                                         model: Model) -> None:
    job = _job(session, model, 4, empty=(3,))
    embedded = _job(session, model, 1, mode="embedded")
    ids = _ids(session, job)
    later = utcnow() + timedelta(seconds=1)
    _claim(session, job, ids[:1], "host:1")  # leased: not the reaper's
    rows = ledger.unfinished_unleased(session=session, lease_seconds=LEASE, sent_before=later)
    assert [s for j, s in rows if j == job.id] == ids[1:]
    assert all(j != embedded.id for j, _ in rows)  # an embedded run has no broker
    # Just sent: not yet (the message may be on its way).
    assert ledger.unfinished_unleased(session=session, lease_seconds=LEASE,
                                      sent_before=utcnow() - timedelta(seconds=5),
                                      job_id=job.id) == []
    ledger.mark_sent(session=session, study_ids=ids[1:2], now=later)
    rows = ledger.unfinished_unleased(session=session, lease_seconds=LEASE, sent_before=later,
                                      job_id=job.id)
    assert [s for _, s in rows] == ids[2:]


def test_names_that_are_not_utf8_fail_their_own_view_or_study(session: Session,
                                                              model: Model) -> None:
    bad_file = "/a/XR_HAND/p1/s1/caf\udce9.png"  # os.listdir's view of Latin-1 bytes
    bad_folder = "/a/XR_HAND/p2/\udcff"
    studies = [FoundStudy(key="/a/XR_HAND/p1/s1", views=("/a/XR_HAND/p1/s1/ok.png", bad_file)),
               FoundStudy(key=bad_folder, views=(f"{bad_folder}/1.png",)),
               FoundStudy(key="/a/XR_HAND/p3/s1", views=("/a/XR_HAND/p3/s1/\udce9.png",))]
    job = store.create_job(session=session, root="/a", model_id=model.id, studies=studies,
                           mode="celery", options={})
    session.flush()
    rows = {r["study"]: r for r in query.job_results(session=session, job_id=job.id)}
    first = rows["/a/XR_HAND/p1/s1"]
    assert first["status"] == "queued"
    assert {v["source"]: v["error"] for v in first["views"]} == {
        "/a/XR_HAND/p1/s1/ok.png": None, "/a/XR_HAND/p1/s1/caf\\xe9.png": store.NOT_UTF8_FILE}
    assert rows["/a/XR_HAND/p2/\\xff"]["status"] == "failed"
    assert rows["/a/XR_HAND/p2/\\xff"]["error"] == store.NOT_UTF8_FOLDER
    assert rows["/a/XR_HAND/p3/s1"]["status"] == "failed"
    assert "not valid UTF-8" in rows["/a/XR_HAND/p3/s1"]["error"]
    claim = _claim(session, job, _ids(session, job), "host:1")
    (task,) = claim.tasks
    assert task.views == ("/a/XR_HAND/p1/s1/ok.png",)
    assert task.failed == (("/a/XR_HAND/p1/s1/caf\\xe9.png", store.NOT_UTF8_FILE),)


def test_progress_counts_in_flight_and_calls_a_silent_job_stalled(session: Session,
                                                                  model: Model) -> None:
    job = _job(session, model, 3)
    ids = _ids(session, job)
    _claim(session, job, ids[:1], "host:1")
    p = query.job_progress(session=session, job_id=job.id, lease_seconds=LEASE,
                           stall_seconds=60)
    assert (p["state"], p["queued"], p["in_flight"]) == ("running", 3, 1)
    later = utcnow() + timedelta(seconds=LEASE + 61)
    p = query.job_progress(session=session, job_id=job.id, lease_seconds=LEASE,
                           stall_seconds=60, now=later)
    assert (p["state"], p["in_flight"]) == ("stalled", 0)
    store.mark_failed(session=session, study_ids=ids, error="x", worker="w")
    p = query.job_progress(session=session, job_id=job.id, lease_seconds=LEASE,
                           stall_seconds=60, now=later)
    assert p["state"] == "finished"


def test_batch_stats_of_a_redelivered_chunk_replace_its_rows(session: Session,
                                                            model: Model) -> None:
    job = _job(session, model, 1)
    for infer_ms in (20.0, 30.0):
        store.save_batch_stats(session=session, job_id=job.id, worker="w", provider="CPU",
                               stats=[BatchStat(16, 10.0, infer_ms), BatchStat(4, 1.0, 2.0)],
                               chunk="task-1")
    rows = session.execute(select(BatchStatRow.seq, BatchStatRow.infer_ms)
                           .where(BatchStatRow.job_id == job.id)
                           .order_by(BatchStatRow.seq)).all()
    assert [tuple(r) for r in rows] == [(0, 30.0), (1, 2.0)]


def test_database_identity_is_made_with_the_schema(session: Session) -> None:
    engine = session.get_bind()
    found = ledger.database_id(engine.engine if hasattr(engine, "engine") else engine)
    assert len(found) == 36 and found.count("-") == 4


def test_finishing_a_job_does_not_wait_for_timings_being_written(pg_url: str) -> None:
    # Inserting batch timings takes a key-share lock on the job row (the foreign key); the
    # finish check locks that row too. FOR UPDATE there deadlocked two workers finishing
    # chunks together; FOR NO KEY UPDATE does not conflict with the key-share lock.
    from sqlalchemy import insert, text

    from bonexray.db.session import open_database

    engine = open_database(pg_url)
    with Session(engine) as session:
        model = store.register_model(session=session, path="/m/lock.onnx",
                                     sha256="c" * 63 + "d", meta={})
        job = _job(session, model, 1)
        store.mark_failed(session=session, study_ids=_ids(session, job), error="x", worker="w")
        session.commit()
        job_id = job.id
    with engine.connect() as writer:
        writer.execute(insert(BatchStatRow).values(
            job_id=job_id, worker="w", provider="CPU", n_views=1, decode_ms=0.0,
            infer_ms=0.0, write_ms=0.0, created_at=utcnow()))  # holds the key-share lock
        with engine.connect() as finisher:
            finisher.execute(text("SET lock_timeout = '500ms'"))
            with Session(bind=finisher) as session:
                assert store.finish_job_if_done(session=session, job_id=job_id)
                session.rollback()
        writer.rollback()


def test_the_reaper_looks_only_at_its_queue_and_in_slices(session: Session,
                                                          model: Model) -> None:
    a = store.create_job(session=session, root="/a", model_id=model.id,
                         studies=make_studies(3), mode="celery", options={}, queue="qa")
    b = store.create_job(session=session, root="/b", model_id=model.id,
                         studies=make_studies(2, root="/b"), mode="celery", options={},
                         queue="qb")
    session.flush()
    later = utcnow() + timedelta(seconds=1)
    rows = ledger.unfinished_unleased(session=session, lease_seconds=LEASE, sent_before=later,
                                      queue="qa")
    assert {j for j, _ in rows} == {a.id} and len(rows) == 3
    first = ledger.unfinished_unleased(session=session, lease_seconds=LEASE, sent_before=later,
                                       queue="qa", limit=2)
    rest = ledger.unfinished_unleased(session=session, lease_seconds=LEASE, sent_before=later,
                                      queue="qa", after_id=first[-1][1])
    assert first + rest == rows
    assert [j for j, _ in ledger.unfinished_unleased(
        session=session, lease_seconds=LEASE, sent_before=later, job_id=b.id)] == [b.id] * 2
    # Locking re-checks the conditions: a study claimed meanwhile is not sent again.
    ids = [s for _, s in rows]
    _claim(session, a, ids[:1], "host:1")
    assert ledger.lock_unleased(session=session, study_ids=ids, lease_seconds=LEASE,
                                sent_before=later) == ids[1:]


def test_a_reused_pid_or_another_namespace_is_not_the_lease_holder() -> None:
    me = ledger.process_identity()
    host, pid, token = me.split(":")
    namespace, start = token.split(".")
    assert not ledger._owner_is_dead(me)
    assert ledger._owner_is_dead(f"{host}:{pid}:{namespace}.{int(start) + 1}")  # pid reused
    assert not ledger._owner_is_dead(f"{host}:{pid}:ffff{namespace}.1")  # another container
    assert not ledger._owner_is_dead(f"elsewhere:{pid}:{token}")


def test_a_job_waiting_behind_busy_workers_is_not_stalled(session: Session,
                                                          model: Model) -> None:
    waiting = _job(session, model, 2)
    busy = _job(session, model, 1)
    later = utcnow() + timedelta(seconds=120)
    _claim(session, busy, _ids(session, busy), "host:1", now=later)  # a live lease then
    p = query.job_progress(session=session, job_id=waiting.id, lease_seconds=LEASE,
                           stall_seconds=60, now=later)
    assert (p["state"], p["in_flight"]) == ("running", 0)


def test_a_study_queued_before_the_ledger_fails_with_the_reason(session: Session,
                                                               model: Model) -> None:
    from sqlalchemy import delete

    job = _job(session, model, 2)
    ids = _ids(session, job)
    session.execute(delete(View).where(View.study_id == ids[0]))  # as an old enqueue left it
    claim = _claim(session, job, ids, "host:1")
    assert [t.id for t in claim.tasks] == ids[1:] and claim.failed == 1
    study = _study(session, ids[0])
    assert study.status == "failed" and "enqueue the folder again" in study.error
