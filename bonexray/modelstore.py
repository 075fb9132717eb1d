"""Models by name and by sha256: registering a model file (its metadata checked), finding a
registered one, hashing files, and the store that keeps registered files by sha256 on
storage every node mounts."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bonexray.errors import BonexrayError, NotFoundError, one_line
from bonexray.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from bonexray.db.tables import Model

log = logging.getLogger(__name__)


class ModelStoreError(BonexrayError, OSError):
    """The model store folder cannot be used."""


def stored_path(store_dir: str, sha256: str) -> str:
    """Where a model with this sha256 lives in the store."""
    return str(Path(store_dir) / f"{sha256}.onnx")


def store_model_file(path: str, *, sha256: str, store_dir: str) -> str:
    """Copy a model file into the store under its sha256 (atomically; once) and return
    the stored path. Workers on other hosts then find it by sha256, not by the path it
    happened to have on the machine that registered it."""
    target = Path(stored_path(store_dir, sha256))
    if target.is_file():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".onnx")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        raise ModelStoreError(f"cannot store model in {store_dir}: {exc.strerror or exc}") \
            from None
    log.info("model %s… stored in %s", sha256[:12], store_dir)
    return str(target)


def local_model_path(*, registered_path: str, sha256: str, store_dir: str) -> str:
    """The file this process should load: its own store's copy when a store is set (mount
    points may differ between nodes), else the registered path."""
    if store_dir:
        candidate = stored_path(store_dir, sha256)
        if os.path.isfile(candidate):
            return candidate
    return registered_path


class ModelNotFoundError(NotFoundError):
    """--model names neither a registered model nor an existing file."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model_metadata(path: str) -> dict[str, str]:
    """metadata_props of an ONNX file, read through onnxruntime (the worker has no onnx)."""
    import onnxruntime as ort

    from bonexray.pipeline.inference import ModelLoadError

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(path, sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are untyped
        raise ModelLoadError(f"model {path} is not a loadable ONNX model: "
                             f"{one_line(exc, limit=300)}") from None
    return dict(session.get_modelmeta().custom_metadata_map)


def resolve_model(*, engine: Engine, ref: str, name: str | None = None) -> Model:
    """A registered model by name / sha256 / id, or a model file registered on first use."""
    from bonexray.db import query, store
    from bonexray.db.session import session_scope
    from bonexray.modelmeta import parse_metadata
    from bonexray.pipeline.inference import ModelLoadError

    path = Path(ref).expanduser()
    if path.is_file():
        resolved = str(path.resolve())
        sha = sha256_file(resolved)
        try:
            meta = read_model_metadata(resolved)
            parse_metadata(meta, source=f"model {resolved}")
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        store_dir = get_settings().model_store
        if store_dir:
            resolved = store_model_file(resolved, sha256=sha, store_dir=store_dir)
        with session_scope(engine) as session:
            model = store.register_model(session=session, path=resolved, sha256=sha,
                                         meta=meta, name=name)
            session.flush()
            session.expunge(model)
        return model
    with session_scope(engine) as session:
        found = query.get_model(session=session, ref=ref)
        if found is None:
            raise ModelNotFoundError(
                f"--model {ref!r}: no such file and no registered model by that name or sha256"
            )
        session.expunge(found)
    return found
