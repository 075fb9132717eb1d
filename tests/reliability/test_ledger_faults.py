"""Faults that once stalled studies in silence, each ending scored or explained without a
human command: a view that kills its process, a worker without the model, a message for
another database or a forged one, names that are not UTF-8, a lost view, a job nobody
works on. Real workers, Redis and Postgres. (A broker that lost its queue: test_outages.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from tests.reliability.conftest import (
    Gate,
    bonexray,
    enqueue,
    png_bytes,
    progress,
    study_rows,
    wait_finished,
    wait_until,
    write_study,
)


def study_dir(root: Path, i: int) -> Path:
    return root / f"XR_ELBOW/patient{i:05d}/study1_negative"


def make_tree(root: Path, studies: int) -> Path:
    for i in range(studies):
        write_study(study_dir(root, i), 2, value=40 + 15 * i)
    return root


def test_a_view_that_kills_its_process_fails_alone(tmp_path, cheap_model, env, pg_url,
                                                   workers):
    root = make_tree(tmp_path / "data", studies=3)  # one chunk of three studies
    gate = Gate(study_dir(root, 1) / "image3.png")
    worker = workers(env, tmp_path / "worker.log", pool="prefork", concurrency=1)
    worker.wait_ready()
    job = enqueue(root, cheap_model, env)["job"]
    kills = 0
    # Each time a pool process reads the view it is killed, as the kernel's OOM killer
    # would. The first death is in the batched decode; then the chunk's studies are
    # decoded one view at a time, and three deaths on that view fail it.
    while True:
        fd = wait_until(lambda: gate._open_writer() or (progress(pg_url, job)["finished"]
                                                         and -1), 90,
                        "the next read of the view, or the job's end")
        if fd == -1:
            break
        (child,) = worker.children()
        os.kill(child, signal.SIGKILL)
        os.close(fd)
        kills += 1
        wait_until(lambda c=child: c not in worker.children(), 30, "the child to be reaped")
        assert kills <= 5, worker.log()[-3000:]
    assert kills == 4
    rows = study_rows(pg_url, job)
    poisoned = rows[str(study_dir(root, 1))]
    assert poisoned["status"] == "done"  # scored from its two other views
    prob, error = poisoned["views"][str(gate.path)]
    assert prob is None and "died 3 times while decoding" in error and str(gate.path) in error
    for i in (0, 2):  # the chunk-mates are scored, whole
        row = rows[str(study_dir(root, i))]
        assert row["status"] == "done"
        assert all(p is not None for p, _ in row["views"].values())
    results = json.loads(bonexray("results", str(job), "--format", "json", env=env).stdout)
    assert {r["study"]: r["partial"] for r in results} == {
        str(study_dir(root, 0)): False, str(study_dir(root, 1)): True,
        str(study_dir(root, 2)): False}
    assert worker.proc.poll() is None


def test_a_worker_without_the_model_stops_and_leaves_the_work(tmp_path, cheap_model, env,
                                                              pg_url, workers):
    # The model is registered from a file that is then moved into a store that only the
    # healthy worker mounts.
    model = tmp_path / "model.onnx"
    shutil.copy(cheap_model, model)
    root = make_tree(tmp_path / "data", studies=6)
    job = enqueue(root, model, env)["job"]
    from bonexray.modelstore import sha256_file

    store = tmp_path / "store"
    store.mkdir()
    sha = sha256_file(model)
    shutil.move(model, store / f"{sha}.onnx")
    sick = workers(env, tmp_path / "sick.log", pool="prefork", concurrency=1)
    assert sick.proc.wait(timeout=90) == 75  # EX_TEMPFAIL: it stopped by itself
    assert "cannot classify" in sick.log() and "cannot read model" in sick.log()
    assert progress(pg_url, job)["failed"] == 0
    healthy = workers({**env, "BONEXRAY_MODEL_STORE": str(store)}, tmp_path / "healthy.log")
    p = wait_finished(pg_url, job)
    assert (p["done"], p["failed"]) == (6, 0)
    assert all(r["attempts"] == 1 for r in study_rows(pg_url, job).values())
    assert healthy.proc.poll() is None


def test_a_message_for_another_database_is_refused_and_its_job_stalls(
        tmp_path, cheap_model, env, pg_url, workers):
    root = make_tree(tmp_path / "data", studies=2)
    pg_job = enqueue(root, cheap_model, env)["job"]  # a job in the workers' database
    worker = workers(env, tmp_path / "worker.log")
    wait_finished(pg_url, pg_job)
    before = study_rows(pg_url, pg_job)
    # The producer's terminal lacks the URL: it writes to SQLite, the worker uses Postgres.
    sqlite = f"sqlite:///{tmp_path / 'other.db'}"
    other = enqueue(root, cheap_model, {**env, "BONEXRAY_DATABASE_URL": sqlite})["job"]
    wait_until(lambda: "REFUSED" in worker.log(), 30, "the worker to refuse the message")
    assert "different BONEXRAY_DATABASE_URL" in worker.log()
    assert study_rows(pg_url, pg_job) == before  # nothing written into the wrong job
    out = bonexray("status", str(other), "--db", sqlite, "--stall-after", "1", "--wait",
                   env=env, check=False)
    assert out.returncode == 4 and "stalled" in out.stdout, out
    assert worker.proc.poll() is None


def test_status_wait_ends_on_a_stall(tmp_path, cheap_model, env):
    root = make_tree(tmp_path / "data", studies=2)
    job = enqueue(root, cheap_model, env)["job"]  # and no worker, ever
    out = bonexray("status", str(job), "--wait", "--stall-after", "2", "--interval", "0.2",
                   env=env, check=False)
    assert out.returncode == 4
    assert "stalled; 0 done" in out.stdout and "no worker holds any" in out.stderr
    running = bonexray("status", str(job), "--json", env=env, check=False)
    assert running.returncode == 0 and json.loads(running.stdout)["state"] == "running"


def test_file_names_that_are_not_utf8_fail_their_own_view(tmp_path, cheap_model, env):
    study = write_study(tmp_path / "data" / "XR_HAND" / "patient1" / "study1_negative", 1)
    (Path(os.fsdecode(bytes(study) + b"/caf\xe9.png"))).write_bytes(png_bytes(90))
    db = f"sqlite:///{tmp_path / 'r.db'}"
    out = bonexray("run", str(tmp_path / "data"), "--model", str(cheap_model), "--db", db,
                   "--json", env=env)
    job = json.loads(out.stdout)["job"]
    (row,) = json.loads(bonexray("results", str(job), "--db", db, "--format", "json",
                                 env=env).stdout)
    assert row["status"] == "done" and row["partial"] is True
    errors = {v["source"]: v["error"] for v in row["views"]}
    assert errors[f"{study}/image1.png"] is None
    assert "not valid UTF-8" in errors[f"{study}/caf\\xe9.png"]


def test_hand_written_messages_change_nothing(tmp_path, cheap_model, env, pg_url, workers):
    from bonexray.db.ledger import database_id
    from bonexray.db.session import open_database
    from bonexray.settings import load_settings
    from bonexray.worker.app import create_app

    first = make_tree(tmp_path / "a", studies=2)
    other = make_tree(tmp_path / "b", studies=2)
    worker = workers(env, tmp_path / "worker.log")
    job_a = enqueue(first, cheap_model, env)["job"]
    wait_finished(pg_url, job_a)
    job_b = enqueue(other, cheap_model, {**env, "BONEXRAY_QUEUE": "nobody-listens"})["job"]
    rows_a, rows_b = study_rows(pg_url, job_a), study_rows(pg_url, job_b)
    ids_b = [r["id"] for r in rows_b.values()]
    settings = load_settings({**os.environ, **env})
    app = create_app(settings)
    db = database_id(open_database(pg_url))
    forged = [
        # The old shape, with a path of the forger's choosing.
        {"job": job_a, "model": 1, "studies": [{"id": ids_b[0], "path": str(first),
                                                "views": [str(first / "x.png")]}]},
        # Another job's studies under a finished job's id.
        {"job": job_a, "db": db, "studies": ids_b},
        # Ids as strings, an empty list, extra keys.
        {"job": str(job_b), "db": db, "studies": ids_b},
        {"job": job_b, "db": db, "studies": []},
        {"job": job_b, "db": db, "studies": ids_b, "views": ["/etc/passwd"]},
    ]
    with app.producer_or_acquire() as producer:
        for payload in forged:
            app.send_task("bonexray.classify_chunk", args=[payload], queue=settings.queue,
                          producer=producer)
    wait_until(lambda: worker.log().count("succeeded") >= 1 + len(forged), 60,
               "the forged messages to be handled")
    assert worker.log().count("refusing a task message") == 4
    assert study_rows(pg_url, job_a) == rows_a and study_rows(pg_url, job_b) == rows_b
    assert worker.proc.poll() is None


def test_a_study_that_lost_a_view_is_scored_as_partial(tmp_path, cheap_model, env, pg_url,
                                                       workers):
    root = make_tree(tmp_path / "data", studies=2)
    for i in range(2):
        (study_dir(root, i) / "image3.png").write_bytes(png_bytes(120))
    job = enqueue(root, cheap_model, env)["job"]
    (study_dir(root, 0) / "image2.png").unlink()  # gone before a worker reads it
    workers(env, tmp_path / "worker.log")
    p = wait_finished(pg_url, job)
    assert (p["done"], p["partial"], p["failed"]) == (2, 1, 0)
    csv_rows = bonexray("results", str(job), "--format", "csv", env=env).stdout.splitlines()
    header = csv_rows[0].split(",")
    partial = {line.split(",")[0]: line.split(",")[header.index("partial")]
               for line in csv_rows[1:]}
    assert partial == {str(study_dir(root, 0)): "1", str(study_dir(root, 1)): "0"}
    status = bonexray("status", str(job), env=env).stdout
    assert "2 done (1 partial)" in status
