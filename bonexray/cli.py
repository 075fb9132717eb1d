"""The `bonexray` command: thin click commands that parse, call one function, and print."""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bonexray.settings import get_settings
from bonexray.trainer.recipes import recipe_help

log = logging.getLogger("bonexray")

F = TypeVar("F", bound=Callable[..., Any])

# Domain errors whose message is for the user: printed as one line, exit status 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, OSError)


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Broker errors are user-facing too (wrong URL, Redis down); kombu is only imported by
    # the commands that talk to a broker, so only look for it once it is loaded.
    if "kombu.exceptions" in sys.modules:
        return (*_USER_ERRORS, sys.modules["kombu.exceptions"].KombuError)
    return _USER_ERRORS


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from bonexray.logs import setup_logging

    setup_logging(level, fmt)


def _apply_overrides(**values: str | int | None) -> None:
    """Command-line options win over BONEXRAY_* variables, in this process and its children."""
    changed = False
    for key, value in values.items():
        if value is not None:
            os.environ[f"BONEXRAY_{key.upper()}"] = str(value)
            changed = True
    if changed:
        get_settings.cache_clear()


def db_option(func: F) -> F:
    return click.option("--db", "database_url", metavar="URL",
                        help="Database URL (default: BONEXRAY_DATABASE_URL, else "
                             "sqlite:///bonexray.db in the working directory).")(func)


def broker_option(func: F) -> F:
    return click.option("--broker", "broker_url", metavar="URL",
                        help="Broker URL (default: BONEXRAY_BROKER_URL, else "
                             "redis://127.0.0.1:6379/0).")(func)


class UserError(click.ClickException):
    """A one-line message for the user; exit status 2 (1 is `status`'s "ended with failures")."""

    exit_code = 2


