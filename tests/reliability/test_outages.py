"""Outages: Redis restarted during a job (with and without persistence), the database
unreachable for a while, and a chunk that fails every retry. Real servers, real workers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.reliability.conftest import (
    Gate,
    RedisServer,
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


def study_dir(root: Path, i: int) -> Path:
    return root / f"XR_HAND/patient{i:05d}/study1_positive"


def make_tree(root: Path, studies: int) -> Path:
    for i in range(studies):
        write_study(study_dir(root, i), 2, value=50 + 20 * i)
    return root


@pytest.fixture
def private_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=request.param)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("heal", ["reaper", "requeue"])
@pytest.mark.parametrize("private_redis", [False], indirect=True)
def test_redis_restart_without_persistence_heals(tmp_path, cheap_model, env, pg_url, workers,
                                                 private_redis, heal):
    # The waiting chunk is lost with the queue. The worker's reaper sends it again once its
    # lease-long grace is over (short here), without anyone typing a command; `requeue`
    # does the same pass at once, by hand.
    fast = {"BONEXRAY_LEASE_SECONDS": "3", "BONEXRAY_REAPER_INTERVAL": "1"}
    env = {**env, "BONEXRAY_BROKER_URL": private_redis.url, **(fast if heal == "reaper" else {})}
    root = make_tree(tmp_path / "data", studies=6)
    gate = Gate(study_dir(root, 0) / "gate.png")
    worker = workers(env, tmp_path / "worker.log")
    worker.wait_ready()
    job = enqueue(root, cheap_model, env)["job"]
    fd = gate.wait_reader()  # chunk 1 running, chunk 2 waiting in Redis
    private_redis.stop()
    private_redis.start()  # empty: the waiting chunk is gone
    assert private_redis.queue_length(env["BONEXRAY_QUEUE"]) == 0
    gate.release(png_bytes(180), settle=True, fd=fd)
    if heal == "requeue":
        wait_until(lambda: progress(pg_url, job)["queued"] == 3, 60, "chunk 1's results")
        assert not progress(pg_url, job)["finished"]
        again = json.loads(bonexray("requeue", str(job), "--json", env=env).stdout)
        assert (again["studies"], again["chunks"]) == (3, 1)
    p = wait_finished(pg_url, job, timeout=90)  # the worker reconnected on its own
    assert p["done"] == 6 and p["failed"] == 0
    if heal == "reaper":
        assert "reaper: sent again 3 unfinished studies" in worker.log()
    total, distinct = count_view_rows(pg_url, job)
    assert total == distinct == 13
    assert worker.proc.poll() is None


@pytest.mark.parametrize("private_redis", [True], indirect=True)
def test_redis_restart_with_persistence_keeps_queued_chunks(tmp_path, cheap_model, env, pg_url,
                                                            workers, private_redis):
    # The running chunk's ack is lost with the connection: it comes back after the
    # visibility timeout and rewrites the same rows.
    env = {**env, "BONEXRAY_BROKER_URL": private_redis.url, "BONEXRAY_VISIBILITY_TIMEOUT": "5"}
    root = make_tree(tmp_path / "data", studies=6)
    gate = Gate(study_dir(root, 0) / "gate.png")
    worker = workers(env, tmp_path / "worker.log")
    worker.wait_ready()
    job = enqueue(root, cheap_model, env)["job"]
    fd = gate.wait_reader()
    private_redis.stop()
    private_redis.start()  # the AOF brings the waiting chunk back
    assert private_redis.queue_length(env["BONEXRAY_QUEUE"]) == 1
    gate.release(png_bytes(180), settle=True, fd=fd)
    p = wait_finished(pg_url, job)  # no requeue needed
    assert p["done"] == 6 and p["failed"] == 0
    total, distinct = count_view_rows(pg_url, job)
    assert total == distinct == 13
    assert all(r["attempts"] >= 1 for r in study_rows(pg_url, job).values())
    assert worker.proc.poll() is None


class FlakyProxy:
    """A TCP proxy in front of Postgres that can drop every connection and refuse new ones."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self.open.clear()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()

    def up(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.down()
        self.listener.close()


def test_database_unavailable_for_a_while_keeps_the_chunk_and_takes_no_other(
        tmp_path, cheap_model, env, pg_url, workers, broker_url):
    url = make_url(pg_url)
    proxy = FlakyProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        worker_env = {**env, "BONEXRAY_DATABASE_URL": url.set(
            host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)}
        root = make_tree(tmp_path / "data", studies=6)
        gate = Gate(study_dir(root, 1) / "gate.png")
        worker = workers(worker_env, tmp_path / "worker.log")
        worker.wait_ready()
        job = enqueue(root, cheap_model, env)["job"]
        fd = gate.wait_reader()
        proxy.down()  # the database goes away while the first chunk is being decoded
        gate.release(png_bytes(90), settle=True, fd=fd)
        wait_until(lambda: worker.log().count("keeping the chunk") >= 4, 60,
                   "several retries with backoff")
        assert progress(pg_url, job)["queued"] == 6 and proxy.refused > 0
        # The second chunk still waits in Redis for a worker that can use it.
        import redis

        waiting = redis.Redis.from_url(broker_url).llen(env["BONEXRAY_QUEUE"])
        assert waiting == 1
        proxy.up()
        p = wait_finished(pg_url, job)
        assert p["done"] == 6 and p["failed"] == 0
        rows = study_rows(pg_url, job)
        assert all(r["attempts"] == 1 for r in rows.values())  # one claim, kept throughout
        total, distinct = count_view_rows(pg_url, job)
        assert total == distinct == 13
        assert "database back after" in worker.log()
        assert worker.proc.poll() is None
    finally:
        proxy.close()


@contextlib.contextmanager
def worker_behind_a_lock(tmp_path: Path, cheap_model: Path, env: dict[str, str], pg_url: str,
                         workers: Any, lock_sql: str) -> Iterator[tuple[int, Any]]:
    """Enqueue 3 studies, take a lock with `lock_sql` (":job" is the job id), then start a
    worker whose statements give up after 300 ms of waiting for a lock. Yields (job id,
    worker) while the lock is held."""
    worker_env = {**env, "BONEXRAY_DB_LOCK_TIMEOUT_MS": "300"}
    root = make_tree(tmp_path / "data", studies=3)
    job = enqueue(root, cheap_model, env)["job"]
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(text(lock_sql), {"job": job} if ":job" in lock_sql else {})
            yield job, workers(worker_env, tmp_path / "worker.log")
            conn.rollback()
    finally:
        engine.dispose()


def test_a_lock_held_for_long_delays_the_chunk_but_fails_nothing(tmp_path, cheap_model, env,
                                                                  pg_url, workers):
    # The database answers but the views table stays locked against writes: every write of
    # the chunk's results times out (and rolls back its study rows with it). The worker
    # keeps trying, and finishes once the lock is gone.
    with worker_behind_a_lock(tmp_path, cheap_model, env, pg_url, workers,
                              "LOCK TABLE views IN SHARE MODE") as (job, worker):
        wait_until(lambda: worker.log().count("keeping the chunk") >= 2, 90,
                   "lock timeouts to be retried")
        assert progress(pg_url, job)["queued"] == 3
    p = wait_finished(pg_url, job)
    assert (p["done"], p["failed"]) == (3, 0)
    assert "LockNotAvailable" in worker.log() or "lock timeout" in worker.log()


def test_locked_job_row_does_not_undo_saved_results(tmp_path, cheap_model, env, pg_url,
                                                    workers):
    # Only the chunk's last step (batch timings, the job's finish stamp) needs the job row;
    # while it is locked, the results are written anyway and the chunk is not redone.
    with worker_behind_a_lock(tmp_path, cheap_model, env, pg_url, workers,
                              "SELECT id FROM jobs WHERE id = :job FOR UPDATE") as (job, worker):
        wait_until(lambda: "results saved, but not the batch timings" in worker.log(), 90,
                   "the chunk's last step to give up")
        assert progress(pg_url, job)["finished"]  # no study is queued any more
    rows = study_rows(pg_url, job)
    assert {r["status"] for r in rows.values()} == {"done"}
    assert all(r["attempts"] == 1 for r in rows.values())  # classified and written once
    assert "retry" not in worker.log()
