"""Administration: the model registry (`models`), the schema (`db`) and the throughput
benchmark (`bench`, for operators sizing a fleet rather than an everyday command)."""

from __future__ import annotations

import json
from typing import Any

import click

from bonexray.cli import base
from bonexray.cli.base import apply_overrides, cli, db_option, user_errors
from bonexray.cli.render import emit, output_format, print_table, table, utc
from bonexray.settings import get_settings


@cli.command(short_help="Throughput benchmark, for sizing a fleet.")
@click.option("--quick", is_flag=True, help="Fewer images and repeats (a few minutes here).")
@click.option("--image-size", default=224, show_default=True,
              help="Input size of the benchmark's model, px.")
@click.option("--batch-size", "--batch", "batch", type=click.IntRange(min=1), default=16,
              show_default=True, help="Views per inference batch (--batch: the old name).")
@click.option("--images", default=0, help="Views to generate (default 192, quick 96).")
@click.option("--control-studies", default=0,
              help="Studies for the control-plane figure (default 4000, quick 1500).")
@click.option("--repeats", default=0,
              help="Interleaved repeats; figures are medians (default 5, quick 3).")
@click.option("--dicom-decode", default=0,
              help="2000x2500 DICOM objects per codec for dicom_decode_ips (default 6, "
                   "quick 3).")
@click.option("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
              show_default=True, help="Postgres where a private database is made and dropped.")
@click.option("--broker", "broker_url", default="redis://127.0.0.1:6379/14", show_default=True,
              help="Redis used for the Celery figures (a database of its own).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON here.")
@user_errors
def bench(quick: bool, image_size: int, batch: int, images: int, control_studies: int,
          repeats: int, dicom_decode: int, pg_admin_url: str, broker_url: str,
          out: str | None) -> None:
    """Measure throughput in one run; the last line of stdout is one JSON object."""
    from bonexray.bench import BenchConfig, format_result, run_benchmark

    config = BenchConfig(quick=quick, image_size=image_size, batch=batch, images=images,
                         control_studies=control_studies, repeats=repeats,
                         dicom_decode=dicom_decode, database_url=pg_admin_url,
                         broker_url=broker_url)
    result = run_benchmark(config)
    text = format_result(result)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    click.echo(text)


@cli.group(short_help="The model registry.")
def models() -> None:
    """The model registry: model files known by name and sha256."""


def _model_row(model: Any) -> dict[str, Any]:
    meta = dict(model.meta or {})
    return {"model": model.name, "id": model.id, "sha256": model.sha256, "path": model.path,
            "created_at": None if model.created_at is None else model.created_at.isoformat(),
            "metadata": meta}


@models.command("add", short_help="Register a model file by name.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=None, help="Registry name (default: the file's stem).")
@db_option
@output_format
@user_errors
def models_add(file: str, name: str | None, database_url: str | None, fmt: str) -> None:
    """Register a bonexray model file (its metadata is checked) by name and sha256."""
    from bonexray.modelstore import resolve_model

    apply_overrides(database_url=database_url)
    model = resolve_model(engine=base.engine(), ref=file, name=name)
    note = (f" (already registered under this name; --name {name!r} not applied)"
            if name is not None and model.name != name else "")
    meta = model.meta or {}
    emit(_model_row(model), fmt, lambda: click.echo(
        f"model {model.name!r}: sha256 {model.sha256}, {meta.get('architecture')} "
        f"{meta.get('precision', 'fp32')}, {meta.get('input_size')} px, threshold "
        f"{meta.get('threshold')}; {model.path}{note}"))


def validated_on(meta: dict[str, Any]) -> str:
    """The provider a model file was checked on (its metadata's validated_on), short."""
    raw = meta.get("validated_on")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return raw
    if not isinstance(raw, dict):
        return "unknown"
    return str(raw.get("provider", "unknown")).removesuffix("ExecutionProvider")


@models.command("list", short_help="List the registered models.")
@db_option
@output_format
@user_errors
def models_list(database_url: str | None, fmt: str) -> None:
    """Registered models, oldest first."""
    from bonexray.db.query import list_models
    from bonexray.db.session import session_scope

    apply_overrides(database_url=database_url)
    with session_scope(base.engine(read_only=True)) as session:
        rows = list_models(session=session)
    emit(rows, fmt, lambda: _print_models(rows),
         columns=("model", "id", "sha256", "path", "created_at", "metadata"))


def _threshold(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "" if value is None else str(value)


def _print_models(rows: list[dict[str, Any]]) -> None:
    out = table(f"{len(rows)} registered models, oldest first; times in UTC",
                [("name", "path"), ("sha256", "key"), ("prec", "key"), ("checked", "key"),
                 ("px", "num"), ("thresh", "num"), ("registered", "key"), ("path", "path")])
    for r in rows:
        meta = r["metadata"]
        out.add_row(r["model"], r["sha256"][:12],
                    str(meta.get("precision", "fp32")), validated_on(meta),
                    str(meta.get("input_size", "")), _threshold(meta.get("threshold")),
                    utc(r["created_at"])[:10], r["path"])
    print_table(out)


@cli.group(short_help="Database operations.")
def db() -> None:
    """Database operations."""


@db.command("upgrade", short_help="Bring the schema to the newest migration.")
@db_option
@user_errors
def db_upgrade(database_url: str | None) -> None:
    """Bring the schema to the newest migration (also done by every command on its own)."""
    from bonexray.db.session import open_database
    from bonexray.settings import mask_url

    apply_overrides(database_url=database_url)
    url = get_settings().database_url
    engine = open_database(url)
    click.echo(f"schema at head on {mask_url(engine.url)}")
