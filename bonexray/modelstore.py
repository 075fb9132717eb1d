"""The model store: registered model files kept by sha256 on storage every node mounts."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from bonexray.errors import BonexrayError

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
