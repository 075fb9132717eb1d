"""Soak: push many small synthetic studies through real workers; report rate, losses, memory.

    .venv/bin/python benchmarks/soak.py --studies 20000 --workers 2

Needs Redis and PostgreSQL (a database is created for the run and dropped after, unless
--db is given). Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from bonexray.db.query import job_progress
from bonexray.db.session import open_database, session_scope
from bonexray.db.tables import Study, View
from bonexray.export.cheap import write_cheap_model

BONEXRAY = [sys.executable, "-m", "bonexray.cli"]
PG_ADMIN = os.environ.get("BONEXRAY_TEST_PG_ADMIN_URL",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_studies(root: Path, n: int, size: int) -> None:
    """n studies of one small view each, MURA-style folders, 256 distinct images reused."""
    rng = np.random.default_rng(0)
    images = []
    for value in range(256):
        buf = io.BytesIO()
        noise = rng.integers(-20, 21, (size, size))
        Image.fromarray(np.clip(value + noise, 0, 255).astype(np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    for i in range(n):
        study = root / f"XR_WRIST/patient{i:06d}/study1_{'positive' if i % 3 else 'negative'}"
        study.mkdir(parents=True)
        (study / "image1.png").write_bytes(images[i % 256])


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (a worker's pool), MiB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def progress(url: str, job_id: int) -> dict[str, Any]:
    with session_scope(open_database(url)) as session:
        return job_progress(session=session, job_id=job_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--work-dir", default="/tmp/bonexray-soak")
    parser.add_argument("--db", default=None, help="Database URL (default: a fresh one).")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    work = Path(args.work_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    created_db = None
    url = args.db
    if url is None:
        name = f"bonexray_soak_{secrets.token_hex(4)}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = created_db = make_url(PG_ADMIN).set(database=name).render_as_string(
            hide_password=False)
    open_database(url)
    env = {**os.environ, "BONEXRAY_DATABASE_URL": url, "BONEXRAY_BROKER_URL": args.broker,
           "BONEXRAY_QUEUE": f"soak-{uuid.uuid4().hex[:8]}",
           "BONEXRAY_CHUNK_SIZE": str(args.chunk_size), "BONEXRAY_DECODE_THREADS": "1",
           "BONEXRAY_INTRA_OP_THREADS": "1", "BONEXRAY_LOG_LEVEL": "WARNING"}

    t0 = time.perf_counter()
    data = work / "data"
    write_studies(data, args.studies, args.image_size)
    model = write_cheap_model(work / "cheap.onnx", image_size=args.image_size)
    say(f"wrote {args.studies} studies in {time.perf_counter() - t0:.1f} s under {data}")

    procs = []
    for k in range(args.workers):
        log = open(work / f"worker{k}.log", "wb")  # noqa: SIM115 - lives as long as the worker
        procs.append(subprocess.Popen(
            [*BONEXRAY, "worker", "--pool", "solo", "--hostname", f"soak{k}@%h",
             "--loglevel", "WARNING"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    result: dict[str, Any] = {}
    try:
        time.sleep(5)
        rss_start = [rss_mib(p.pid) for p in procs]
        start = time.perf_counter()
        out = subprocess.run([*BONEXRAY, "enqueue", str(data), "--model", model, "--json"],
                             env=env, capture_output=True, text=True, check=True)
        enqueue_s = time.perf_counter() - start
        job = json.loads(out.stdout)["job"]
        say(f"job {job} enqueued in {enqueue_s:.1f} s")
        rss_warm: list[float] | None = None
        deadline = time.monotonic() + args.timeout
        next_report = 0.0
        while True:
            p = progress(url, job)
            finished = p["studies"] - p["queued"]
            if rss_warm is None and finished >= args.studies * 0.05:
                rss_warm = [rss_mib(pr.pid) for pr in procs]
            if p["finished"] or time.monotonic() > deadline:
                break
            if any(pr.poll() is not None for pr in procs):
                raise SystemExit("a worker died; see its log under " + str(work))
            if time.monotonic() >= next_report:
                say(f"{finished}/{p['studies']} studies, rss "
                    f"{[rss_mib(x.pid) for x in procs]} MiB")
                next_report = time.monotonic() + 15
            time.sleep(1)
        elapsed = time.perf_counter() - start
        rss_end = [rss_mib(pr.pid) for pr in procs]
        with session_scope(open_database(url)) as session:
            views = session.scalar(select(func.count(View.id)).join(Study)
                                   .where(Study.job_id == job))
            distinct = session.scalar(select(func.count(func.distinct(View.study_id)))
                                      .join(Study).where(Study.job_id == job))
            max_attempts = session.scalar(select(func.max(Study.attempts))
                                          .where(Study.job_id == job))
        growth = [round(100 * (e - w) / w, 1) for e, w in zip(rss_end, rss_warm or rss_start,
                                                                strict=True)]
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{platform.python_version()}",
            "studies": args.studies, "workers": args.workers, "pool": "solo",
            "chunk_size": args.chunk_size, "image_px": args.image_size,
            "enqueue_s": round(enqueue_s, 1), "elapsed_s": round(elapsed, 1),
            "studies_per_s": round(args.studies / elapsed, 1),
            "done": p["done"], "failed": p["failed"], "queued": p["queued"],
            "lost": args.studies - p["done"] - p["failed"] - p["empty"],
            "view_rows": views, "studies_with_views": distinct, "max_attempts": max_attempts,
            "rss_mib_start": rss_start, "rss_mib_after_5pct": rss_warm, "rss_mib_end": rss_end,
            "rss_growth_pct_since_5pct": growth,
        }
    finally:
        for pr in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGTERM)
                pr.wait(timeout=60)
        if created_db is not None:
            from bonexray.db.session import get_engine

            get_engine(created_db).dispose()
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(created_db).database}"'
                                  " WITH (FORCE)"))
            admin.dispose()
    print(json.dumps(result))
    return 0 if result.get("lost") == 0 and result.get("failed") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
