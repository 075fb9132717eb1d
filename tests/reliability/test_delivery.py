"""Delivery: a killed worker's chunk comes back, duplicates change nothing, requeue and
re-enqueue send exactly what has no result. Real workers, Redis and Postgres."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import (
    Gate,
    bonexray,
    count_view_rows,
    enqueue,
    png_bytes,
    progress,
    study_rows,
    wait_finished,
    wait_until,
    write_study,
)


def cheap_prob(value: int) -> float:
    """What the cheap model gives a uniform image of this grey value (32 px, no resize)."""
    return 1.0 / (1.0 + math.exp(-10.0 * (value / 255.0 - 0.5)))


def study_dir(root: Path, i: int) -> Path:
    return root / f"XR_WRIST/patient{i:05d}/study1_negative"


def make_tree(root: Path, studies: int, start: int = 0) -> Path:
    for i in range(start, start + studies):
        write_study(study_dir(root, i), 2, value=60 + 10 * i)
    return root


def assert_all_done_once(url: str, job_id: int, studies: int, views: int) -> dict[str, Any]:
    """Every study done, every view row there once, scores those of the cheap model."""
    p = progress(url, job_id)
    assert p["finished"] and p["done"] == studies and p["failed"] == 0, p
    rows = study_rows(url, job_id)
    assert len(rows) == studies
    total, distinct = count_view_rows(url, job_id)
    assert total == distinct == views
    for row in rows.values():
        assert row["status"] == "done" and row["views"], row
        for prob, error in row["views"].values():
            assert error is None and 0.0 < prob < 1.0
    return rows


def check_scores(rows: dict[str, Any], root: Path, indices: range) -> None:
    for i in indices:
        row = rows[str(study_dir(root, i))]
        expected = (cheap_prob(60 + 10 * i) + cheap_prob(61 + 10 * i)) / 2
        assert row["score"] == pytest.approx(expected, abs=1e-5)


def test_prefork_child_killed_mid_chunk_is_redelivered(tmp_path, cheap_model, env, pg_url,
                                                       workers):
    root = make_tree(tmp_path / "data", studies=6)
    gate = Gate(study_dir(root, 1) / "gate.png")  # in the first chunk (studies 0-2)
    worker = workers(env, tmp_path / "worker.log", pool="prefork", concurrency=1)
    worker.wait_ready()
    job = enqueue(root, cheap_model, env)["job"]

    fd = gate.wait_reader()  # the first chunk is being decoded right now
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    gate.settle(png_bytes(200))  # what the redelivered chunk will read, in a new process
    os.close(fd)
    assert progress(pg_url, job)["queued"] == 6  # killed before it wrote anything
    wait_finished(pg_url, job)

    assert worker.children() and child not in worker.children()
    rows = assert_all_done_once(pg_url, job, studies=6, views=13)
    # The killed child's chunk was claimed twice: its lease died with the process (same
    # host, pid gone), so the redelivery took it at once and decoded it carefully.
    assert [rows[str(study_dir(root, i))]["attempts"] for i in range(6)] == [2, 2, 2, 1, 1, 1]
    assert "decoded carefully" in worker.log()
    assert rows[str(study_dir(root, 1))]["views"][str(gate.path)][0] == pytest.approx(
        cheap_prob(200), abs=1e-5)
    check_scores(rows, root, range(0, 1))
    check_scores(rows, root, range(2, 6))
    assert "WorkerLostError" in worker.log()


def test_killed_solo_worker_chunk_comes_back_through_the_reaper(tmp_path, cheap_model, env,
                                                                 pg_url, workers):
    # A SIGKILLed solo worker rejects nothing, and its message stays unacknowledged until
    # the visibility timeout (300 s by default). The lease runs out much sooner and the
    # other worker's reaper sends the studies again.
    env = {**env, "BONEXRAY_LEASE_SECONDS": "3", "BONEXRAY_REAPER_INTERVAL": "1"}
    root = make_tree(tmp_path / "data", studies=4)
    gate = Gate(study_dir(root, 0) / "gate.png")
    first = workers(env, tmp_path / "first.log", pool="solo")
    first.wait_ready()
    job = enqueue(root, cheap_model, env)["job"]
    fd = gate.wait_reader()
    first.kill()
    os.close(fd)
    assert progress(pg_url, job)["queued"] == 4

    second = workers(env, tmp_path / "second.log", pool="solo")
    gate.release(png_bytes(200))  # blocks until the studies reach the second worker
    wait_finished(pg_url, job, timeout=90)
    rows = assert_all_done_once(pg_url, job, studies=4, views=9)
    assert [rows[str(study_dir(root, i))]["attempts"] for i in range(4)] == [2, 2, 2, 1]
    check_scores(rows, root, range(1, 4))
    assert "reaper: sent again 3 unfinished studies" in second.log()


def test_duplicates_change_nothing_and_requeue_leaves_waiting_chunks(
        tmp_path, cheap_model, env, pg_url, workers):
    from bonexray.db.ledger import database_id
    from bonexray.db.session import open_database
    from bonexray.jobs import send_chunks
    from bonexray.settings import load_settings
    from bonexray.worker.app import create_app

    root = make_tree(tmp_path / "data", studies=5)
    job = enqueue(root, cheap_model, env)["job"]  # no worker yet: 2 chunks wait in Redis
    # requeue sends nothing that still waits in the queue.
    again = json.loads(bonexray("requeue", str(job), "--json", env=env).stdout)
    assert again == {"job": job, "studies": 0, "chunks": 0, "leased": 0, "waiting": 5}
    # A duplicate of every chunk (a redelivery, a message published twice) is harmless.
    settings = load_settings({**os.environ, **env})
    ids = sorted(r["id"] for r in study_rows(pg_url, job).values())
    send_chunks(app=create_app(settings), settings=settings,
                database=database_id(open_database(pg_url)),
                chunks=[(job, ids[:3]), (job, ids[3:])])
    worker = workers(env, tmp_path / "worker.log")
    wait_finished(pg_url, job)
    wait_until(lambda: worker.log().count("bonexray.classify_chunk") >= 8, 60,
               "all four messages to be received and handled")
    rows = assert_all_done_once(pg_url, job, studies=5, views=10)
    assert all(r["attempts"] == 1 for r in rows.values())  # classified once each
    check_scores(rows, root, range(5))
    # A finished job has nothing to requeue; requeue is safe to repeat.
    assert json.loads(bonexray("requeue", str(job), "--json", env=env).stdout)["studies"] == 0
    assert worker.proc.poll() is None


def test_requeue_after_a_lost_queue_and_a_vanished_folder(tmp_path, cheap_model, env, pg_url,
                                                          workers):
    root = make_tree(tmp_path / "data", studies=3)
    job = enqueue(root, cheap_model, env)["job"]
    # Redis lost the queue (no persistence) and a study folder was removed meanwhile.
    import redis

    redis.Redis.from_url(env["BONEXRAY_BROKER_URL"]).delete(env["BONEXRAY_QUEUE"])
    shutil.rmtree(study_dir(root, 2))
    again = json.loads(bonexray("requeue", str(job), "--json", env=env).stdout)
    assert again == {"job": job, "studies": 3, "chunks": 1, "leased": 0, "waiting": 0}
    workers(env, tmp_path / "worker.log")
    p = wait_finished(pg_url, job)
    assert (p["done"], p["failed"], p["queued"]) == (2, 1, 0)
    missing = study_rows(pg_url, job)[str(study_dir(root, 2))]
    assert missing["status"] == "failed" and "file not found" in missing["error"]
    status = bonexray("status", str(job), env=env, check=False)
    assert status.returncode == 1 and "1 failed" in status.stdout


def test_reenqueue_skips_studies_done_with_the_same_model(tmp_path, cheap_model, env, pg_url,
                                                          workers):
    root = make_tree(tmp_path / "data", studies=4)
    workers(env, tmp_path / "worker.log")
    first = enqueue(root, cheap_model, env)
    assert (first["studies"], first["skipped"]) == (4, 0)
    wait_finished(pg_url, first["job"])

    same = enqueue(root, cheap_model, env)  # all done already: no (empty) job is made
    assert (same["job"], same["studies"], same["skipped"]) == (None, 0, 4)

    make_tree(root, studies=1, start=4)  # a new study arrived in the folder
    more = enqueue(root, cheap_model, env)
    assert (more["studies"], more["skipped"]) == (1, 4)
    wait_finished(pg_url, more["job"])
    assert list(study_rows(pg_url, more["job"])) == [str(study_dir(root, 4))]

    forced = enqueue(root, cheap_model, env, "--force")
    assert (forced["studies"], forced["skipped"]) == (5, 0)
    rows = assert_all_done_once(pg_url, wait_finished(pg_url, forced["job"])["job"],
                                studies=5, views=10)
    check_scores(rows, root, range(5))