def user_errors(func: F) -> F:
    """Turn domain errors into a one-line message and exit status 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            if not isinstance(exc, _user_error_types()):
                raise
            if log.isEnabledFor(logging.DEBUG):
                log.debug("traceback", exc_info=True)
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise UserError(f"{type(exc).__name__}: {message}") from None

    return wrapper  # type: ignore[return-value]


def _missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when it does not exist yet (else None)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _engine(*, read_only: bool = False, model_ref: str | None = None) -> Any:
    """The database, schema at head. A SQLite file that does not exist yet is created only
    by a command that writes: a read-only command (results, status, ...) given a mistyped
    path says so instead, and run/enqueue check first that a model file they would be
    given exists (a new database holds no registered model to find by name)."""
    from bonexray.db.session import open_database

    url = get_settings().database_url
    missing = _missing_sqlite_file(url)
    if missing is not None and read_only:
        raise UserError(f"no database at {missing}: nothing has run there yet (check --db or "
                        "BONEXRAY_DATABASE_URL)")
    if missing is not None and model_ref is not None and not Path(model_ref).is_file():
        from bonexray.jobs import ModelNotFoundError

        raise ModelNotFoundError(f"--model {model_ref!r}: no such file (and {missing} does "
                                 "not exist yet, so no model is registered there)")
    return open_database(url)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error", "critical"],
                                case_sensitive=False),
              help="Logging level (default BONEXRAY_LOG_LEVEL, info).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log records as text or JSON lines (default BONEXRAY_LOG_FORMAT, text); "
                   "workers started by this command inherit it.")
@click.version_option(package_name="bonexray")
def cli(log_level: str | None, log_format: str | None) -> None:
    """bonexray: classify musculoskeletal radiograph studies as normal or abnormal."""
    from bonexray.settings import SettingsError

    try:  # every BONEXRAY_* variable is checked here, once, before any command runs
        _apply_overrides(log_level=log_level, log_format=log_format)
        settings = get_settings()
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    _setup_logging(settings.log_level, settings.log_format)


def main() -> None:
    cli(prog_name="bonexray")


# ---------------------------------------------------------------------------- data


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--studies", default=140, show_default=True, help="Number of studies.")
@click.option("--seed", default=0, show_default=True)
@click.option("--image-size", default=256, show_default=True, help="Typical image side, px.")
@click.option("--valid-fraction", default=0.2, show_default=True)
@click.option("--signs", default="fracture,cortical_break,hardware", show_default=True,
              help="Abnormal signs to draw, comma-separated (hardware alone is learnt in "
                   "CPU minutes; thin fractures take far longer).")
@user_errors
def synth(out: str, studies: int, seed: int, image_size: int, valid_fraction: float,
          signs: str) -> None:
    """Write a synthetic MURA-style tree of radiograph-like studies with known labels."""
    from bonexray.synth import write_synthetic_mura

    summary = write_synthetic_mura(out, studies=studies, seed=seed, image_size=image_size,
                                   valid_fraction=valid_fraction,
                                   signs=tuple(s.strip() for s in signs.split(",") if s.strip()))
    splits = ", ".join(f"{name} {count}" for name, count in summary.by_split.items())
    click.echo(f"wrote {summary.studies} studies ({summary.views} views, {summary.abnormal} "
               f"abnormal; {splits}) to {summary.root}")


@cli.group("import")
def import_() -> None:
    """Turn public datasets into the MURA layout (train/valid/test, one folder per study)."""


@import_.command("fracatlas")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the split.")
@click.option("--valid-fraction", default=0.2, show_default=True,
              help="Share of each (body part, label) stratum held out for validation "
                   "(model and threshold choice).")
@click.option("--test-fraction", default=0.2, show_default=True,
              help="Share held out as test/, scored once after training (0: none).")
@click.option("--max-gap", default=3, show_default=True,
              help="Consecutive ids at most this far apart, with the same body-part flags, "
                   "are grouped as one exam (0: no grouping by id).")
@click.option("--near-duplicate", default="0.95", show_default=True,
              help="Images whose detail thumbnails correlate above this are grouped as one "
                   "exam ('off': no visual check).")
@click.option("--link", type=click.Choice(["copy", "hardlink", "symlink"]), default="copy",
              show_default=True, help="How images reach OUT.")
@click.option("--conflicts", type=click.Choice(["skip", "csv", "folder"]), default="skip",
              show_default=True,
              help="An image whose CSV label disagrees with its folder: leave it out, or "
                   "trust the CSV or the folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
@user_errors
def import_fracatlas_cmd(src: str, out: str, seed: int, valid_fraction: float,
                         test_fraction: float, max_gap: int, near_duplicate: str, link: str,
                         conflicts: str, as_json: bool) -> None:
    """FracAtlas (dataset.csv, images/Fractured, images/Non_fractured) -> MURA layout.

    FracAtlas names no patient: images that are likely one exam (consecutive ids of one
    body part, visual near-duplicates) form a group, written as one patient, and whole
    groups are split. The manifest keeps the hardware, multiscan and view flags.
    """
    from bonexray.importers import import_fracatlas

    if near_duplicate.strip().lower() in ("off", "none", "no"):
        threshold: float | None = None
    else:
        try:
            threshold = float(near_duplicate)
        except ValueError:
            raise click.BadParameter(f"{near_duplicate!r} is neither a correlation nor 'off'",
                                     param_hint="--near-duplicate") from None
    report = import_fracatlas(src, out, seed=seed, valid_fraction=valid_fraction,
                              test_fraction=test_fraction, max_gap=max_gap,
                              near_duplicate=threshold, link=link, conflicts=conflicts)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    for name in sorted(report.studies):
        parts = ", ".join(f"{p} {c[0] + c[1]} ({c[1]} abnormal)"
                          for p, c in sorted(report.by_body_part[name].items()))
        click.echo(f"{name}: {report.studies[name]} studies in {report.groups[name]} groups, "
                   f"{report.abnormal[name]} abnormal: {parts}")
    grouping = report.grouping
    click.echo(f"{grouping['groups']} likely-same-exam groups (largest {grouping['largest']}): "
               f"{grouping['consecutive_links']} links by consecutive id, "
               f"{grouping['near_duplicate_pairs']} near-duplicate pairs; split by group")
    click.echo(f"left out {len(report.unreadable)} unreadable images (truncated or corrupt), "
               f"{len(report.label_conflicts)} with a CSV label that disagrees with the "
               f"folder ({report.conflict_rule}); {len(report.missing_files)} listed but "
               f"missing, {len(report.not_in_csv)} not listed; details in "
               f"{report.out}/import_report.json")


# ---------------------------------------------------------------------------- train / export


@cli.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--recipe", type=click.Choice(["default", "mura"]), default="default",
              show_default=True,
              help="Where unset options come from: default (chosen by measurement on real "
                   "radiographs, README) or mura (MURA's published recipe).")
@click.option("--epochs", default=8, show_default=True)
@click.option("--image-size", type=click.IntRange(min=16, max=4096), default=None,
              help=recipe_help("image_size", "Input side in px (MURA used 320, the follow-up "
                                "paper 224)."))
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=recipe_help("batch_size", ""))
@click.option("--lr", type=float, default=None,
              help=recipe_help("lr", "Peak learning rate (auto: 1e-3 from scratch, 1e-4 with "
                                "--weights)."))
@click.option("--optimizer", type=click.Choice(["auto", "adam", "adamw"]), default=None,
              help=recipe_help("optimizer", "auto: AdamW from scratch, Adam with --weights."))
@click.option("--weights", default="none", show_default=True,
              help="none (from scratch), imagenet (torchvision's, from TORCH_HOME), or a "
                   "path to a local DenseNet-169 state dict.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True, help="DataLoader workers.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Cap on steps per epoch (quick runs).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--head", default="", help="Hidden fully connected layers before the logit, "
              "e.g. 512,256 (default: none, DenseNet's single linear layer).")
@click.option("--dropout", default=0.0, show_default=True, help="Dropout p in the head.")
@click.option("--batch-norm/--no-batch-norm", default=False, show_default=True,
              help="BatchNorm after each hidden head layer.")
@click.option("--init", "init_", type=click.Choice(["default", "kaiming", "xavier"]),
              default="default", show_default=True, help="Head initialisation (He, Xavier).")
@click.option("--freeze", default="none", show_default=True,
              help="none, backbone, or all-but-K (only the last K of 4 dense blocks train).")
@click.option("--threshold", default=None,
              help=recipe_help("threshold", "Decision threshold chosen on validation: a "
                                "number, youden, or sensitivity=X; stored in the checkpoint."))
@click.option("--schedule", type=click.Choice(["auto", "onecycle", "plateau", "cosine",
                                               "constant"]), default=None,
              help=recipe_help("schedule", "auto: one-cycle from scratch, divide by 10 on "
                                "plateau with weights."))
@click.option("--rotation", type=float, default=None,
              help=recipe_help("rotation", "Random rotation up to +-degrees; 0 turns it off."))
@click.option("--resize", type=click.Choice(["letterbox", "stretch"]), default=None,
              help=recipe_help("resize", "How views become square: letterbox (keep the "
                                "aspect ratio, pad) or stretch. Stored in the model file, so "
                                "workers decode the same way."))
@click.option("--loss-weights", type=click.Choice(["body-part", "global", "none"]),
              default=None,
              help=recipe_help("loss_weights", "BCE class weights: body-part (MURA: each "
                                "part's abnormal/normal share), global (one share over all "
                                "training views), none."))
@click.option("--checkpoint", "checkpoint_rule",
              type=click.Choice(["best-valid", "last", "ema", "average"]), default=None,
              help=recipe_help("checkpoint", "Which weights become OUT/best.pt: best-valid "
                                "(the epoch with the best validation AUROC), last, ema "
                                "(moving average of the weights, time constant one epoch), "
                                "average (mean of the last --average-last epochs)."))
@click.option("--average-last", type=click.IntRange(min=1), default=None,
              help=recipe_help("average_last", "Epochs averaged by --checkpoint average."))
@click.option("--candidates", is_flag=True,
              help="Also write every --checkpoint rule's weights, validated, to "
                   "OUT/candidates/<rule>.pt (to compare them).")
@click.option("--test", "test_dir", type=click.Path(exists=True, file_okay=False),
              default=None, help="Labelled test studies, scored once after the last epoch "
              "with the kept weights and threshold (default: DATA's test/ split, if any).")
@click.option("--snapshots", default=0, show_default=True, type=click.IntRange(min=0),
              help="Keep the last K epochs' weights as OUT/epoch<N>.pt (export several as a "
                   "snapshot ensemble; --checkpoint average keeps at least --average-last).")
@click.option("--resume", is_flag=True, help="Continue OUT/last.pt (same settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def train(data: str, out: str, recipe: str, epochs: int, image_size: int | None,
          batch_size: int | None, lr: float | None, optimizer: str | None, weights: str,
          seed: int, workers: int, max_steps: int | None, device: str, head: str,
          dropout: float, batch_norm: bool, init_: str, freeze: str, threshold: str | None,
          schedule: str | None, rotation: float | None, resize: str | None,
          loss_weights: str | None, checkpoint_rule: str | None, average_last: int | None,
          candidates: bool, test_dir: str | None, snapshots: int, resume: bool,
          as_json: bool) -> None:
    """Train DenseNet-169 on MURA-layout data; writes OUT/best.pt, last.pt, history.*."""
    from bonexray.trainer.progress import RichTrainProgress
    from bonexray.trainer.train import recipe_config
    from bonexray.trainer.train import train as run_training

    try:
        layers = tuple(int(w) for w in head.replace(" ", "").split(",") if w)
    except ValueError:
        raise click.BadParameter(f"{head!r} is not a list of widths like 512,256",
                                 param_hint="--head") from None
    config = recipe_config(
        recipe, data=data, out=out, epochs=epochs, image_size=image_size,
        batch_size=batch_size, lr=lr, optimizer=optimizer,
        weights=None if weights == "none" else weights, seed=seed, workers=workers,
        max_steps=max_steps, device=device, head=layers, dropout=dropout,
        batch_norm=batch_norm, init=init_, freeze=freeze, threshold=threshold,
        schedule=schedule, rotation=rotation, resize=resize, loss_weights=loss_weights,
        checkpoint=checkpoint_rule, average_last=average_last, candidates=candidates,
        test=test_dir, snapshots=snapshots,
    )
    with RichTrainProgress() as progress:
        summary = run_training(config, resume=resume, progress=progress)
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    best = summary.get("kept_metrics") or {}
    epochs_kept = summary.get("kept_epochs") or [summary["best_epoch"]]
    span = (f"epoch {epochs_kept[0]}" if len(epochs_kept) == 1
            else f"epochs {epochs_kept[0]}-{epochs_kept[-1]}")
    click.echo(f"kept weights: {summary.get('kept')} ({span}): valid AUROC "
               f"{_fmt(best.get('auroc'))}, kappa {_fmt(best.get('kappa'))}, accuracy "
               f"{_fmt(best.get('accuracy'))}, F1 {_fmt(best.get('f1'))} on {best.get('n')} "
               f"studies at threshold {_fmt(summary.get('threshold'))}; checkpoint "
               f"{summary['best']}")
    tested = summary.get("test_metrics")
    if tested:
        low, high = (tested.get("ci95") or {}).get("auroc") or (None, None)
        click.echo(f"test (scored once, {tested.get('kept', 'best-valid')} weights): AUROC "
                   f"{_fmt(tested.get('auroc'))} (95% CI {_fmt(low)}-{_fmt(high)}), kappa "
                   f"{_fmt(tested.get('kappa'))}, accuracy {_fmt(tested.get('accuracy'))}, F1 "
                   f"{_fmt(tested.get('f1'))} on {tested.get('n')} studies")
    elif (summary.get("split") or {}).get("test"):
        click.echo("nothing trained in this run: the test split was scored when the run "
                   "ended (OUT/test.json)")
    else:
        click.echo("no test split (DATA/test or --test DIR): the validation figures above "
                   "chose the epoch and threshold, so they are optimistic")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.onnx path.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True,
              help="fp16 for GPU workers, int8 (static QDQ) for CPU workers; both judged "
                   "against fp32 on the validation split.")
@click.option("--opset", default=17, show_default=True)
@click.option("--atol", default=1e-4, show_default=True,
              help="Parity tolerance on probabilities against PyTorch (fp32 graph); logits "
                   "and the CAM get 10x atol plus 1e-4 of their value.")
@click.option("--cam", is_flag=True,
              help="Add a `cam` output whose spatial mean is the logit: MURA's CAM for a "
                   "linear head, the head linearised at the pooled features otherwise.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False), default=None,
              help="int8: calibrate on the views under DIR (default: the checkpoint's "
                   "training split).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=None,
              help="int8: views drawn for calibration (default 128).")
@click.option("--validation", type=click.Path(exists=True, file_okay=False), default=None,
              help="Labelled studies (default: the checkpoint's validation split): real "
                   "views for the parity gate, an ensemble's own threshold, fp16/int8 "
                   "judging.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="fp16/int8: least share of validation studies whose decision matches "
                   "fp32's, enforced at any study count (default: fp16 0.99, int8 0.97).")
@click.option("--max-score-change", type=click.FloatRange(0, 1), default=None,
              help="fp16/int8: largest change of a study score against fp32, enforced at "
                   "any study count (default: fp16 0.02, int8 0.10).")
@click.option("--aggregation", type=click.Choice(["mean", "max"]), default="mean",
              show_default=True, help="How workers combine a study's view probabilities "
                                      "(stored in the model's metadata; MURA: mean).")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="Test-time augmentation inside the graph: flip also runs every view "
                   "mirrored left-right and averages (2x the inference work).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def export(checkpoints: tuple[str, ...], out: str, precision: str, opset: int, atol: float,
           cam: bool, calibration: str | None, calibration_images: int | None,
           validation: str | None, min_agreement: float | None,
           max_score_change: float | None,
           aggregation: str, tta: str, as_json: bool) -> None:
    """Export CHECKPOINTS to one ONNX file (uint8 input, metadata), gated by parity with
    PyTorch; several checkpoints make an ensemble that averages their probabilities."""
    from bonexray.export.onnx import export_model

    report = export_model(list(checkpoints), out, opset=opset, atol=atol, precision=precision,
                          cam=cam, calibration=calibration, validation=validation,
                          calibration_images=calibration_images, aggregation=aggregation,
                          min_agreement=min_agreement, max_score_change=max_score_change,
                          tta=tta)
    for line in report["warnings"]:
        log.warning("%s", line)
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    diffs = [p["max_abs_diff"] for p in report["parity"]]
    logit_diffs = [p["abnormal_logit_max_abs_diff"] for p in report["parity"]]
    inputs = sorted({p["input"] for p in report["parity"]})
    meta = report["metadata"]
    members = f"ensemble of {report['members']}, " if report["members"] > 1 else ""
    if precision == "fp32":
        parity = (f"parity on {' and '.join(inputs)}: max |diff| {max(diffs):.1e} "
                  f"(probability), {max(logit_diffs):.1e} (logit)")
    else:
        parity = f"max |diff| to PyTorch {max(diffs):.1e} (logit {max(logit_diffs):.1e})"
    click.echo(f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, sha256 "
               f"{report['sha256'][:12]}…): {members}{meta['architecture']} {precision}, "
               f"{meta['input_size']} px, threshold {meta['threshold']}"
               f"{', cam ' + 'x'.join(map(str, report['cam'])) if report['cam'] else ''}; "
               f"{parity} at batch {', '.join(str(p['batch']) for p in report['parity'])}")
    check = report.get("precision_check")
    if check:
        def fig(x: Any) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        delta = check["auroc_delta"]
        click.echo(f"{precision} vs fp32 on {check['studies']} validation studies "
                   f"({check['source']}, {check['provider']}): AUROC {fig(check['auroc_fp32'])}"
                   f" -> {fig(check['auroc'])} ({'n/a' if delta is None else f'{delta:+.4f}'};"
                   f" bound {check['bound']}"
                   f"{'' if check['enforced'] else ', not enforced on so few'}); decisions "
                   f"agree on {check['decision_agreement']:.1%} (>= "
                   f"{check['min_agreement']:.0%}), largest score change "
                   f"{check['max_abs_score_diff']:.3g} (<= {check['max_score_change']:g})")
    click.echo(f"threshold: {meta.get('threshold_source', '')}")


# ---------------------------------------------------------------------------- jobs


def _with_progress(total: int, label: str, work: Callable[[Callable[[int], None]], Any]) -> Any:
    """Run work(advance) under a progress bar on stderr (stdout stays for results/JSON)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=_stderr_console()) as progress:
        task = progress.add_task(label, total=total)
        return work(lambda n: progress.advance(task, n))


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Studies per chunk (default 16).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Views per inference batch.")
@user_errors
def run(folder: str, model_ref: str, database_url: str | None, as_json: bool,
        chunk_size: int | None, batch_size: int | None) -> None:
    """Classify every study under FOLDER in this process (no broker): the embedded default."""
    from bonexray.jobs import prepare_job, resolve_model, run_embedded
    from bonexray.worker.inference import check_provider_settings

    _apply_overrides(database_url=database_url, chunk_size=chunk_size, batch_size=batch_size)
    settings = get_settings()
    check_provider_settings(settings)  # before a job is registered
    engine = _engine(model_ref=model_ref)
    model = resolve_model(engine=engine, ref=model_ref)
    job = prepare_job(engine=engine, root=folder, model=model, mode="embedded",
                      options={"chunk_size": settings.chunk_size,
                               "batch_size": settings.batch_size})
    start = time.perf_counter()
    _with_progress(len(job.study_ids), f"job {job.job_id}",
                   lambda advance: run_embedded(engine=engine, job=job, settings=settings,
                                                progress=advance))
    elapsed = time.perf_counter() - start
    _print_job_summary(job.job_id, job.studies, job.views, elapsed, as_json)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_ref", required=True, help="model.onnx path or registered name.")
