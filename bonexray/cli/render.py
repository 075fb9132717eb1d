"""How commands print: one output contract for every command that prints data.

- `--format table|json|csv` (`--json` is the same as `--format json`). `table` is for
  people; `json` is one JSON value on stdout; `csv` is a header and rows on stdout (a
  single record is one row; nested values are JSON text in their cell).
- The same thing has the same JSON key everywhere: `job` is a job's id, `model` a
  model's registry name, `studies` / `views` counts, `created_at` / `finished_at` ISO 8601
  times in UTC (`+00:00`), `*_s` seconds.
- stdout carries results only; progress bars, notes and warnings go to stderr, so that
  `--format json | jq` and `> file.csv` always work.
- Tables fit 80 columns: numbers never wrap, long paths are shortened in the middle, times
  say UTC, and a limited listing says "N of M".
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

FORMATS = ("table", "json", "csv")
WIDTH = 80  # what a table must fit when stdout is not a terminal


def output_format(func: F) -> F:
    """Add `--format table|json|csv` and its alias `--json`; the command gets `fmt`."""

    @functools.wraps(func)
    def wrapper(*args: Any, fmt: str, as_json: bool, **kwargs: Any) -> Any:
        return func(*args, fmt="json" if as_json else fmt, **kwargs)

    wrapper = click.option("--json", "as_json", is_flag=True,
                           help="Same as --format json.")(wrapper)
    wrapper = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
                           show_default=True,
                           help="table for people; json: one JSON value on stdout; csv: a "
                                "header and rows on stdout.")(wrapper)
    return wrapper  # type: ignore[return-value]


def emit(data: Any, fmt: str, table: Callable[[], None],
         columns: Sequence[str] | None = None) -> None:
    """Print `data` (a record or a list of records) as `fmt` asks; `table` prints it for
    people. csv: one row per record; with `columns`, those keys (a nested value is JSON text
    in its cell), else the first record's keys with nested records flattened (a.b)."""
    if fmt == "json":
        echo_json(data)
    elif fmt == "csv":
        rows = data if isinstance(data, list) else [data]
        write_csv(rows if columns else [flatten(r) for r in rows], columns)
    else:
        table()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str))


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dictionaries become dotted keys; lists stay values (JSON text in a cell)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if columns is None:
        columns = list(rows[0]) if rows else []
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])


def cell(value: Any) -> Any:
    """A value for a CSV cell: empty for None, 0/1 for booleans, JSON for lists."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return value


# ------------------------------------------------------------------------------ text


def fig(value: float | None, digits: int = 3) -> str:
    """A figure, or n/a when it is undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def text(value: Any) -> str:
    return "" if value is None else str(value)


def study_label(key: str, root: str) -> str:
    """A study's key as shown: a folder path relative to the job's root when it lies under
    it; a DICOM key (StudyInstanceUID/part) or any other key as it is."""
    if os.path.isabs(key) and (key == root or key.startswith(root.rstrip("/") + "/")):
        return os.path.relpath(key, root)
    return key


def middle(value: str, width: int) -> str:
    """`value` shortened to `width` characters by cutting its middle ("/data/ar…/study1")."""
    if width <= 0 or len(value) <= width:
        return value
    if width <= 3:
        return value[:width]
    head = (width - 1) // 2
    tail = width - 1 - head
    return f"{value[:head]}…{value[-tail:]}"


def utc(value: str | datetime | None, *, seconds: bool = False) -> str:
    """An ISO time (from JSON) as `YYYY-MM-DD HH:MM` in UTC (the column says UTC)."""
    if value is None or value == "":
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:  # times are stored in UTC
        moment = moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def n_of_m(shown: int, total: int, noun: str) -> str:
    """'8 of 60 studies' when a listing is limited, '60 studies' when it is not."""
    return f"{shown} {noun}" if shown == total else f"{shown} of {total} {noun}"


# ----------------------------------------------------------------------------- tables


def console(*, stderr: bool = False, width: int | None = None) -> Any:
    """A rich console: the terminal's width, or WIDTH (80) when output is piped."""
    from rich.console import Console

    return Console(stderr=stderr, width=width)


def table(title: str, columns: Iterable[tuple[str, str]], *, caption: str | None = None) -> Any:
    """A compact table. columns: (header, kind) with kind `num` (right-aligned, never
    wraps), `key` (never wraps nor shrinks: a row's name), `text` (wraps) or `path` (one
    line, cut with an ellipsis when too long)."""
    from rich import box
    from rich.table import Table

    # One space between columns (the box's), no padding, no outer edge: 80 columns go far.
    out = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 0),
                pad_edge=False, show_edge=False, title_justify="left",
                caption_justify="left")
    out.kinds = []  # type: ignore[attr-defined]  # what print_table needs to size columns
    for header, kind in columns:
        out.kinds.append(kind)  # type: ignore[attr-defined]
        if kind == "num":
            out.add_column(header, justify="right", no_wrap=True, min_width=len(header))
        elif kind == "key":
            out.add_column(header, no_wrap=True)
        elif kind == "path":
            out.add_column(header, no_wrap=True, overflow="ellipsis", ratio=1)
        else:
            out.add_column(header, overflow="fold", min_width=min(len(header), 8))
    return out


def print_table(out: Any) -> None:
    """Print a table from table(). `num` and `key` columns get the width of their widest
    cell; `path` columns share what is left, their cells cut in the middle to fit; `text`
    columns wrap."""
    width = console().width
    kinds = getattr(out, "kinds", [])
    fixed = len(out.columns) - 1  # one space between columns
    paths = []
    for column, kind in zip(out.columns, kinds, strict=False):
        cells = [str(c) for c in column._cells]
        widest = max([len(str(column.header)),
                      *(len(line) for c in cells for line in c.split("\n"))])
        if kind in ("num", "key"):
            column.min_width = widest
            fixed += widest
        elif kind == "path":
            paths.append((column, widest))
        else:
            fixed += min(widest, max(len(str(column.header)), 12))
    if fixed + 8 * len(paths) > width:
        # Numbers and keys alone need more than the terminal has: widen rather than cut a
        # figure (only an extreme table, e.g. very long group names, gets here).
        width = fixed + 8 * len(paths)
    left = max(8 * len(paths), width - fixed)
    for n, (column, widest) in enumerate(paths):
        share = min(widest, max(8, left // (len(paths) - n)))
        left -= share
        column._cells = [middle(str(c), share) for c in column._cells]
        column.width = share
    console(width=width).print(out)
