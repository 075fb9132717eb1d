"""Against a real PACS (Debian's Orthanc with its DICOMweb plugin, on loopback high ports):
studies routed from Orthanc to `bonexray listen`, scored, and their SR found back in
Orthanc over QIDO-RS; `send-results` by STOW-RS once per study and model; an SR routed
back never becomes a view; a destination that is away leaves failures visible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")
pydicom = pytest.importorskip("pydicom")

from pydicom.uid import generate_uid  # noqa: E402

from bonexray.export.cheap import write_cheap_model  # noqa: E402
from tests.cli_helpers import bonexray  # noqa: E402
from tests.test_dicom_studies import radiograph, save  # noqa: E402
from tests.test_listener import Listener, free_port, jobs, results, wait_for  # noqa: E402

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = pytest.mark.skipif(
    (ORTHANC is None or not DICOMWEB_PLUGIN.exists()) and not os.environ.get("CI"),
    reason="Debian's orthanc and orthanc-dicomweb are not installed")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


class OrthancServer:
    def __init__(self, root: Path, modalities: dict[str, list[Any]]) -> None:
        self.http, self.dicom = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        config = {
            "Name": "bonexray-test", "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DeidentifyLogs": True, "DicomModalities": modalities,
            "DicomCheckCalledAet": False, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "HttpTimeout": 30,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = root / "orthanc.log"
        assert ORTHANC is not None
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._up, 60, f"Orthanc ({self.log})")

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, OSError):
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def post(self, path: str, body: bytes, content_type: str = "application/octet-stream"
             ) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def qido_series(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.url}/dicom-web/studies/{study_uid}/series?Modality={modality}",
            headers={"Accept": "application/dicom+json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


    def put(self, path: str, body: Any) -> None:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         method="PUT")
        urllib.request.urlopen(request, timeout=30).close()

    def delete(self, path: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + path, method="DELETE"),
                               timeout=30).close()


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the test session, stopped with SIGTERM at its end."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), {})
    try:
        yield server
    finally:
        server.stop()
    assert "Doe" not in server.log.read_text()  # DeidentifyLogs


@pytest.fixture
def world(tmp_path: Path, orthanc_server: OrthancServer) -> Iterator[dict[str, Any]]:
    orthanc = orthanc_server
    for study in orthanc.get("/studies"):  # each test starts from an empty PACS
        orthanc.delete(f"/studies/{study}")
    listen_port = free_port()
    orthanc.put("/modalities/bonexray", {"AET": "BONEXRAY", "Host": "127.0.0.1",
                                         "Port": listen_port})
    model = write_cheap_model(tmp_path / "cheap.onnx", image_size=32)
    env = {"BONEXRAY_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    uid = generate_uid()
    files = [save(tmp_path / "files" / f"cr{k}.dcm", radiograph(uid, part="WRIST"))
             for k in range(2)]
    started: list[Listener] = []
    try:
        yield {"orthanc": orthanc, "model": model, "env": env, "uid": uid, "files": files,
               "listen_port": listen_port, "listeners": started, "tmp": tmp_path}
    finally:
        for listener in started:
            listener.stop(signal.SIGKILL)


def upload(orthanc: OrthancServer, files: list[Path]) -> str:
    study = ""
    for path in files:
        study = orthanc.post("/instances", path.read_bytes(), "application/dicom")["ParentStudy"]
    return study


def test_orthanc_routes_a_study_to_listen_and_gets_its_sr_back(world: dict[str, Any]) -> None:
    orthanc = world["orthanc"]
    study = upload(orthanc, world["files"])
    listener = Listener(world["tmp"], "--model", world["model"], "--embedded", "--spool",
                        str(world["tmp"] / "spool"), "--stable-seconds", "1", "--allow",
                        "ORTHANC", "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom}",
                        env=world["env"], port=world["listen_port"])
    world["listeners"].append(listener)
    orthanc.post("/modalities/bonexray/store", study.encode())
    rows = wait_for(lambda: [r for r in results(world["env"]) if r["status"] == "done"],
                    what="the routed study's result")
    assert [r["study"] for r in rows] == [f"{world['uid']}/wrist"]
    series = wait_for(lambda: orthanc.qido_series(world["uid"], "SR"), 60, "the SR in Orthanc")
    assert len(series) == 1
    assert series[0]["0020000D"]["Value"] == [world["uid"]]  # in the study it reports on
    job = jobs(world["env"])[0]["job"]
    status = json.loads(bonexray("status", str(job), "--json", env=world["env"]).stdout)
    assert status["deliveries"]["sent"] == 1 and status["deliveries"]["failed"] == 0
    # The SR routed to the listener (as a PACS rule might): refused at association, never
    # spooled, never a view of a job.
    (sr_instance,) = [i["ID"] for i in orthanc.get(f"/studies/{study}/instances")
                      if i["MainDicomTags"]["SOPInstanceUID"] not in
                      {pydicom.dcmread(f).SOPInstanceUID for f in world["files"]}]
    with pytest.raises(urllib.error.HTTPError):
        orthanc.post("/modalities/bonexray/store", sr_instance.encode())
    time.sleep(3)  # a tick or two for a (wrong) new job
    spooled = [p for p in (world["tmp"] / "spool").rglob("*.dcm")]
    assert len(spooled) == 2 and len(jobs(world["env"])) == 1
    assert len(orthanc.get(f"/studies/{study}/instances")) == 3  # 2 CR + 1 SR, no more


def test_send_results_by_stow_once_per_study_and_model(world: dict[str, Any]) -> None:
    orthanc, env = world["orthanc"], world["env"]
    bonexray("run", str(world["files"][0].parent), "--model", world["model"], env=env)
    stow = f"{orthanc.url}/dicom-web"
    first = json.loads(bonexray("send-results", "--to", stow, "--json", env=env).stdout)
    assert (first["sent"], first["failed"]) == (1, 0)
    series = orthanc.qido_series(world["uid"], "SR")
    assert len(series) == 1
    again = json.loads(bonexray("send-results", "--to", stow, "--json", env=env).stdout)
    assert (again["sent"], again["already"]) == (0, 1)
    assert len(orthanc.qido_series(world["uid"], "SR")) == 1
    # A destination that is away: the failure is kept and shown, exit 1; later it goes.
    away = f"NOBODY@127.0.0.1:{free_port()}"
    failed = bonexray("send-results", "--to", away, "--json", env=env, check=False)
    assert failed.returncode in (1, 2), failed.stderr
    job = jobs(env)[0]["job"]
    status = json.loads(bonexray("status", str(job), "--json", env=env, check=False).stdout)
    assert status["deliveries"]["failed"] == 1 and status["deliveries"]["last_error"]


def test_pull_retrieves_radiographs_by_dicomweb_resumably_and_once(world: dict[str, Any]
                                                                 ) -> None:
    from tests.test_dicom_studies import structured_report

    orthanc, env, tmp = world["orthanc"], world["env"], world["tmp"]
    hand_uid = generate_uid()
    hand = [save(tmp / "files" / f"hand{k}.dcm", radiograph(hand_uid, part="HAND"))
            for k in range(3)]
    sr = save(tmp / "files" / "sr.dcm", structured_report(hand_uid))
    upload(orthanc, world["files"])
    upload(orthanc, [*hand, sr])
    spool = tmp / "spool"
    # A pull killed halfway: one instance of the hand study is in the spool already.
    from bonexray.listener import Spool

    Spool(spool).store(hand_uid, pydicom.dcmread(hand[0]).SOPInstanceUID,
                       hand[0].read_bytes())
    kept = next((spool / hand_uid).glob("*.dcm"))
    before = kept.stat().st_mtime_ns
    web = f"{orthanc.url}/dicom-web"
    first = json.loads(bonexray("pull", web, "--model", world["model"], "--embedded",
                                "--spool", str(spool), "--json", env=env).stdout)
    assert (first["studies"], first["retrieved"], first["present"]) == (2, 4, 1)
    assert len(first["jobs"]) == 2 and kept.stat().st_mtime_ns == before
    rows: dict[str, Any] = {}
    for job in first["jobs"]:
        rows.update({r["study"]: r for r in json.loads(
            bonexray("results", str(job), "--json", env=env).stdout)})
    assert set(rows) == {f"{world['uid']}/wrist", f"{hand_uid}/hand"}
    assert len(rows[f"{hand_uid}/hand"]["views"]) == 3  # the SR was never retrieved
    assert len(list((spool / hand_uid).glob("*.dcm"))) == 3
    # Again: both studies are scored with this model; nothing is retrieved or sent.
    again = json.loads(bonexray("pull", web, "--model", world["model"], "--embedded",
                                "--spool", str(spool), "--json", env=env).stdout)
    assert (again["skipped"], again["retrieved"], again["jobs"]) == (2, 0, [])
    # Filters: a body part, and an accession number.
    wrist = json.loads(bonexray("pull", web, "--model", world["model"], "--embedded",
                                "--spool", str(tmp / "spool2"), "--body-part", "wrist",
                                "--force", "--json", env=env).stdout)
    assert wrist["retrieved"] == 2 and len(wrist["jobs"]) == 1
    by_accession = json.loads(bonexray(
        "pull", web, "--model", world["model"], "--embedded", "--spool", str(tmp / "spool3"),
        "--accession", "ACC" + hand_uid[-6:], "--force", "--json", env=env).stdout)
    assert (by_accession["studies"], by_accession["retrieved"]) == (1, 3)
    # With --embedded --send-to, each pulled study's SR goes back at once (STOW-RS here).
    before = len(orthanc.qido_series(hand_uid, "SR"))  # the SR uploaded with the study
    back = json.loads(bonexray(
        "pull", web, "--model", world["model"], "--embedded", "--spool", str(tmp / "spool4"),
        "--accession", "ACC" + hand_uid[-6:], "--force", "--send-to", web, "--json",
        env=env).stdout)
    assert (back["sr_sent"], back["sr_failed"]) == (1, 0)
    assert len(orthanc.qido_series(hand_uid, "SR")) == before + 1


def test_a_routed_study_scored_by_a_real_worker_comes_back_as_sr(
        world: dict[str, Any], pg_url: str, redis_url: str) -> None:
    """The deployment's path: Orthanc routes, the listener enqueues (no --embedded), a
    `bonexray worker` process scores from Redis and Postgres, the listener sees the job
    finished and sends the SR back by C-STORE."""
    import uuid

    from tests.cli_helpers import BONEXRAY

    orthanc, tmp = world["orthanc"], world["tmp"]
    env = {"BONEXRAY_DATABASE_URL": pg_url, "BONEXRAY_BROKER_URL": redis_url,
           "BONEXRAY_QUEUE": f"pacs-{uuid.uuid4().hex[:8]}"}
    study = upload(orthanc, world["files"])
    log = (tmp / "worker.log").open("w")
    worker = subprocess.Popen([*BONEXRAY, "worker", "--pool", "solo", "--hostname",
                               f"pacs-{os.getpid()}@%h"], env={**os.environ, **env},
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listener = Listener(tmp, "--model", world["model"], "--spool", str(tmp / "spool"),
                            "--stable-seconds", "1", "--send-to",
                            f"ORTHANC@127.0.0.1:{orthanc.dicom}", env=env,
                            port=world["listen_port"])
        world["listeners"].append(listener)
        orthanc.post("/modalities/bonexray/store", study.encode())
        series = wait_for(lambda: orthanc.qido_series(world["uid"], "SR"), 180,
                          "the SR scored by the worker")
        assert len(series) == 1
        rows = [r for r in json.loads(bonexray("results", "--json", env=env).stdout)
                if r["study"] == f"{world['uid']}/wrist"]
        assert rows and rows[0]["status"] == "done"
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()
    assert "bonexray.classify_chunk" in (tmp / "worker.log").read_text()
