"""benchmarks/ablation_table.py: recipes paired with the baseline by seed, on made-up scores
whose ranking is known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ablation_table.py"


def _write(folder: Path, name: str, labels: np.ndarray, noise: float, seed: int,
           studies: list[str]) -> None:
    rng = np.random.default_rng(seed)
    scores = labels + rng.normal(0.0, noise, size=len(labels))
    order = rng.permutation(len(labels))  # files may list the studies in any order
    (folder / name).write_text(json.dumps({
        "labels": labels[order].tolist(), "scores": scores[order].tolist(),
        "studies": [studies[i] for i in order]}))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_table_pairs_by_seed_and_ranks_recipes(tmp_path):
    labels = np.array([0] * 150 + [1] * 50)
    studies = [f"test/s{i:03d}" for i in range(len(labels))]
    for seed in (1, 2):
        _write(tmp_path, f"defaults_8ep_128px_seed{seed}.json", labels, 0.8, seed, studies)
        _write(tmp_path, f"sharper_8ep_128px_seed{seed}.json", labels, 0.4, 10 + seed, studies)
        _write(tmp_path, f"blurred_8ep_128px_seed{seed}.json", labels, 2.0, 20 + seed, studies)
    _write(tmp_path, "defaults_8ep_128px_seed3.json", labels, 0.8, 3, studies)
    _write(tmp_path, "sharper_8ep_128px_seed4.json", labels, 0.4, 14, studies)  # no baseline
    _write(tmp_path, "lonely_8ep_128px_seed4.json", labels, 0.8, 4, studies)
    _write(tmp_path, "defaults_4ep_64px_seed1.json", labels, 0.1, 4, studies)  # other budget
    out = _run("--scores", str(tmp_path), "--resamples", "300")
    assert out.returncode == 0, out.stderr
    rows = {r["recipe"]: r for r in json.loads(out.stdout)["rows"]}
    assert list(rows) == ["defaults", "blurred", "lonely", "sharper"]
    assert set(rows["defaults"]["auroc_by_seed"]) == {"1", "2", "3"}
    assert "minus_defaults" not in rows["defaults"]
    assert "minus_defaults" not in rows["lonely"]          # no seed in common
    better, worse = rows["sharper"]["minus_defaults"], rows["blurred"]["minus_defaults"]
    assert rows["sharper"]["paired_seeds"] == [1, 2]
    assert better["ci95"][0] > 0 and better["share_of_resamples_above_0"] > 0.97
    assert worse["ci95"][1] < 0 and worse["share_of_resamples_above_0"] < 0.03
    # the difference is over the paired seeds (1, 2) on both sides, not over all of either
    # recipe's seeds (the baseline has 1-3, sharper 1, 2 and 4)
    def mean12(recipe):
        return sum(rows[recipe]["auroc_by_seed"][s] for s in ("1", "2")) / 2
    assert abs(better["auroc"] - (mean12("sharper") - mean12("defaults"))) < 2e-4

    md = _run("--scores", str(tmp_path), "--resamples", "300", "--markdown")
    assert md.returncode == 0, md.stderr
    lines = md.stdout.splitlines()
    assert lines[0].startswith(
        "| recipe | seed 1 | seed 2 | seed 3 | seed 4 | mean | paired seeds |")
    assert len(lines) == 2 + 4 and "| `lonely` | - | - | - |" in md.stdout
    assert len({line.count("|") for line in lines}) == 1      # every row has every cell
    sharper = next(line for line in lines if line.startswith("| `sharper`"))
    assert sharper.split(" | ")[6] == "1, 2"


def test_files_of_other_studies_are_refused(tmp_path):
    labels = np.array([0] * 30 + [1] * 10)
    studies = [f"s{i}" for i in range(len(labels))]
    _write(tmp_path, "defaults_8ep_128px_seed1.json", labels, 0.5, 1, studies)
    _write(tmp_path, "other_8ep_128px_seed1.json", labels, 0.5, 2,
           [f"t{i}" for i in range(len(labels))])
    out = _run("--scores", str(tmp_path), "--resamples", "50")
    assert out.returncode != 0
    assert "differ from the first file's" in out.stderr