@db_option
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Studies per task (default 16).")
@click.option("--force", is_flag=True,
              help="Also send studies an earlier job already scored with this model.")
@user_errors
def enqueue(folder: str, model_ref: str, database_url: str | None, broker_url: str | None,
            as_json: bool, chunk_size: int | None, force: bool) -> None:
    """Register a job for every study under FOLDER and send its chunks to the workers."""
    from bonexray.jobs import NothingToSend, check_broker, prepare_job, resolve_model, send_job

    _apply_overrides(database_url=database_url, broker_url=broker_url, chunk_size=chunk_size)
    settings = get_settings()
    check_broker(settings)
    engine = _engine(model_ref=model_ref)
    model = resolve_model(engine=engine, ref=model_ref)
    try:
        job = prepare_job(engine=engine, root=folder, model=model, mode="celery",
                          options={"chunk_size": settings.chunk_size, "force": force},
                          skip_done=not force)
    except NothingToSend as nothing:  # not an error: the folder is done; no empty job
        if as_json:
            click.echo(json.dumps({"job": None, "studies": 0, "views": 0,
                                   "skipped": nothing.skipped}))
        else:
            click.echo(str(nothing))
        return
    sent = _with_progress(len(job.study_ids), f"enqueue job {job.job_id}",
                          lambda advance: send_job(engine=engine, job=job, settings=settings,
                                                   progress=advance))
    if as_json:
        click.echo(json.dumps({"job": job.job_id, "studies": job.studies, "views": job.views,
                               "skipped": job.skipped}))
    else:
        skipped = (f"; {job.skipped} already scored with this model skipped (--force sends "
                   "them)" if job.skipped else "")
        click.echo(f"job {job.job_id}: {job.studies} studies ({job.views} views, {job.empty} "
                   f"empty) sent as {sent} chunks{skipped}; follow with `bonexray status "
                   f"{job.job_id} --wait`")


