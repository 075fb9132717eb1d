"""Deployment files: the compose file validates, and matches what the code expects."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bonexray.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose(env_example) -> dict:
    """The compose file as Compose itself resolves it with .env.example as .env."""
    text = COMPOSE.read_text()

    def substitute(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if name in env_example:
            return env_example[name]
        assert op != ":?", f"{name} is required by the compose file but not in .env.example"
        return default

    resolved = re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", substitute,
                      text.replace("$$", "\0")).replace("\0", "$")
    return yaml.safe_load(resolved)


def test_compose_validates_with_docker_compose(tmp_path):
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed; .ci/run installs it")
        pytest.skip("docker-compose (Debian's v1.29) not installed here")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    for profile in ([], ["--profile", "multigpu"], ["--profile", "train"]):
        result = subprocess.run([tool, *profile, "config", "-q"], cwd=tmp_path,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_services_and_their_contracts(compose):
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "worker-multigpu", "flower",
            "trainer"} <= set(services)
    # Redis keeps queued chunks across a restart.
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] \
        == "yes"
    for name in ("redis", "postgres"):
        assert services[name]["healthcheck"]["test"]
        assert any(str(v).endswith(("/data", "/var/lib/postgresql/data"))
                   for v in services[name]["volumes"])
    assert services["migrate"]["command"] == ["bonexray", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    worker = services["worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert "--concurrency" in worker["command"] and "prefork" in worker["command"]
    assert worker["restart"] == "unless-stopped" and worker["stop_signal"] == "SIGTERM"
    assert all(v.endswith(":ro") for v in worker["volumes"])
    multi = services["worker-multigpu"]
    assert multi["profiles"] == ["multigpu"] and "--gpus" in multi["command"]
    assert multi["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert services["trainer"]["profiles"] == ["train"]
    assert services["trainer"]["build"]["target"] == "trainer"
    assert services["migrate"]["build"]["target"] == "worker"
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    # Flower's /metrics has no auth: loopback only, whatever PUBLISH_ADDR is.
    assert all(str(p).startswith("127.0.0.1:") for p in services["flower"]["ports"])
    # Redis asks for a password, and every client of it has one.
    redis_cmd = services["redis"]["command"]
    password = redis_cmd[redis_cmd.index("--requirepass") + 1]
    assert password and services["redis"]["environment"]["REDISCLI_AUTH"] == password
    assert services["flower"]["environment"]["CELERY_BROKER_URL"].startswith(
        f"redis://:{password}@")
    # Workers read views only under the archive and the spool they mount.
    data_dir, spool = worker["volumes"][0].split(":")[1], worker["volumes"][2].split(":")[1]
    assert worker["environment"]["BONEXRAY_DATA_ROOTS"] == f"{data_dir}:{spool}"
    assert worker["environment"]["BONEXRAY_SPOOL_DIR"] == spool
    # The PACS listener: optional, writes the spool the workers read, no GPU.
    listener = services["listener"]
    assert listener["profiles"] == ["pacs"] and listener["command"][:2] == ["bonexray", "listen"]
    assert listener["volumes"] == [f"{spool}:{spool}"] and "deploy" not in listener
    assert listener["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_environment_names_match_the_settings(compose):
    fields = {f"BONEXRAY_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        unknown = [k for k in env if k.startswith("BONEXRAY_") and k not in fields]
        assert not unknown, f"{name}: {unknown} are not settings"
    env = compose["services"]["worker"]["environment"]
    assert env["BONEXRAY_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["BONEXRAY_DATABASE_URL"]
    password = compose["services"]["redis"]["command"][-1]
    assert env["BONEXRAY_BROKER_URL"] == f"redis://:{password}@redis:6379/0"
    assert env["BONEXRAY_MODEL_STORE"] == compose["services"]["worker"]["volumes"][1].split(":")[1]


def test_no_secrets_in_committed_files():
    text = COMPOSE.read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    # Every password-like value comes from the environment (${...}), none is written here.
    assert not re.search(r"(?i)(password|secret|token)[\"']?\s*:\s+(?!\$\{)\S", text)
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()


def test_dockerfile_targets():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I)
    assert {"worker", "trainer"} <= set(stages)
    worker = text.split("AS worker", 1)[1].split("AS trainer", 1)[0]
    # No torch in the worker; the DICOM codecs are in.
    assert 'pip install -c constraints.txt ".[dicom]" ' in worker and "[train]" not in worker
    assert re.search(r"^USER\s+bonexray", worker, flags=re.M)
    assert "HEALTHCHECK" in worker
    # onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9: the base image must match.
    base = re.search(r"CUDA_RUNTIME_IMAGE=(\S+)", text).group(1)
    assert base.startswith("nvidia/cuda:13.") and "cudnn" in base and "runtime" in base


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_installs_are_pinned_by_the_lock() -> None:
    """constraints.txt pins every dependency pyproject names (all extras, dev tools too),
    to one version, and every install path (make, CI through make, the Dockerfile's both
    targets) installs through it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    names = {_canonical(re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0]) for req in wanted}
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not pinned to one version: {line!r}"
            assert _canonical(name) not in pins, f"pinned twice: {name}"
            pins[_canonical(name)] = version.strip()
    missing = names - set(pins)
    assert not missing, f"constraints.txt lacks {sorted(missing)}: run 'make lock'"
    # onnxruntime and onnxruntime-gpu both own the `onnxruntime` module: never both.
    assert "onnxruntime" not in pins and "onnxruntime-gpu" in pins
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[train,report,dev,dicom]'" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    dockerfile = DOCKERFILE.read_text()
    assert "constraints.txt ./" in dockerfile
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert len(installs) == 2 and all("-c constraints.txt" in i for i in installs)
    gpu = re.search(r'"onnxruntime-gpu==([0-9.]+)\.\*"', dockerfile)
    assert gpu and pins["onnxruntime-gpu"].startswith(gpu.group(1) + ".")


def test_one_port_per_service_inside_and_outside(compose) -> None:
    """Postgres and Redis listen on the published port inside the network too, so the URLs
    (built with POSTGRES_PORT / REDIS_PORT) are right on this host and on added nodes."""
    env = compose["services"]["worker"]["environment"]
    db_port = compose["services"]["postgres"]["environment"]["PGPORT"]
    assert f"@postgres:{db_port}/" in env["BONEXRAY_DATABASE_URL"]
    redis_cmd = compose["services"]["redis"]["command"]
    redis_port = redis_cmd[redis_cmd.index("--port") + 1]
    assert f"@redis:{redis_port}/0" in env["BONEXRAY_BROKER_URL"]
    published = [str(p) for p in compose["services"]["redis"]["ports"]]
    assert any(p.endswith(f":{redis_port}:{redis_port}") for p in published)
    trainer = compose["services"]["trainer"]
    assert trainer["environment"]["TORCH_HOME"] == "/torch"
    assert any(str(v).endswith(":/torch/hub/checkpoints:ro") for v in trainer["volumes"])
