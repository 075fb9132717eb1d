"""Helpers for reliability tests: real worker processes, CLI runs, a FIFO gate, study trees."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from bonexray.db.query import job_progress
from bonexray.db.session import open_database, session_scope
from bonexray.db.tables import Study, View
from bonexray.export.cheap import write_cheap_model
from tests.cli_helpers import BONEXRAY, bonexray  # noqa: F401 (re-exported to the tests)


def png_bytes(value: int = 128, size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_study(folder: Path, views: int, value: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(views):
        (folder / f"image{k + 1}.png").write_bytes(png_bytes(value + k))
    return folder


def enqueue(folder: Path, model: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    """`bonexray enqueue FOLDER --model MODEL --json [EXTRA]`: its JSON summary."""
    out = bonexray("enqueue", str(folder), "--model", str(model), "--json", *extra, env=env)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Gate:
    """A FIFO named like a view: whoever decodes it blocks until the test releases it, so a
    chunk is deterministically in flight (no sleeps, no timing guesses)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)

    def _open_writer(self) -> int | None:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is reading yet
            return None

    def wait_reader(self, timeout: float = 120) -> int:
        """Block until a worker is decoding the gate; returns a writer fd (close it)."""
        fd: int = wait_until(self._open_writer, timeout, f"a reader on {self.path.name}")
        return fd

    def release(self, data: bytes, timeout: float = 120, settle: bool = False,
                fd: int | None = None) -> None:
        """Feed `data` to the reader holding `fd` (from wait_reader), else to the next one;
        with `settle` the FIFO then becomes a plain file holding `data`, so that a retried
        chunk reads it without blocking. Closing `fd` without data fails the view instead."""
        fd = self.wait_reader(timeout) if fd is None else fd
        try:
            os.set_blocking(fd, True)
            os.write(fd, data)
        finally:
            os.close(fd)
        if settle:
            self.settle(data)

    def settle(self, data: bytes) -> None:
        """Replace the FIFO by a plain file holding `data`: later readers do not block."""
        tmp = self.path.with_name(f".settle-{self.path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)


class Worker:
    """A real `bonexray worker` subprocess in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *, pool: str = "solo",
                 concurrency: int = 1, loglevel: str = "INFO") -> None:
        self.log_path = log_path
        self.name = f"rel-{uuid.uuid4().hex[:6]}@%h"
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [*BONEXRAY, "worker", "--pool", pool, "--concurrency", str(concurrency),
                 "--hostname", self.name, "--loglevel", loglevel],
                env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        wait_until(lambda: "ready." in self.log() or self.proc.poll() is not None, timeout,
                   "the worker to be ready")
        assert self.proc.poll() is None, self.log()[-3000:]

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool), as an OOM killer or a node loss."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class RedisServer:
    """A private redis-server under the test's tmp dir, stopped and started at will."""

    def __init__(self, workdir: Path, *, persistent: bool) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.workdir), "--save", "", *aof],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: self._ping(client), 20, "redis-server to start")

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a persistent server writes its AOF and exits
            self.proc.wait(timeout=20)

    def queue_length(self, queue: str) -> int:
        return int(redis.Redis.from_url(self.url).llen(queue))


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(env: dict[str, str], log_path: Path, **kwargs: Any) -> Worker:
        w = Worker(env, log_path, **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def cheap_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_cheap_model(tmp_path_factory.mktemp("model") / "cheap.onnx",
                                  image_size=32))


@pytest.fixture(scope="session")
def broker_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of these tests' own where one can be started (another test session's
    FLUSHDB on the shared test database would drop queued chunks mid-test), else the test
    Redis."""
    if shutil.which("redis-server") is None:
        yield redis_url
        return
    server = RedisServer(tmp_path_factory.mktemp("broker"), persistent=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def env(pg_url: str, broker_url: str) -> dict[str, str]:
    """A private queue on the tests' Redis and the session's Postgres database."""
    return {"BONEXRAY_QUEUE": f"rel-{uuid.uuid4().hex[:8]}", "BONEXRAY_DATABASE_URL": pg_url,
            "BONEXRAY_BROKER_URL": broker_url, "BONEXRAY_CHUNK_SIZE": "3",
            "BONEXRAY_DECODE_THREADS": "1"}


def progress(url: str, job_id: int) -> dict[str, Any]:
    with session_scope(open_database(url)) as session:
        return job_progress(session=session, job_id=job_id)


def wait_finished(url: str, job_id: int, timeout: float = 120) -> dict[str, Any]:
    result: dict[str, Any] = wait_until(
        lambda: (p := progress(url, job_id))["finished"] and p, timeout,
        f"job {job_id} to finish", interval=0.25)
    return result


def study_rows(url: str, job_id: int) -> dict[str, dict[str, Any]]:
    """Each study of the job by path: status, attempts, error, and its view rows."""
    with session_scope(open_database(url)) as session:
        studies = session.execute(select(Study).where(Study.job_id == job_id)).scalars().all()
        out: dict[str, dict[str, Any]] = {}
        for s in studies:
            views = session.execute(
                select(View.source, View.prob, View.error).where(View.study_id == s.id)
            ).all()
            out[s.key] = {"id": s.id, "status": s.status, "attempts": s.attempts,
                           "error": s.error, "score": s.score,
                           "views": {v.source: (v.prob, v.error) for v in views}}
        return out


def count_view_rows(url: str, job_id: int) -> tuple[int, int]:
    """(view rows, distinct (study, path) pairs) of the job: equal when nothing is doubled."""
    with session_scope(open_database(url)) as session:
        total = session.scalar(select(func.count(View.id)).join(Study)
                               .where(Study.job_id == job_id))
        distinct = session.scalar(
            select(func.count()).select_from(
                select(View.study_id, View.source).join(Study).where(Study.job_id == job_id)
                .distinct().subquery()))
    return int(total or 0), int(distinct or 0)
