"""The `bonexray` command line: thin click commands that parse, call one function of the
library, and print through one output contract (render.py).

base.py      the group, shared options, settings, the database, the error rule
render.py    --format table|json|csv, tables that fit 80 columns
data.py      synth, import
training.py  train, export
running.py   run, enqueue, worker, status, requeue
reports.py   results, jobs, evaluate, export-predictions
admin.py     models, db, bench
"""

from __future__ import annotations

from bonexray.cli import admin, data, reports, running, training  # noqa: F401  (commands)
from bonexray.cli.base import cli
from bonexray.cli.running import progress_line

__all__ = ["cli", "main", "progress_line"]


def main() -> None:
    cli(prog_name="bonexray")
