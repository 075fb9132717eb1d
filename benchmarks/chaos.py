"""Chaos: the faults that once stalled studies in silence, each on a job of ~300 studies,
with real workers, a redis-server of its own and a TCP proxy in front of PostgreSQL on
loopback ports. One JSON line per scenario on stdout; logs on stderr and in --workdir.

    .venv/bin/python benchmarks/chaos.py [--studies 300] [--outage 120] [--only db_outage]

Each line: scenario, studies, scored (done), failed_with_reason, lost (still unfinished
when the run gave up), duplicated (views classified by more than one message, from the
batch timings), wrongly_failed (failed studies: no scenario should fail a whole study),
seconds_to_finish (from the fault's end to the job's last study), human_commands (0: no
scenario needs one to finish), plus what the scenario checks of its own. Target: lost 0,
duplicated 0, wrongly failed 0, finished within lease + 60 s of the fault ending.
Needs the local Redis server binary and PostgreSQL (a database per scenario, dropped after).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bonexray.bench import private_database  # noqa: E402
from bonexray.db.session import open_database, session_scope  # noqa: E402
from bonexray.db.tables import BatchStat, Job, Study, View  # noqa: E402
from bonexray.export.cheap import write_cheap_model  # noqa: E402
from tests.reliability.conftest import (  # noqa: E402
    Gate,
    RedisServer,
    Worker,
    bonexray,
    enqueue,
    png_bytes,
    wait_until,
    write_study,
)
from tests.reliability.test_outages import FlakyProxy  # noqa: E402

log = logging.getLogger("chaos")
LEASE = 30  # the default BONEXRAY_LEASE_SECONDS: the figures are those of a default fleet


class Run:
    """One scenario's world: a database, a redis-server, a data tree, workers."""

    def __init__(self, name: str, workdir: Path, db_url: str, studies: int) -> None:
        self.name, self.dir, self.db_url = name, workdir / name, db_url
        self.dir.mkdir(parents=True)
        self.redis = RedisServer(self.dir / "redis", persistent=False)
        self.redis.start()
        self.model = Path(write_cheap_model(self.dir / "model.onnx", image_size=32))
        self.data = self.dir / "data"
        self.study_dirs = [self.data / f"XR_WRIST/patient{i:05d}/study1_negative"
                           for i in range(studies)]
        for i, folder in enumerate(self.study_dirs):
            write_study(folder, 2, value=30 + (i * 7) % 190)
        self.env = {"BONEXRAY_DATABASE_URL": db_url, "BONEXRAY_BROKER_URL": self.redis.url,
                    "BONEXRAY_QUEUE": f"chaos-{name}", "BONEXRAY_DECODE_THREADS": "1",
                    "BONEXRAY_INTRA_OP_THREADS": "1"}
        self.workers: list[Worker] = []
        self.fault_end = time.time()

    def worker(self, env: dict[str, str] | None = None, **kwargs: Any) -> Worker:
        w = Worker({**self.env, **(env or {})}, self.dir / f"worker{len(self.workers)}.log",
                   **kwargs)
        self.workers.append(w)
        return w

    def enqueue(self, env: dict[str, str] | None = None) -> int:
        return int(enqueue(self.data, self.model, {**self.env, **(env or {})})["job"])

    def progress(self, job: int) -> dict[str, int]:
        with session_scope(open_database(self.db_url)) as session:
            rows = session.execute(select(Study.status, func.count())
                                   .where(Study.job_id == job).group_by(Study.status)).all()
        return {status: int(n) for status, n in rows}

    def wait_done(self, job: int, timeout: float) -> None:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.progress(job).get("queued", 0) == 0, timeout,
                       f"{self.name}: job {job} to finish", interval=0.5)

    def logs(self) -> str:
        return "".join(w.log() for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.stop()


def figures(run: Run, job: int, **extra: Any) -> dict[str, Any]:
    with session_scope(open_database(run.db_url)) as session:
        counts = dict(session.execute(select(Study.status, func.count())
                                      .where(Study.job_id == job).group_by(Study.status)).all())
        failed_with_reason = session.scalar(select(func.count()).select_from(Study).where(
            Study.job_id == job, Study.status == "failed", Study.error.is_not(None))) or 0
        partial = session.scalar(select(func.count()).select_from(Study).where(
            Study.job_id == job, Study.partial.is_(True))) or 0
        scored_views = session.scalar(select(func.count(View.prob)).join(Study).where(
            Study.job_id == job)) or 0
        failed_views = session.scalar(select(func.count(View.error)).join(Study).where(
            Study.job_id == job)) or 0
        batched = session.scalar(select(func.coalesce(func.sum(BatchStat.n_views), 0)).where(
            BatchStat.job_id == job)) or 0
        job_row = session.get(Job, job)
        last = session.scalar(select(func.max(Study.finished_at)).where(Study.job_id == job))
    studies = int(sum(counts.values()))
    finished = counts.get("queued", 0) == 0 and last is not None
    return {
        "scenario": run.name, "studies": studies, "scored": int(counts.get("done", 0)),
        "failed_with_reason": int(failed_with_reason), "lost": int(counts.get("queued", 0)),
        "duplicated": max(0, int(batched) - int(scored_views)),
        "wrongly_failed": int(counts.get("failed", 0)),
        "seconds_to_finish": round(max(0.0, last.timestamp() - run.fault_end), 1)
        if finished else None,
        "human_commands": 0, "partial": int(partial), "views_failed": int(failed_views),
        "job_created_to_end_s": round((last - job_row.created_at).total_seconds(), 1)
        if finished and job_row is not None else None,
        **extra,
    }


# ---------------------------------------------------------------------------- scenarios

def db_outage(run: Run, outage: float) -> dict[str, Any]:
    url = make_url(run.db_url)
    proxy = FlakyProxy(url.host or "127.0.0.1", url.port or 5432)
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        for _ in range(2):
            run.worker({"BONEXRAY_DATABASE_URL": via_proxy}, pool="solo").wait_ready()
        job = run.enqueue()
        wait_until(lambda: run.progress(job).get("done", 0) >= 30, 120, "30 studies done")
        proxy.down()
        time.sleep(outage)
        proxy.up()
        run.fault_end = time.time()
        run.wait_done(job, LEASE + 240)
        return figures(run, job, outage_s=outage, refused_connections=proxy.refused)
    finally:
        proxy.close()


def _kill_readers(fifo: Path, stop: threading.Event, kills: list[float]) -> None:
    """Kill every process that starts reading `fifo`, as the kernel's OOM killer would."""
    target = str(fifo)
    while not stop.is_set():
        try:  # succeeds only while a reader waits in open()
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            deadline = time.monotonic() + 5
            killed = False
            while not killed and time.monotonic() < deadline:
                for pid in filter(str.isdigit, os.listdir("/proc")):
                    if int(pid) == os.getpid():
                        continue
                    with contextlib.suppress(OSError):
                        fds = os.listdir(f"/proc/{pid}/fd")
                        if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                            os.kill(int(pid), signal.SIGKILL)
                            kills.append(time.time())
                            killed = True
                            break
                time.sleep(0.02)
        finally:
            os.close(writer)
        time.sleep(0.2)


def poison_view(run: Run) -> dict[str, Any]:
    fifo = run.study_dirs[len(run.study_dirs) // 2] / "image3.png"
    os.mkfifo(fifo)
    kills: list[float] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_readers, args=(fifo, stop, kills), daemon=True)
    killer.start()
    try:
        run.worker(pool="prefork", concurrency=1).wait_ready()
        job = run.enqueue()
        run.wait_done(job, 300)
    finally:
        stop.set()
    run.fault_end = kills[-1] if kills else time.time()
    with session_scope(open_database(run.db_url)) as session:
        error = session.scalar(select(View.error).where(View.source == str(fifo)))
    return figures(run, job, kills=len(kills),
                   view_failed_with_reason=bool(error and "died" in error))


def worker_without_model(run: Run) -> dict[str, Any]:
    from bonexray.modelstore import sha256_file

    job = run.enqueue()
    store = run.dir / "store"
    store.mkdir()
    shutil.move(run.model, store / f"{sha256_file(run.model)}.onnx")
    sick = run.worker(pool="prefork", concurrency=1)
    run.worker({"BONEXRAY_MODEL_STORE": str(store)}, pool="prefork", concurrency=1)
    run.fault_end = time.time()
    run.wait_done(job, 300)
    return figures(run, job, sick_worker_exit=sick.proc.wait(timeout=120))


def redis_restart(run: Run) -> dict[str, Any]:
    run.worker(pool="solo").wait_ready()
    job = run.enqueue()
    wait_until(lambda: run.progress(job).get("done", 0) >= 50, 120, "50 studies done")
    run.redis.stop()
    run.redis.start()  # without persistence: the queue is gone
    run.fault_end = time.time()
    run.wait_done(job, LEASE + 240)
    return figures(run, job, queue_after_restart=run.redis.queue_length(run.env["BONEXRAY_QUEUE"]))


def non_utf8_name(run: Run) -> dict[str, Any]:
    for folder in run.study_dirs[::10]:
        Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")).write_bytes(png_bytes(90))
    run.worker(pool="solo").wait_ready()
    run.fault_end = time.time()
    job = run.enqueue()
    run.wait_done(job, 300)
    return figures(run, job, renamed_views=len(run.study_dirs[::10]))


def workers_finishing_together(run: Run) -> dict[str, Any]:
    env = {"BONEXRAY_CHUNK_SIZE": "2"}
    for _ in range(2):
        run.worker(env, pool="solo").wait_ready()
    run.fault_end = time.time()
    job = run.enqueue(env)
    run.wait_done(job, 300)
    return figures(run, job, deadlocks=run.logs().count("deadlock detected"))


def worker_main_killed(run: Run) -> dict[str, Any]:
    victim = run.worker(pool="prefork", concurrency=1)
    victim.wait_ready()
    run.worker(pool="prefork", concurrency=1).wait_ready()
    job = run.enqueue()
    wait_until(lambda: run.progress(job).get("done", 0) >= 50, 120, "50 studies done")
    victim.kill()  # SIGKILL to the main process and its pool: nothing is rejected
    run.fault_end = time.time()
    run.wait_done(job, LEASE + 240)
    return figures(run, job)


def forged_message(run: Run) -> dict[str, Any]:
    from bonexray.db.ledger import database_id
    from bonexray.jobs import send_chunks
    from bonexray.settings import load_settings
    from bonexray.worker.app import create_app

    run.worker(pool="solo").wait_ready()
    first = run.enqueue()
    run.wait_done(first, 300)
    with session_scope(open_database(run.db_url)) as session:
        before = session.execute(select(Study.id, Study.score, Study.status)
                                 .where(Study.job_id == first).order_by(Study.id)).all()
    settings = load_settings({**os.environ, **run.env})
    app = create_app(settings)
    ids = [row.id for row in before]
    # Hand-written messages: the old shape with paths, a finished job's studies sent again
    # under another job's id, and the right shape for a database that does not exist.
    with app.producer_or_acquire() as producer:
        for payload in ({"job": first, "model": 1, "studies": [
                            {"id": ids[0], "path": str(run.study_dirs[5]),
                             "views": [str(run.study_dirs[5] / "image1.png")]}]},
                        {"job": first + 1, "db": database_id(open_database(run.db_url)),
                         "studies": ids[:5]},
                        {"job": first, "db": "00000000-0000-0000-0000-000000000000",
                         "studies": ids[:5]}):
            app.send_task("bonexray.classify_chunk", args=[payload], queue=settings.queue,
                          producer=producer)
    send_chunks(app=app, settings=settings, database=database_id(open_database(run.db_url)),
                chunks=[(first, ids[:16])])  # a duplicate of a finished chunk
    run.fault_end = time.time()
    wait_until(lambda: run.redis.queue_length(settings.queue) == 0, 60,
               "the forged messages to be taken")
    time.sleep(5)  # and handled
    with session_scope(open_database(run.db_url)) as session:
        after = session.execute(select(Study.id, Study.score, Study.status)
                                .where(Study.job_id == first).order_by(Study.id)).all()
    return figures(run, first, rows_changed=sum(a != b for a, b in zip(before, after,
                                                                        strict=True)),
                   refused=run.logs().count("REFUSED") + run.logs().count("refusing"))


def lost_view(run: Run) -> dict[str, Any]:
    for folder in run.study_dirs:
        (folder / "image3.png").write_bytes(png_bytes(100))
    job = run.enqueue()
    for folder in run.study_dirs[::10]:
        (folder / "image2.png").unlink()  # gone between enqueue and the worker
    run.worker(pool="solo")
    run.fault_end = time.time()
    run.wait_done(job, 300)
    return figures(run, job, views_removed=len(run.study_dirs[::10]))


def requeue_while_running(run: Run) -> dict[str, Any]:
    gate = Gate(run.study_dirs[0] / "image3.png")  # holds the first chunk in flight
    run.worker(pool="solo").wait_ready()
    job = run.enqueue()
    fd = gate.wait_reader()
    sent = 0
    for _ in range(3):  # the fault here is the operator's command, while the job runs
        out = bonexray("requeue", str(job), "--json", env=run.env)
        sent += json.loads(out.stdout)["studies"]
    gate.release(png_bytes(77), settle=True, fd=fd)
    run.fault_end = time.time()
    run.wait_done(job, 300)
    return figures(run, job, requeued_studies=sent)


def wrong_database(run: Run) -> dict[str, Any]:
    run.worker(pool="solo").wait_ready()
    sqlite = f"sqlite:///{run.dir / 'other.db'}"
    job = run.enqueue({"BONEXRAY_DATABASE_URL": sqlite})
    run.fault_end = time.time()
    out = bonexray("status", str(job), "--db", sqlite, "--wait", "--stall-after", "10",
                   "--json", env=run.env, check=False)
    with session_scope(open_database(run.db_url)) as session:
        written = session.scalar(select(func.count()).select_from(Study)) or 0
    state = json.loads(out.stdout)["state"]
    return {"scenario": run.name, "studies": len(run.study_dirs), "scored": 0,
            "failed_with_reason": 0, "lost": 0, "duplicated": 0, "wrongly_failed": 0,
            "seconds_to_finish": None, "human_commands": 0,
            "producer_job_state": state, "status_exit": out.returncode,
            "rows_written_to_the_workers_database": int(written),
            "refused": run.logs().count("REFUSED")}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "db_outage": db_outage, "poison_view": poison_view,
    "worker_without_model": worker_without_model, "redis_restart": redis_restart,
    "non_utf8_name": non_utf8_name, "workers_finishing_together": workers_finishing_together,
    "worker_main_killed": worker_main_killed, "forged_message": forged_message,
    "lost_view": lost_view, "requeue_while_running": requeue_while_running,
    "wrong_database": wrong_database,
}


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="bonexray-chaos-") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--outage", type=float, default=120.0,
                        help="Seconds the database is unreachable in db_outage.")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--pg-admin", default=os.environ.get(
        "BONEXRAY_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--workdir", default=None, help="Keep data and logs here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    with workdir(args.workdir) as work:
        for name in args.only or list(SCENARIOS):
            with private_database(args.pg_admin) as db_url:
                run = Run(name, work, db_url, args.studies)
                log.info("scenario %s: %d studies", name, args.studies)
                try:
                    kwargs = {"outage": args.outage} if name == "db_outage" else {}
                    result = SCENARIOS[name](run, **kwargs)
                except Exception as exc:
                    result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
                finally:
                    run.close()
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
