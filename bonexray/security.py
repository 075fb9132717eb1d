"""Confinement to BONEXRAY_DATA_ROOTS: jobs read only inside them, and no symlink leads out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from bonexray.errors import BonexrayError
from bonexray.imaging import ImageError
from bonexray.settings import get_settings


class PathNotAllowedError(BonexrayError, PermissionError):
    """A folder or file lies outside BONEXRAY_DATA_ROOTS (or a symlink leads out of them)."""


def parse_data_roots(raw: str) -> tuple[str, ...]:
    """The real (symlink-free, absolute) paths of a ':'-separated list; empty = no confinement."""
    return tuple(os.path.realpath(os.path.expanduser(p.strip()))
                 for p in raw.split(":") if p.strip())


def data_roots(roots: Sequence[str] | None = None) -> tuple[str, ...]:
    """`roots` made real, or the settings' BONEXRAY_DATA_ROOTS when None."""
    if roots is None:
        return parse_data_roots(get_settings().data_roots)
    return tuple(os.path.realpath(r) for r in roots)


def is_within(path: str | Path, roots: Sequence[str]) -> bool:
    """True when `path`, every symlink resolved, lies inside one of `roots` (already real)."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def check_folder(path: str | Path, roots: Sequence[str] | None = None) -> None:
    """Refuse a folder to search (enqueue, run, requeue) outside the data roots, if any."""
    allowed = data_roots(roots)
    if allowed and not is_within(Path(path).expanduser(), allowed):
        raise PathNotAllowedError(
            f"{path} is outside BONEXRAY_DATA_ROOTS ({len(allowed)} root(s) allowed); "
            "symlinks are resolved before the check"
        )


def check_view(path: str, roots: Sequence[str]) -> None:
    """Refuse to read a view file that is (or links to) a file outside `roots` (already real).

    Raised as an ImageError so that the view fails with its reason and its study goes on.
    """
    if roots and not is_within(path, roots):
        raise ImageError("outside BONEXRAY_DATA_ROOTS (or a symlink out of them): not read")