@cli.command()
@click.argument("job", type=int)
@db_option
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Studies per task (default 16).")
@user_errors
def requeue(job: int, database_url: str | None, broker_url: str | None, as_json: bool,
            chunk_size: int | None) -> None:
    """Send again what JOB has unfinished, unleased and not waiting (safe to repeat).

    Workers' reapers do this by themselves within a lease or so; this is the manual tool."""
    from bonexray.jobs import check_broker, requeue_job

    _apply_overrides(database_url=database_url, broker_url=broker_url, chunk_size=chunk_size)
    settings = get_settings()
    check_broker(settings)
    engine = _engine()
    job_id = _job_id(engine, job)
    done = requeue_job(engine=engine, job_id=job_id, settings=settings)
    if as_json:
        click.echo(json.dumps({"job": done.job_id, "studies": done.studies,
                               "chunks": done.chunks, "leased": done.leased,
                               "waiting": done.waiting}))
    else:
        click.echo(f"job {done.job_id}: {done.studies} unfinished studies sent again as "
                   f"{done.chunks} chunks; not sent: {done.leased} held by a live worker, "
                   f"{done.waiting} still waiting in the queue")


def _print_job_summary(job_id: int, studies: int, views: int, elapsed: float,
                       as_json: bool) -> None:
    from bonexray.db.query import job_progress
    from bonexray.db.session import session_scope

    if as_json:
        click.echo(json.dumps({"job": job_id, "studies": studies, "views": views}))
        return
    with session_scope(_engine()) as session:
        p = job_progress(session=session, job_id=job_id)
    click.echo(f"job {job_id}: {p['done']} done, {p['failed']} failed, {p['empty']} empty of "
               f"{p['studies']} studies; {p['views_scored']} views scored, {p['views_failed']} "
               f"failed; {elapsed:.1f} s. See `bonexray results {job_id}`.")


