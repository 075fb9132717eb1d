"""End to end: synthesise, train a tiny model, export, classify embedded (SQLite) and
distributed (Redis + a real `bonexray worker` process + Postgres)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from bonexray.db.query import job_progress, job_results
from bonexray.db.session import open_database, session_scope
from bonexray.studies import find_studies
from tests.cli_helpers import BONEXRAY, bonexray


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "mura"
    bonexray("synth", str(root), "--studies", "40", "--seed", "3", "--image-size", "96")
    return root


@pytest.fixture(scope="module")
def model(data: Path) -> Path:
    run_dir = data.parent / "run"
    bonexray("train", str(data), "--out", str(run_dir), "--epochs", "1", "--image-size", "64",
             "--batch-size", "8", "--max-steps", "2", "--workers", "0", "--json")
    assert (run_dir / "best.pt").is_file()
    onnx_path = data.parent / "model.onnx"
    out = bonexray("export", str(run_dir / "best.pt"), "--out", str(onnx_path), "--json")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report  # the export prints its metadata and parity figures
    assert onnx_path.is_file() and not Path(str(onnx_path) + ".data").exists()
    return onnx_path


def check_every_study_scored(url: str, job_id: int, folder: Path) -> None:
    expected = find_studies(folder)
    with session_scope(open_database(url)) as session:
        rows = job_results(session=session, job_id=job_id)
        progress = job_progress(session=session, job_id=job_id)
    assert progress["finished"] and progress["queued"] == 0
    assert sorted(r["study"] for r in rows) == sorted(s.key for s in expected)
    by_path = {s.key: s for s in expected}
    for row in rows:
        study = by_path[row["study"]]
        assert row["status"] == "done", row
        assert 0.0 <= row["score"] <= 1.0
        assert row["prediction"] in ("normal", "abnormal")
        assert row["label"] == study.label and row["body_part"] == study.body_part
        assert sorted(v["source"] for v in row["views"]) == sorted(study.views)
        assert all(v["prob"] is not None and v["error"] is None for v in row["views"])
        mean = sum(v["prob"] for v in row["views"]) / len(row["views"])
        assert row["score"] == pytest.approx(mean, abs=1e-6)
    assert progress["views_scored"] == sum(len(s.views) for s in expected)


def test_embedded_run_on_sqlite(data: Path, model: Path, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    folder = data / "valid"
    out = bonexray("run", str(folder), "--model", str(model), "--db", url, "--json")
    summary = json.loads(out.stdout)  # stdout carries only the JSON
    # The counts the text shows are in the JSON too.
    assert set(summary) == {"job", "studies", "views", "done", "partial", "failed", "empty",
                            "views_scored", "views_failed", "elapsed_s"}
    assert summary["studies"] == len(find_studies(folder)) == summary["done"]
    assert summary["views_scored"] == summary["views"] and summary["failed"] == 0
    check_every_study_scored(url, summary["job"], folder)

    listed = json.loads(bonexray("results", str(summary["job"]), "--db", url, "--format",
                                 "json").stdout)
    assert len(listed) == summary["studies"]
    assert set(listed[0]) == {"study", "body_part", "label", "score", "prediction", "status",
                              "partial", "error", "views"}
    csv_out = bonexray("results", "--db", url, "--format", "csv").stdout.splitlines()
    assert len(csv_out) == summary["studies"] + 1
    # The model is registered on first use; a second run can name it instead of the path.
    again = bonexray("run", str(folder), "--model", model.stem, "--db", url, "--json")
    assert json.loads(again.stdout)["job"] == summary["job"] + 1


def test_run_without_model_fails_with_one_line(data: Path, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    out = bonexray("run", str(data / "valid"), "--model", "no-such-model", "--db", url,
                   check=False)
    assert out.returncode == 2  # a user error: one line, no traceback
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "no-such-model" in last
    assert "Traceback" not in out.stderr


def test_distributed_run_on_redis_and_postgres(data: Path, model: Path, pg_url: str,
                                               redis_url: str, tmp_path: Path):
    folder = data / "valid"
    env = {"BONEXRAY_QUEUE": f"bonexray-test-{uuid.uuid4().hex[:8]}",
           "BONEXRAY_DATABASE_URL": pg_url, "BONEXRAY_BROKER_URL": redis_url,
           "BONEXRAY_CHUNK_SIZE": "3"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen([*BONEXRAY, "worker", "--pool", "solo", "--hostname",
                                   f"test-{os.getpid()}@%h"],
                                  env={**os.environ, **env}, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = bonexray("enqueue", str(folder), "--model", str(model), "--json", env=env)
        summary = json.loads(out.stdout)
        assert summary["studies"] == len(find_studies(folder))
        status = bonexray("status", str(summary["job"]), "--wait", "--timeout", "180",
                          "--interval", "0.5", "--json", env=env, timeout=240)
        progress = json.loads(status.stdout)
        assert progress["finished"], progress
        check_every_study_scored(pg_url, summary["job"], folder)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
    log_text = log_path.read_text()
    assert "bonexray.classify_chunk" in log_text, log_text[-3000:]
