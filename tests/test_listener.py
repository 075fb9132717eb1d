"""`bonexray listen`: a real C-STORE SCP process, fed by dcmtk's storescu/echoscu, spools
durably, classifies each study once complete, resumes after a kill, and refuses what it
must not take (other SOP classes, other AE titles)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")
pydicom = pytest.importorskip("pydicom")

from pydicom.uid import generate_uid  # noqa: E402

from bonexray.export.cheap import write_cheap_model  # noqa: E402
from bonexray.listener import MARKER, Spool  # noqa: E402
from tests.cli_helpers import BONEXRAY, bonexray  # noqa: E402
from tests.test_dicom import DX_FOR_PROCESSING  # noqa: E402
from tests.test_dicom_studies import radiograph, save, structured_report  # noqa: E402

STORESCU, ECHOSCU = shutil.which("storescu"), shutil.which("echoscu")
needs_dcmtk = pytest.mark.skipif((STORESCU is None or ECHOSCU is None)
                                 and not os.environ.get("CI"),
                                 reason="dcmtk's storescu/echoscu are not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Listener:
    """`bonexray listen` in a subprocess of its own."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str],
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = tmp / f"listen-{uuid.uuid4().hex[:6]}.log"
        self.proc = subprocess.Popen(
            [*BONEXRAY, "listen", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"), env={**os.environ, **env},
            start_new_session=True)
        deadline = time.monotonic() + 60
        while "listening as" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def send(self, *files: Path, calling: str = "STORESCU") -> subprocess.CompletedProcess[str]:
        assert STORESCU is not None
        return subprocess.run([STORESCU, "-aet", calling, "-aec", "BONEXRAY", "127.0.0.1",
                               str(self.port), *map(str, files)],
                              capture_output=True, text=True, timeout=60, check=False)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)
        return self.log.read_text()


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    started: list[Listener] = []
    yield started
    for listener in started:
        listener.stop(signal.SIGKILL)


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    model = write_cheap_model(tmp_path / "cheap.onnx", image_size=32)
    env = {"BONEXRAY_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    u1 = generate_uid()
    files = tmp_path / "files"
    study = [save(files / f"cr{k}.dcm", radiograph(u1)) for k in range(3)]
    return {"model": model, "env": env, "u1": u1, "study": study, "spool": tmp_path / "spool",
            "sr": save(files / "sr.dcm", structured_report(u1)),
            "proc": save(files / "proc.dcm", radiograph(u1, sop=DX_FOR_PROCESSING))}


def wait_for(predicate: Any, timeout: float = 90, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def results(env: dict[str, str]) -> list[dict[str, Any]]:
    out = bonexray("results", "--json", env=env, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else []


def jobs(env: dict[str, str]) -> list[dict[str, Any]]:
    out = bonexray("jobs", "--json", env=env, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else []


@needs_dcmtk
def test_a_routed_study_is_spooled_then_classified_once_complete(setup, listeners, tmp_path):
    listener = Listener(tmp_path, "--model", setup["model"], "--embedded", "--spool",
                        str(setup["spool"]), "--stable-seconds", "1", env=setup["env"])
    listeners.append(listener)
    assert subprocess.run([ECHOSCU, "-aec", "BONEXRAY", "127.0.0.1", str(listener.port)],
                          capture_output=True, timeout=30, check=False).returncode == 0
    sent = listener.send(*setup["study"][:2])
    assert sent.returncode == 0, sent.stderr
    # Objects that are not radiographs are refused at association: never spooled.
    for other in (setup["sr"], setup["proc"]):
        assert listener.send(other).returncode != 0
    rows = wait_for(lambda: [r for r in results(setup["env"]) if r["status"] == "done"],
                    what="the study's result")
    assert [r["study"] for r in rows] == [f"{setup['u1']}/hand"]
    assert len(rows[0]["views"]) == 2
    folder = setup["spool"] / setup["u1"]
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert len(files) == 2  # only the two radiographs
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    marker = json.loads((folder / MARKER).read_text())
    assert marker["instances"] == 2 and marker["job"] == jobs(setup["env"])[0]["job"]
    # A later instance re-opens the study: classified again, whole.
    assert listener.send(setup["study"][2]).returncode == 0
    wait_for(lambda: len(jobs(setup["env"])) == 2, what="the re-opened study's job")
    latest = wait_for(lambda: [r for r in results(setup["env"]) if r["status"] == "done"],
                      what="the second result")
    assert len(latest[0]["views"]) == 3
    log = listener.stop()
    assert "3 instances received, 2 jobs" in log
    assert setup["u1"] not in log  # no identifiers in the log, not even UIDs


@needs_dcmtk
def test_a_listener_killed_before_the_study_is_complete_resumes_it(setup, listeners,
                                                                   tmp_path):
    first = Listener(tmp_path, "--model", setup["model"], "--embedded", "--spool",
                     str(setup["spool"]), "--stable-seconds", "600", env=setup["env"])
    listeners.append(first)
    assert first.send(*setup["study"]).returncode == 0  # acknowledged: on disk
    first.stop(signal.SIGKILL)
    assert not jobs(setup["env"])
    assert len(Spool(setup["spool"]).instances(setup["spool"] / setup["u1"])) == 3
    again = Listener(tmp_path, "--model", setup["model"], "--embedded", "--spool",
                     str(setup["spool"]), "--stable-seconds", "1", env=setup["env"])
    listeners.append(again)
    rows = wait_for(lambda: [r for r in results(setup["env"]) if r["status"] == "done"],
                    what="the resumed study")
    assert len(rows[0]["views"]) == 3 and len(jobs(setup["env"])) == 1


@needs_dcmtk
def test_calling_ae_titles_outside_the_allow_list_are_refused(setup, listeners, tmp_path):
    listener = Listener(tmp_path, "--model", setup["model"], "--embedded", "--spool",
                        str(setup["spool"]), "--allow", "ORTHANC,PACS1", env=setup["env"])
    listeners.append(listener)
    assert listener.send(setup["study"][0], calling="INTRUDER").returncode != 0
    assert listener.send(setup["study"][0], calling="PACS1").returncode == 0
    assert len(list(setup["spool"].rglob("*.dcm"))) == 1


@needs_dcmtk
def test_without_embedded_the_job_goes_to_the_workers(setup, listeners, tmp_path, redis_url):
    import redis

    queue = f"listen-{uuid.uuid4().hex[:8]}"
    env = {**setup["env"], "BONEXRAY_BROKER_URL": redis_url, "BONEXRAY_QUEUE": queue}
    listener = Listener(tmp_path, "--model", setup["model"], "--spool", str(setup["spool"]),
                        "--stable-seconds", "1", env=env)
    listeners.append(listener)
    assert listener.send(*setup["study"][:2]).returncode == 0
    job = wait_for(lambda: jobs(env), what="the job")[0]
    client = redis.Redis.from_url(redis_url)
    try:
        assert wait_for(lambda: client.llen(queue), what="the chunk message") == 1
    finally:
        client.delete(queue)
        client.close()
    assert job["mode"] == "celery" and job["studies"] == 1


@needs_dcmtk
def test_a_listener_killed_mid_association_loses_nothing_it_acknowledged(setup, listeners,
                                                                         tmp_path):
    """Killed while a PACS is sending: what was acknowledged is in the spool, whole; the
    PACS sends the rest again to the restarted listener, and the study is scored once,
    with every view."""
    from bonexray.listener import Spool

    u = generate_uid()
    files = [save(tmp_path / "many" / f"v{k:02d}.dcm", radiograph(u)) for k in range(40)]
    first = Listener(tmp_path, "--model", setup["model"], "--embedded", "--spool",
                     str(setup["spool"]), "--stable-seconds", "600", env=setup["env"])
    listeners.append(first)
    assert STORESCU is not None
    sending = subprocess.Popen([STORESCU, "-aet", "STORESCU", "-aec", "BONEXRAY", "127.0.0.1",
                                str(first.port), *map(str, files)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = setup["spool"] / u
    wait_for(lambda: folder.is_dir() and len(Spool.instances(folder)) >= 5, 60,
             "the first instances")
    first.stop(signal.SIGKILL)
    assert sending.wait(timeout=60) != 0 or len(Spool.instances(folder)) == len(files)
    kept = Spool.instances(folder)
    for path in kept:  # every acknowledged instance is a whole, readable file
        assert pydicom.dcmread(path).StudyInstanceUID == u
    again = Listener(tmp_path, "--model", setup["model"], "--embedded", "--spool",
                     str(setup["spool"]), "--stable-seconds", "1", env=setup["env"])
    listeners.append(again)
    assert again.send(*files).returncode == 0  # the PACS's retry
    rows = wait_for(lambda: [r for r in results(setup["env"]) if r["status"] == "done"
                             and len(r["views"]) == len(files)], what="the whole study")
    assert rows and len(Spool.instances(folder)) == len(files)


def test_results_that_cannot_go_out_are_retried_with_backoff(tmp_path):
    """A destination that is away ends the pass (one call, not one per job) and is tried
    again later, twice as late each time; a job whose results went is marked and left."""
    import threading

    from bonexray.listener import ListenerStats, Pending, _deliver_finished

    spool = Spool(tmp_path / "spool")
    for job in (1, 2):
        path = spool.store(f"1.2.{job}", f"1.2.{job}.1", b"x")
        spool.mark(Pending(folder=path.parent, instances=1, newest_ns=0, reopened=False),
                   job=job)
    calls: list[int] = []
    answers = {1: None, 2: None}

    def deliver(job: int) -> bool | None:
        calls.append(job)
        return answers[job]

    retry: dict[int, tuple[float, float]] = {}
    stop, stats = threading.Event(), ListenerStats()
    _deliver_finished(spool, deliver, stop, stats, retry)
    assert calls == [1]  # away: the pass ends at the first job
    _deliver_finished(spool, deliver, stop, stats, retry)
    assert calls == [1, 2]  # job 1 waits its delay; job 2 is tried, and fails alike
    answers.update({1: True, 2: True})
    retry = {job: (0.0, delay) for job, (_, delay) in retry.items()}  # the delays are over
    _deliver_finished(spool, deliver, stop, stats, retry)
    assert calls == [1, 2, 1, 2] and spool.undelivered() == []
