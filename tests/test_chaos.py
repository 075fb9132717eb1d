"""benchmarks/chaos.py at a tiny size: it runs, and its figures meet the targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_chaos_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--studies", "12", "--only",
         "lost_view", "requeue_while_running", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["scenario"] for r in lines] == ["lost_view", "requeue_while_running"]
    for r in lines:
        assert "error" not in r, r
        assert (r["studies"], r["scored"], r["lost"], r["duplicated"], r["wrongly_failed"],
                r["human_commands"]) == (12, 12, 0, 0, 0, 0), r
        assert r["seconds_to_finish"] is not None
    assert lines[0]["partial"] == 2 and lines[0]["views_failed"] == 2
