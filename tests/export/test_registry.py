"""The model registry from the CLI: add, list, names everywhere, and sha256 refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from bonexray.cli import cli
from bonexray.export.cheap import write_cheap_model
from bonexray.modelstore import sha256_file


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for k in range(2):
        folder = root / f"study{k}"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((40, 40), 60 * (k + 1), dtype=np.uint8)).save(
            folder / "image1.png")
    return root


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_models_add_and_list(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "fresh_pg_url")
    first = write_cheap_model(tmp_path / "first.onnx", image_size=32, threshold=0.3)
    second = write_cheap_model(tmp_path / "second.onnx", image_size=48)
    proto = onnx.load(second)  # as an fp16 export judged on a GPU worker's provider says
    entry = proto.metadata_props.add()
    entry.key, entry.value = "validated_on", json.dumps({"provider": "CUDAExecutionProvider"})
    onnx.save(proto, second)
    code, out, err = invoke("models", "add", first, "--name", "wrist-v1", "--db", url)
    assert code == 0, err
    assert f"model 'wrist-v1': sha256 {sha256_file(first)}" in out
    code, out, err = invoke("models", "add", second, "--db", url, "--json")
    assert code == 0, err
    added = json.loads(out)
    assert added["model"] == "second" and added["metadata"]["input_size"] == "48"

    code, out, err = invoke("models", "list", "--db", url, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["model"], r["sha256"], r["path"]) for r in rows] == [
        ("wrist-v1", sha256_file(first), str(Path(first).resolve())),
        ("second", sha256_file(second), str(Path(second).resolve())),
    ]
    assert rows[0]["metadata"]["threshold"] == "0.3"
    code, out, _ = invoke("models", "list", "--db", url)
    assert code == 0 and "wrist-v1" in out and "second" in out and "2 registered models" in out
    # Which provider each file was validated on: the fp16 one on CUDA, the other unknown.
    lines = out.splitlines()
    assert any("second" in line and "CUDA" in line for line in lines)
    assert any("wrist-v1" in line and "unknown" in line for line in lines)

    # The same file again: the registry knows it by sha256 and says so.
    code, out, _ = invoke("models", "add", first, "--name", "other", "--db", url)
    assert code == 0 and "model 'wrist-v1'" in out and "not applied" in out
    # A name taken by another file is refused in one line.
    third = write_cheap_model(tmp_path / "third.onnx", image_size=40)
    code, _, err = invoke("models", "add", third, "--name", "wrist-v1", "--db", url)
    assert code != 0 and "name 'wrist-v1' is taken by another file" in err


def test_models_add_refuses_a_file_without_metadata(tmp_path: Path, sqlite_url: str) -> None:
    path = write_cheap_model(tmp_path / "m.onnx")
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, path)
    code, _, err = invoke("models", "add", path, "--db", sqlite_url)
    assert code != 0
    assert "lacks bonexray metadata (bonexray_format, architecture" in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = invoke("models", "list", "--db", sqlite_url, "--format", "json")
    assert code == 0 and json.loads(out) == []


def test_run_by_name_refuses_a_tampered_model(studies: Path, tmp_path: Path,
                                              sqlite_url: str) -> None:
    path = Path(write_cheap_model(tmp_path / "model.onnx", image_size=32))
    code, _, err = invoke("models", "add", str(path), "--name", "cheap", "--db", sqlite_url)
    assert code == 0, err
    code, out, err = invoke("run", str(studies), "--model", "cheap", "--db", sqlite_url,
                            "--json")
    assert code == 0, err
    assert json.loads(out)["studies"] == 2

    registered = sha256_file(path)
    path.write_bytes(path.read_bytes() + b"\0")  # still a loadable ONNX file, another sha256
    # A new process, as a later `bonexray run` is (this one keeps the verified session).
    proc = subprocess.run([sys.executable, "-m", "bonexray.cli", "run", str(studies),
                           "--model", "cheap", "--db", sqlite_url],
                          capture_output=True, text=True, timeout=120)
    code, err = proc.returncode, proc.stderr
    assert code != 0
    assert "Traceback" not in err
    assert "sha256 mismatch" in err and registered[:16] in err
    assert "refusing to load a changed model file" in err
    # The model is loaded before a job is registered: the refused run leaves no job behind
    # (the only job is still the earlier, finished one).
    code, out, _ = invoke("jobs", "--db", sqlite_url, "--format", "json")
    jobs = json.loads(out)
    assert len(jobs) == 1 and jobs[0]["queued"] == 0
