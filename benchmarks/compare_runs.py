"""Test-split figures of training runs, with bootstrap intervals, and the paired difference
between two recipes (e.g. `bonexray train`'s defaults against benchmarks/plain_loop.py).

    python benchmarks/compare_runs.py --a RUN/test.json ... --b SCORES.json ... \
        [--names defaults plain] [--resamples 2000]

Each file holds "scores" and "labels" of the same test studies, paired by "studies" when
the files name them, else by position (what
`bonexray train` writes to OUT/test.json and `plain_loop.py --out` writes). Prints one
JSON object: each run's AUROC with its 95% percentile bootstrap interval (studies
resampled), each recipe's mean over its runs (seeds), and the difference of the means with
a paired bootstrap interval (the same resampled studies for every run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bonexray.metrics import auroc, bootstrap_ci


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Labels, scores and study names; when the file names its studies, in sorted study
    order (so that files which list the same studies in other orders pair up)."""
    data = json.loads(path.read_text())
    labels = np.asarray(data["labels"], dtype=np.int64)
    scores = np.asarray(data["scores"], dtype=float)
    studies = data.get("studies")
    if studies:
        order = np.argsort(np.asarray(studies, dtype=object).astype(str), kind="stable")
        return labels[order], scores[order], [studies[i] for i in order]
    return labels, scores, studies


def _paired_auroc(labels: np.ndarray, runs: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """AUROC of each run on each resample: [resamples, runs]."""
    out = np.empty((len(idx), len(runs)))
    for r, draw in enumerate(idx):
        y = labels[draw]
        for k, scores in enumerate(runs):
            out[r, k] = auroc(y, scores[draw]) if 0 < y.sum() < len(y) else np.nan
    return out


Run = tuple[np.ndarray, np.ndarray, "list[str] | None"]


def load_runs(paths: list[Path], labels: np.ndarray | None = None,
              studies: list[str] | None = None) -> list[Run]:
    """Load score files that must all score the same test studies (checked)."""
    runs = [_load(p) for p in paths]
    if labels is None:
        labels, _, studies = runs[0]
    for (y, _, order), path in zip(runs, paths, strict=True):
        if not np.array_equal(y, labels) or (order and studies and order != studies):
            raise SystemExit(f"{path}: its labels or studies differ from the first file's; "
                             "the runs must score the same test studies in the same order")
    return runs


def compare(runs: dict[str, list[Run]], paths: dict[str, list[Path]], *, resamples: int,
            seed: int) -> dict[str, object]:
    """Each run's AUROC with a 95% bootstrap interval, each recipe's mean over its runs, and
    the difference of the two means with a paired interval (the same resampled studies for
    every run of both recipes). runs has exactly two recipes; the first minus the second."""
    labels, _, _ = next(iter(runs.values()))[0]
    report: dict[str, object] = {"studies": int(len(labels)), "abnormal": int(labels.sum()),
                                 "resamples": resamples}
    idx = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))
    means, points = {}, {}
    for name, recipe in runs.items():
        per_run = []
        for (_, scores, _), path in zip(recipe, paths[name], strict=True):
            low, high = bootstrap_ci(labels, scores, resamples=resamples, seed=seed)["auroc"]
            per_run.append({"file": str(path), "auroc": round(auroc(labels, scores), 4),
                            "ci95": [round(low, 4), round(high, 4)]})
        draws = _paired_auroc(labels, [s for _, s, _ in recipe], idx).mean(axis=1)
        means[name] = draws
        point = float(np.mean([auroc(labels, s) for _, s, _ in recipe]))
        points[name] = point
        report[name] = {"runs": per_run, "mean_auroc": round(point, 4),
                        "mean_ci95": [round(float(np.nanpercentile(draws, q)), 4)
                                      for q in (2.5, 97.5)]}
    a, b = runs
    diff = means[a] - means[b]
    report[f"{a}_minus_{b}"] = {
        "auroc": round(points[a] - points[b], 6),  # of the unrounded means
        "ci95": [round(float(np.nanpercentile(diff, q)), 4) for q in (2.5, 97.5)],
        "share_of_resamples_above_0": round(float(np.nanmean(diff > 0)), 4)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True)
    parser.add_argument("--b", nargs="+", type=Path, required=True)
    parser.add_argument("--names", nargs=2, default=("a", "b"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.names[0] == args.names[1]:
        raise SystemExit("--names: the two recipes need different names")

    first = load_runs(args.a)
    labels, _, studies = first[0]
    runs = {args.names[0]: first, args.names[1]: load_runs(args.b, labels, studies)}
    if studies is None:
        print("warning: the files name no studies; runs are paired by position only",
              file=sys.stderr)
    paths = {args.names[0]: list(args.a), args.names[1]: list(args.b)}
    print(json.dumps(compare(runs, paths, resamples=args.resamples, seed=args.seed),
                     indent=1))


if __name__ == "__main__":
    main()
