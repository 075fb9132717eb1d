"""The model store: registered files kept by sha256, found by sha256 on every node."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonexray.db.session import open_database
from bonexray.export.cheap import write_cheap_model
from bonexray.jobs import prepare_job, run_embedded
from bonexray.modelstore import (
    local_model_path,
    resolve_model,
    sha256_file,
    store_model_file,
    stored_path,
)
from bonexray.pipeline.inference import ModelLoadError
from bonexray.settings import get_settings


def test_store_copies_once_by_sha256(tmp_path):
    model = write_cheap_model(tmp_path / "m.onnx", image_size=32)
    sha = sha256_file(model)
    store = tmp_path / "store"
    first = store_model_file(model, sha256=sha, store_dir=str(store))
    assert first == stored_path(str(store), sha) and sha256_file(first) == sha
    assert store_model_file(model, sha256=sha, store_dir=str(store)) == first
    assert [p.name for p in store.iterdir()] == [f"{sha}.onnx"]  # no temp files left
    # A node finds its own store's copy by sha256, whatever the registered path was.
    assert local_model_path(registered_path="/elsewhere/m.onnx", sha256=sha,
                            store_dir=str(store)) == first
    assert local_model_path(registered_path="/elsewhere/m.onnx", sha256=sha,
                            store_dir="") == "/elsewhere/m.onnx"


def test_run_with_a_model_store_and_a_tampered_copy(tmp_path, monkeypatch, sqlite_url):
    store = tmp_path / "store"
    monkeypatch.setenv("BONEXRAY_MODEL_STORE", str(store))
    get_settings.cache_clear()
    try:
        study = tmp_path / "data" / "s1"
        study.mkdir(parents=True)
        Image.fromarray(np.full((40, 40), 200, np.uint8)).save(study / "v.png")
        model_file = write_cheap_model(tmp_path / "m.onnx", image_size=32)
        engine = open_database(sqlite_url)
        model = resolve_model(engine=engine, ref=model_file)
        assert Path(model.path).parent == store
        os.unlink(model_file)  # the original is gone: the store's copy is what runs
        job = prepare_job(engine=engine, root=str(tmp_path / "data"), model=model,
                          mode="embedded")
        run_embedded(engine=engine, job=job, settings=get_settings())
        # Tamper with the stored file: the worker refuses it by sha256.
        os.chmod(model.path, 0o644)
        with open(model.path, "ab") as fh:
            fh.write(b"\0")
        from bonexray.pipeline import chunks as process

        process._classifiers.clear()
        job2 = prepare_job(engine=engine, root=str(tmp_path / "data"), model=model,
                           mode="embedded")
        with pytest.raises(ModelLoadError, match="sha256 mismatch"):
            run_embedded(engine=engine, job=job2, settings=get_settings())
    finally:
        get_settings.cache_clear()
