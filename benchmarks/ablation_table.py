"""The ablation table of issue 18: every recipe's test AUROC per seed against a baseline
recipe, with paired bootstrap intervals. The baseline is the files named defaults_...: the
trainer's defaults when those runs were made (stretch; letterbox is the default since).

    python benchmarks/ablation_table.py [--scores benchmarks/scores] [--budget 8ep_128px] \
        [--baseline defaults] [--resamples 2000] [--markdown]

Score files are named RECIPE_BUDGET_seedS.json (what `bonexray train --out RUN` writes to
RUN/test.json, or `plain_loop.py --out`), e.g. defaults_8ep_128px_seed1.json or
loss-weights-body-part_8ep_128px_seed2.json. Each recipe is compared with the baseline on
the seeds both have (the mean column averages all of a recipe's seeds; the JSON and the
table's "paired seeds" column name the paired ones): the difference of the means over those
seeds, with an interval that resamples the same test studies for every run
(benchmarks/compare_runs.py). A recipe with no seed in common with the baseline is listed
with no difference.

Prints one JSON object (or, with --markdown, a table for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_runs import compare, load_runs  # noqa: E402

from bonexray.metrics import auroc  # noqa: E402

NAME = re.compile(r"^(?P<recipe>.+)_(?P<budget>[^_]+_[^_]+)_seed(?P<seed>\d+)\.json$")


def find_scores(folder: Path, budget: str) -> dict[str, dict[int, Path]]:
    """{recipe: {seed: file}} for the score files of one budget."""
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.name)
        if match and match["budget"] == budget:
            found[match["recipe"]][int(match["seed"])] = path
    return dict(found)


def table(found: dict[str, dict[int, Path]], baseline: str, *, resamples: int,
          seed: int) -> list[dict[str, object]]:
    if baseline not in found:
        raise SystemExit(f"no score files for the baseline recipe {baseline!r}")
    base = found[baseline]
    first = load_runs([next(iter(base.values()))])
    labels, _, studies = first[0]
    if studies is None:
        print("warning: the baseline's files name no studies; runs are paired by position "
              "only", file=sys.stderr)
    rows: list[dict[str, object]] = []
    for recipe in [baseline] + sorted(r for r in found if r != baseline):
        files = found[recipe]
        runs = load_runs(list(files.values()), labels, studies)
        per_seed = {s: round(auroc(labels, scores), 6)
                    for s, (_, scores, _) in zip(files, runs, strict=True)}
        row: dict[str, object] = {"recipe": recipe, "auroc_by_seed": per_seed,
                                  "mean_auroc": round(sum(per_seed.values()) / len(per_seed), 6)}
        common = sorted(set(files) & set(base))
        if recipe != baseline and common:
            mine = [files[s] for s in common]
            theirs = [base[s] for s in common]
            report = compare({recipe: load_runs(mine, labels, studies),
                              baseline: load_runs(theirs, labels, studies)},
                             {recipe: mine, baseline: theirs}, resamples=resamples, seed=seed)
            diff = report[f"{recipe}_minus_{baseline}"]
            row["paired_seeds"] = common
            row[f"minus_{baseline}"] = diff
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]], baseline: str) -> str:
    seeds = sorted({s for r in rows for s in r["auroc_by_seed"]})  # type: ignore[attr-defined]
    head = ["recipe"] + [f"seed {s}" for s in seeds] + [
        "mean", "paired seeds", f"minus {baseline} (paired 95%)", "ahead in"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        by_seed = row["auroc_by_seed"]
        cells = [f"`{row['recipe']}`"] + [
            f"{by_seed[s]:.3f}" if s in by_seed else "-" for s in seeds]  # type: ignore[operator,index]
        cells.append(f"{row['mean_auroc']:.3f}")
        diff = row.get(f"minus_{baseline}")
        if diff:
            low, high = diff["ci95"]  # type: ignore[index]
            cells.append(", ".join(str(s) for s in row["paired_seeds"]))  # type: ignore[attr-defined]
            cells.append(f"{diff['auroc']:+.3f} ({low:+.3f} to {high:+.3f})")  # type: ignore[index]
            cells.append(f"{diff['share_of_resamples_above_0']:.0%}")  # type: ignore[index]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", type=Path,
                        default=Path(__file__).resolve().parent / "scores")
    parser.add_argument("--budget", default="8ep_128px")
    parser.add_argument("--baseline", default="defaults")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    found = find_scores(args.scores, args.budget)
    rows = table(found, args.baseline, resamples=args.resamples, seed=args.seed)
    if args.markdown:
        print(markdown(rows, args.baseline))
    else:
        print(json.dumps({"budget": args.budget, "baseline": args.baseline,
                          "resamples": args.resamples, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
