"""Running the real `bonexray` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

BONEXRAY = [sys.executable, "-m", "bonexray.cli"]


def bonexray(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `bonexray ARGS`; with check, a non-zero exit fails with both output streams."""
    result = subprocess.run([*BONEXRAY, *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"bonexray {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result
