"""The worker's container carries no torch: importing the worker side must not pull it in."""

from __future__ import annotations

import subprocess
import sys


def test_worker_side_does_not_import_torch():
    code = (
        "import sys\n"
        "import bonexray.worker.app, bonexray.worker.tasks, bonexray.worker.reaper\n"
        "import bonexray.pipeline.batching, bonexray.pipeline.inference\n"
        "import bonexray.pipeline.chunks, bonexray.pipeline.heatmaps, bonexray.jobs\n"
        "import bonexray.modelstore, bonexray.metrics, bonexray.evaluate\n"
        "import bonexray.cli, bonexray.db.store, bonexray.db.query, bonexray.studies\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