@cli.command()
@db_option
@broker_option
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (one per GPU is usual).")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork",
              show_default=True)
@click.option("--queue", "-Q", default=None, help="Queue to consume (default bonexray).")
@click.option("--hostname", "-n", default=None, help="Worker node name (Celery's -n).")
@click.option("--loglevel", "-l", default=None,
              help="Celery's log level (default BONEXRAY_LOG_LEVEL, INFO).")
@click.option("--gpus", default=None,
              help="One pool process per GPU, each pinned to its device: all, or 0,1,3 "
                   "(default BONEXRAY_GPUS; sets the pool to prefork and the concurrency).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def worker(database_url: str | None, broker_url: str | None, concurrency: int, pool: str,
           queue: str | None, hostname: str | None, loglevel: str | None, gpus: str | None,
           celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker that classifies chunks (extra args go to `celery worker`)."""
    from bonexray.worker.inference import parse_gpus

    _apply_overrides(gpus=gpus)
    gpu_ids = parse_gpus(get_settings().gpus)
    if gpu_ids:
        pool, concurrency = "prefork", len(gpu_ids)
        _apply_overrides(gpus=",".join(map(str, gpu_ids)))
    processes = 1 if pool in ("solo", "threads") else concurrency
    _apply_overrides(database_url=database_url, broker_url=broker_url, queue=queue,
                     worker_processes=processes)
    settings = get_settings()
    from bonexray.db.session import open_database
    from bonexray.worker.inference import check_required_gpu

    check_required_gpu(settings)  # a GPU node without a working GPU takes no chunks
    open_database(settings.database_url)  # fail fast, and migrate once before forking
    import tempfile

    from bonexray.worker.app import create_app
    from bonexray.worker.tasks import MAIN_PID_ENV, SICK_FILE_ENV

    app = create_app(settings)
    argv = ["worker", f"--loglevel={loglevel or settings.log_level}", f"--pool={pool}",
            f"--concurrency={concurrency}", f"--queues={settings.queue}"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    # A pool process that cannot classify (model missing here, provider broken) writes why
    # into this file and asks this process to stop: the exit status says so.
    fd, sick_file = tempfile.mkstemp(prefix="bonexray-worker-", suffix=".sick")
    os.close(fd)
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    os.environ[SICK_FILE_ENV] = sick_file
    try:
        try:
            app.worker_main(argv=[*argv, *celery_args])
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        with open(sick_file, encoding="utf-8") as fh:
            reason = fh.read().strip()
    finally:
        os.unlink(sick_file)
    if reason:
        click.echo(f"bonexray worker stopped: it cannot classify here: {reason}", err=True)
        sys.exit(EXIT_SICK)
    sys.exit(code)


# `bonexray worker`'s exit status when it stopped because it cannot classify (EX_TEMPFAIL).
EXIT_SICK = 75


@cli.command()
@click.argument("job", type=int, required=False)
@db_option
@click.option("--wait", is_flag=True,
              help="Follow the job until it is finished (or stalled).")
@click.option("--json", "as_json", is_flag=True, help="Print the progress as JSON.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between polls.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this long.")
@click.option("--stall-after", type=click.IntRange(min=1), default=None,
              help="Seconds without progress and without a live lease after which the job "
                   "is stalled (default BONEXRAY_STALL_SECONDS, 300).")
@user_errors
def status(job: int | None, database_url: str | None, wait: bool, as_json: bool,
           interval: float, timeout: float | None, stall_after: int | None) -> None:
    """Progress of a job (the latest when JOB is omitted).

    Exit status: 0 finished (or running, without --wait) with no failed study; 1 finished
    with failed studies; 2 a user error (no such job, database unreachable); 3 --wait gave
    up after --timeout; 4 stalled: studies unfinished, no worker holds any, and nothing
    happened for --stall-after seconds."""
    from bonexray.db.query import STALLED, job_progress
    from bonexray.db.session import session_scope

    _apply_overrides(database_url=database_url, stall_seconds=stall_after)
    settings = get_settings()
    engine = _engine(read_only=True)
    job_id = _job_id(engine, job)

    def read() -> dict[str, Any]:
        with session_scope(engine) as session:
            return job_progress(session=session, job_id=job_id,
                                lease_seconds=settings.lease_seconds,
                                stall_seconds=settings.stall_seconds)

    p = read()
    if wait and p["state"] == "running":
        p = _follow(read, p, interval, timeout)
    if as_json:
        click.echo(json.dumps(p, default=str))
    else:
        rate = f"{p['images_per_s']:.1f} images/s" if p["images_per_s"] else "-"
        partial = f" ({p['partial']} partial)" if p["partial"] else ""
        click.echo(f"job {job_id}: {p['state']}; {p['done']} done{partial}, {p['failed']} "
                   f"failed, {p['empty']} empty, {p['queued']} queued ({p['in_flight']} in "
                   f"flight) of {p['studies']} studies; views {p['views_scored']} scored, "
                   f"{p['views_failed']} failed; {rate}")
    if p["state"] == STALLED:
        click.echo(f"job {job_id} is stalled: {p['queued']} studies unfinished, no worker "
                   f"holds any, no progress since {p['last_progress']} (are workers running "
                   "on this database and queue? see their logs)", err=True)
        sys.exit(4)
    if wait and not p["finished"]:
        click.echo(f"job {job_id} still has {p['queued']} queued studies after {timeout} s",
                   err=True)
        sys.exit(3)
    if p["finished"] and p["failed"]:
        sys.exit(1)


def _follow(read: Callable[[], dict[str, Any]], p: dict[str, Any], interval: float,
            timeout: float | None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), "{task.fields[info]}",
                  console=_stderr_console()) as progress:
        task = progress.add_task(f"job {p['job']}", total=p["studies"], info="")
        while True:
            progress.update(task, completed=p["studies"] - p["queued"],
                            info=progress_line(p))
            if p["state"] != "running" or (deadline is not None
                                           and time.monotonic() > deadline):
                return p
            time.sleep(interval)
            p = read()


def progress_line(p: dict[str, Any]) -> str:
    """done / failed / queued, images/s and the time left at that rate, for the live bar."""
    rate = p["images_per_s"]
    left = p["views"] - p["views_scored"] - p["views_failed"]
    if p["finished"] or left <= 0:
        eta = "0:00:00"
    elif rate:
        minutes, seconds = divmod(int(left / rate + 0.5), 60)
        eta = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    else:
        eta = "-:--:--"
    speed = f"{rate:.1f} img/s" if rate else "- img/s"
    return (f"done {p['done']} · failed {p['failed']} · queued {p['queued']} "
            f"({p['in_flight']} in flight) · {speed} · ETA {eta}")


def _job_id(engine: Any, job: int | None) -> int:
    from bonexray.db.query import get_job, latest_job
    from bonexray.db.session import session_scope

    with session_scope(engine) as session:
        found = latest_job(session=session) if job is None else get_job(session=session,
                                                                         job_id=job)
        if found is None:
            raise UserError("no jobs in the database yet" if job is None
                            else f"no job {job} in the database")
        return int(found.id)


@cli.command()
@click.argument("job", type=int, required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.option("--body-part", default=None, help="Only this body part (e.g. wrist).")
@click.option("--prediction", type=click.Choice(["normal", "abnormal"]), default=None)
@click.option("--status", "study_status", type=click.Choice(["queued", "done", "failed",
                                                             "empty"]), default=None)
@click.option("--min-score", type=click.FloatRange(0, 1), default=None,
              help="Only studies scoring at least this.")
@click.option("--max-score", type=click.FloatRange(0, 1), default=None,
              help="Only studies scoring at most this.")
@click.option("--path", "path_pattern", default=None, metavar="PATTERN",
              help="Only study paths containing PATTERN (* and ? wildcards, any case).")
@click.option("--order", type=click.Choice(["path", "score", "-score"]), default="path",
              show_default=True, help="Sort by path, or by score (-score: highest first).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many rows (default: all).")
@click.option("--heatmaps", "heatmaps_dir", type=click.Path(file_okay=False), default=None,
              help="Write CAM overlay PNGs of the selected studies' views here (needs a "
                   "model with a `cam` output).")
@user_errors
def results(job: int | None, database_url: str | None, fmt: str, body_part: str | None,
            prediction: str | None, study_status: str | None, min_score: float | None,
            max_score: float | None, path_pattern: str | None, order: str,
            limit: int | None, heatmaps_dir: str | None) -> None:
    """Study results of a job (the latest when JOB is omitted)."""
    from bonexray.db.query import get_job, job_results
    from bonexray.db.session import session_scope

    _apply_overrides(database_url=database_url)
    engine = _engine(read_only=True)
    job_id = _job_id(engine, job)
    with session_scope(engine) as session:
        rows = job_results(session=session, job_id=job_id, body_part=body_part,
                           prediction=prediction, status=study_status, limit=limit,
                           min_score=min_score, max_score=max_score, path=path_pattern,
                           order=order)
    if heatmaps_dir is not None:
        _write_heatmaps(engine, job_id, rows, heatmaps_dir)
    if fmt == "json":
        click.echo(json.dumps(rows))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["study", "body_part", "label", "score", "prediction", "status",
                         "partial", "views", "views_failed", "error"])
        for r in rows:
            writer.writerow([r["study"], r["body_part"] or "", _blank(r["label"]),
                             _blank(r["score"]), r["prediction"] or "", r["status"],
                             int(r["partial"]), len(r["views"]),
                             sum(v["error"] is not None for v in r["views"]), r["error"] or ""])
    else:
        with session_scope(engine) as session:
            job_row = get_job(session=session, job_id=job_id)
            root = job_row.root if job_row is not None else "/"
        _print_table(job_id, root, rows)


def _blank(value: Any) -> Any:
    return "" if value is None else value


def _print_table(job_id: int, root: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"job {job_id}: {len(rows)} studies under {root}")
    for name in ("study", "part", "label", "score", "prediction", "status", "views", "error"):
        table.add_column(name, overflow="fold")
    for r in rows:
        failed = sum(v["error"] is not None for v in r["views"])
        views = f"{len(r['views'])}" + (f" ({failed} failed)" if failed else "")
        status = f"{r['status']} (partial)" if r["partial"] else r["status"]
        table.add_row(os.path.relpath(r["study"], root), r["body_part"] or "", _text(r["label"]),
                      "" if r["score"] is None else f"{r['score']:.3f}",
                      r["prediction"] or "", status, views, r["error"] or "")
    Console().print(table)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _write_heatmaps(engine: Any, job_id: int, rows: list[dict[str, Any]], out: str) -> None:
    from bonexray.db.models import Model
    from bonexray.db.query import get_job
    from bonexray.db.session import session_scope
    from bonexray.plots import write_heatmaps

    with session_scope(engine) as session:
        job_row = get_job(session=session, job_id=job_id)
        model = session.get(Model, job_row.model_id) if job_row is not None else None
        if job_row is None or model is None:
            raise UserError(f"no job {job_id} in the database")
        root, model_path, sha = job_row.root, model.path, model.sha256
    views = [v["path"] for r in rows for v in r["views"]]
    done = write_heatmaps(model_path=model_path, expected_sha256=sha, views=views, root=root,
                          out_dir=out)
    click.echo(f"heatmaps: {len(done['written'])} written to {out}, {len(done['failed'])} "
               "views could not be read", err=True)


@cli.command()
@db_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many of the newest jobs.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@user_errors
def jobs(database_url: str | None, limit: int, fmt: str) -> None:
    """The newest jobs: model, studies by status, duration and throughput."""
    from bonexray.db.query import job_timings, list_jobs
    from bonexray.db.session import session_scope

    _apply_overrides(database_url=database_url)
    with session_scope(_engine(read_only=True)) as session:
        rows = list_jobs(session=session, limit=limit)
        timings = job_timings(session=session, job_ids=[r["id"] for r in rows])
    rows = [{**r, **timings.get(r["id"], {"duration_s": None, "images_per_s": None})}
            for r in rows]
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} newest jobs")
    for name in ("job", "model", "created", "studies", "done", "failed", "empty", "queued",
                 "views", "duration", "images/s", "root"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(str(r["id"]), r["model"], (r["created_at"] or "")[:19].replace("T", " "),
                      str(r["studies"]), str(r["done"]), str(r["failed"]), str(r["empty"]),
                      str(r["queued"]), str(r["views"]), _duration(r["duration_s"]),
                      "" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}",
                      r["root"])
    Console().print(table)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


@cli.command()
@click.argument("job", type=int, required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), default=None,
              help="Write roc.png, confusion_matrix.png and by_body_part.png here.")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(1),
              help="Bootstrap resamples for the 95% intervals.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Decision threshold (default: the model's).")
@click.option("--exclude-partial", is_flag=True,
              help="Leave out studies scored from only some of their views.")
@click.option("--by", "by_flags", multiple=True,
              help="Also break results down by this flag of the import manifest (e.g. "
                   "hardware, multiscan, frontal, lateral, oblique); repeatable.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Import manifest with the flags (default: import_manifest.csv at the "
                   "job's root or above it).")
@click.option("--save/--no-save", default=True, show_default=True,
              help="Store the figures as a new row of the evaluations table (--no-save: "
                   "only print them).")
@user_errors
def evaluate(job: int | None, database_url: str | None, fmt: str, plots_dir: str | None,
             resamples: int, seed: int, threshold: float | None,
             exclude_partial: bool, by_flags: tuple[str, ...], manifest: str | None,
             save: bool) -> None:
    """Compare a job's predictions with the labels of its studies (latest job by default):
    accuracy, F1, kappa, AUROC, sensitivity, specificity with bootstrap 95% intervals,
    overall and per body part; stored in the evaluations table unless --no-save."""
    from bonexray.db.session import session_scope
    from bonexray.evaluate import evaluate_job

    _apply_overrides(database_url=database_url)
    engine = _engine(read_only=True)
    job_id = _job_id(engine, job)
    with session_scope(engine) as session:
        result = evaluate_job(session=session, job_id=job_id, resamples=resamples, seed=seed,
                              threshold=threshold, exclude_partial=exclude_partial,
                              by_flags=by_flags, manifest=manifest, save=save)
    if plots_dir is not None:
        from bonexray.plots import write_evaluation_plots

        written = write_evaluation_plots(result, plots_dir)
        click.echo(f"plots: {', '.join(str(p) for p in written)}", err=True)
    if fmt == "json":
        click.echo(json.dumps(result.to_json()))
    else:
        _print_evaluation(job_id, result.run, result.to_json())


_EVAL_COLUMNS = ("accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity")
_SHORT = {"accuracy": "acc", "sensitivity": "sens", "specificity": "spec", "unscored": "unsc"}


def _print_evaluation(job_id: int, run: int | None, figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    overall = figures["overall"]
    partial = overall.get("partial", 0)
    verb = "left out" if overall.get("partial_excluded") else "included"
    partial_note = f"; {partial} partial studies {verb}" if partial else ""
    stored = f"evaluation {run}" if run is not None else "not stored (--no-save)"
    table = Table(title=f"job {job_id}, {stored}: threshold {overall['threshold']:g}; "
                        f"{overall['unscored']} labelled studies unscored, "
                        f"{overall['unlabelled']} unlabelled skipped{partial_note}",
                  caption="value (95% bootstrap interval)")
    for name in ("group", "n", "pos", "unscored", *_EVAL_COLUMNS):
        table.add_column(_SHORT.get(name, name), no_wrap=True,
                         justify="left" if name == "group" else "right")
    groups = [("overall", overall), *figures["by_body_part"].items()]
    groups += [(f"{flag}={value}", f) for flag, values in (figures.get("by_flag") or {}).items()
               for value, f in values.items()]
    for name, f in groups:
        table.add_row(name, str(f["n"]), str(f["positives"]), str(f["unscored"]),
                      *(_with_ci(f[m], f[f"{m}_ci"]) for m in _EVAL_COLUMNS))
    # Eleven columns with intervals need ~105 characters; wider than a default pipe's 80.
    Console(width=max(106, Console().width)).print(table)


def _with_ci(value: float | None, ci: list[float | None]) -> str:
    if value is None:
        return "n/a"
    if ci[0] is None or ci[1] is None:
        return f"{value:.3f}"
    return f"{value:.3f}\n{ci[0]:.2f}–{ci[1]:.2f}"


@cli.command("export-predictions")
@click.argument("job", type=int)
@click.argument("out", type=click.Path(dir_okay=False, allow_dash=True))
@db_option
@click.option("--relative-to", type=click.Path(file_okay=False), default=None,
              help="Write study paths relative to this folder (default: from the folder "
                   "that holds train/ or valid/, as MURA's CSVs do, else from the parent "
                   "of the job's root).")
@user_errors
def export_predictions(job: int, out: str, database_url: str | None,
                       relative_to: str | None) -> None:
    """Write JOB's predictions as MURA's evaluation script reads them: one
    `path/to/study/,label` row per scored study (1 abnormal, 0 normal), no header; OUT `-`
    writes them to stdout."""
    from bonexray.evaluate import write_mura_predictions

    _apply_overrides(database_url=database_url)
    engine = _engine(read_only=True)
    job_id = _job_id(engine, job)
    from bonexray.db.session import session_scope

    with session_scope(engine) as session:
        summary = write_mura_predictions(session=session, job_id=job_id,
                                         out=sys.stdout if out == "-" else out,
                                         relative_to=relative_to)
    click.echo(f"wrote {summary['written']} predictions to "
               f"{'stdout' if out == '-' else out}"
               + (f"; {summary['unscored']} studies without a prediction left out"
                  if summary["unscored"] else ""), err=out == "-")


# ---------------------------------------------------------------------------- bench


@cli.command()
@click.option("--quick", is_flag=True, help="Fewer images and repeats (a few minutes here).")
@click.option("--image-size", default=224, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Inference batch size.")
@click.option("--images", default=0, help="Views to generate (default 192, quick 96).")
@click.option("--control-studies", default=0,
              help="Studies for the control-plane figure (default 4000, quick 1500).")
@click.option("--repeats", default=0,
              help="Interleaved repeats; figures are medians (default 5, quick 3).")
@click.option("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
              show_default=True, help="Postgres where a private database is made and dropped.")
@click.option("--broker", "broker_url", default="redis://127.0.0.1:6379/14", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON here.")
@user_errors
def bench(quick: bool, image_size: int, batch: int, images: int, control_studies: int,
          repeats: int, pg_admin_url: str, broker_url: str, out: str | None) -> None:
    """Measure throughput in one run; the last line of stdout is one JSON object."""
    from bonexray.bench import BenchConfig, format_result, run_benchmark

    config = BenchConfig(quick=quick, image_size=image_size, batch=batch, images=images,
                         control_studies=control_studies, repeats=repeats,
                         database_url=pg_admin_url,
                         broker_url=broker_url)
    result = run_benchmark(config)
    text = format_result(result)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    click.echo(text)


# ---------------------------------------------------------------------------- models


@cli.group()
def models() -> None:
    """The model registry: model files known by name and sha256."""


def _model_row(model: Any) -> dict[str, Any]:
    meta = dict(model.meta or {})
    return {"id": model.id, "name": model.name, "sha256": model.sha256, "path": model.path,
            "metadata": meta}


@models.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=None, help="Registry name (default: the file's stem).")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the registered model as JSON.")
@user_errors
def models_add(file: str, name: str | None, database_url: str | None, as_json: bool) -> None:
    """Register a bonexray model file (its metadata is checked) by name and sha256."""
    from bonexray.jobs import resolve_model

    _apply_overrides(database_url=database_url)
    model = resolve_model(engine=_engine(), ref=file, name=name)
    if as_json:
        click.echo(json.dumps(_model_row(model), default=str))
        return
    note = (f" (already registered under this name; --name {name!r} not applied)"
            if name is not None and model.name != name else "")
    meta = model.meta or {}
    click.echo(f"model {model.name!r}: sha256 {model.sha256}, {meta.get('architecture')} "
               f"{meta.get('precision', 'fp32')}, {meta.get('input_size')} px, threshold "
               f"{meta.get('threshold')}; {model.path}{note}")


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


@models.command("list")
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@user_errors
def models_list(database_url: str | None, fmt: str) -> None:
    """Registered models, oldest first."""
    from bonexray.db.query import list_models
    from bonexray.db.session import session_scope

    _apply_overrides(database_url=database_url)
    with session_scope(_engine(read_only=True)) as session:
        rows = list_models(session=session)
    if fmt == "json":
        click.echo(json.dumps(rows, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} registered models")
    for column in ("name", "sha256", "architecture", "precision", "validated on", "px",
                   "threshold", "registered", "path"):
        table.add_column(column, overflow="fold", no_wrap=column != "path")
    for r in rows:
        meta = r["metadata"]
        table.add_row(r["name"], r["sha256"][:16], str(meta.get("architecture", "")),
                      str(meta.get("precision", "fp32")), validated_on(meta),
                      str(meta.get("input_size", "")), str(meta.get("threshold", "")),
                      (r["created_at"] or "")[:19], r["path"])
    # Nine columns need ~120 characters; wider than a default pipe's 80.
    Console(width=max(120, Console().width)).print(table)


# ---------------------------------------------------------------------------- db


@cli.group()
def db() -> None:
    """Database operations."""


@db.command("upgrade")
@db_option
@user_errors
def db_upgrade(database_url: str | None) -> None:
    """Bring the schema to the newest migration (also done by every command on its own)."""
    from bonexray.db.session import open_database

    _apply_overrides(database_url=database_url)
    url = get_settings().database_url
    engine = open_database(url)
    click.echo(f"schema at head on {engine.url.render_as_string(hide_password=True)}")


if __name__ == "__main__":
    main()
