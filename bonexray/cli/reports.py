"""Reading what jobs produced: `results`, `jobs`, `evaluate`, `export-predictions`,
`export-dicom`, `send-results`."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from bonexray.cli import base
from bonexray.cli.base import apply_overrides, cli, db_option, user_errors
from bonexray.cli.render import (
    console,
    duration,
    emit,
    fig,
    middle,
    n_of_m,
    output_format,
    print_table,
    study_label,
    table,
    text,
    utc,
)
from bonexray.settings import get_settings

RESULT_COLUMNS = ("study", "body_part", "label", "score", "prediction", "status", "partial",
                  "views", "views_failed", "error", "view_errors")


@cli.command(short_help="Show a job's study results.")
@click.argument("job", type=int, required=False)
@db_option
@output_format
@click.option("--body-part", default=None, help="Only this body part (e.g. wrist).")
@click.option("--prediction", type=click.Choice(["normal", "abnormal"]), default=None,
              help="Only studies with this prediction.")
@click.option("--status", "study_status", type=click.Choice(["queued", "done", "failed",
                                                             "empty"]), default=None,
              help="Only studies in this state.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None,
              help="Only studies scoring at least this.")
@click.option("--max-score", type=click.FloatRange(0, 1), default=None,
              help="Only studies scoring at most this.")
@click.option("--study", "--path", "study_pattern", default=None, metavar="PATTERN",
              help="Only studies whose key (folder path, or StudyInstanceUID/part for DICOM) "
                   "contains PATTERN (* and ? wildcards, any case).")
@click.option("--order", type=click.Choice(["study", "score", "-score", "path"]),
              default="study", show_default=True,
              help="Sort by study key (path: the same), or by score (-score: highest first).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many studies (default: all).")
@click.option("--heatmaps", "heatmaps_dir", type=click.Path(file_okay=False), default=None,
              help="Write CAM overlay PNGs of the selected studies' views here (needs a "
                   "model with a `cam` output).")
@user_errors
def results(job: int | None, database_url: str | None, fmt: str, body_part: str | None,
            prediction: str | None, study_status: str | None, min_score: float | None,
            max_score: float | None, study_pattern: str | None, order: str,
            limit: int | None, heatmaps_dir: str | None) -> None:
    """Study results of a job (the latest when JOB is omitted), with the reason of every
    failed study and view."""
    from bonexray.db.query import count_job_results, get_job, job_results
    from bonexray.db.session import session_scope

    apply_overrides(database_url=database_url)
    db = base.engine(read_only=True)
    job_id = base.job_id(db, job)
    filters: dict[str, Any] = {"body_part": body_part, "prediction": prediction,
                               "status": study_status, "min_score": min_score,
                               "max_score": max_score, "study": study_pattern}
    with session_scope(db) as session:
        rows = job_results(session=session, job_id=job_id, limit=limit,
                           order="study" if order == "path" else order,
                           **filters)
        total = (len(rows) if limit is None or len(rows) < limit
                 else count_job_results(session=session, job_id=job_id, **filters))
        job_row = get_job(session=session, job_id=job_id)
        root = job_row.root if job_row is not None else "/"
    if heatmaps_dir is not None:
        _write_heatmaps(db, job_id, rows, heatmaps_dir)
    if fmt == "csv":
        emit([_result_record(r) for r in rows], fmt, lambda: None, columns=RESULT_COLUMNS)
    else:
        emit(rows, fmt, lambda: _print_results(job_id, root, rows, total))


def _result_record(r: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a study: its views counted, their reasons as `view: reason; ...`."""
    failed = [v for v in r["views"] if v["error"] is not None]
    return {**r, "views": len(r["views"]), "views_failed": len(failed),
            "view_errors": "; ".join(f"{os.path.basename(v['source'])}: {v['error']}"
                                     for v in failed)}


def _print_results(job_id: int, root: str, rows: list[dict[str, Any]], total: int) -> None:
    width = console().width
    out = table(f"job {job_id}: {n_of_m(len(rows), total, 'studies')} under "
                f"{middle(root, max(20, width - 30))}",
                [("study", "path"), ("part", "text"), ("label", "num"), ("score", "num"),
                 ("pred", "text"), ("status", "text"), ("views", "num")],
                caption="* partial: scored from only some of its views; reasons below"
                if any(r["partial"] for r in rows) else None)
    problems: list[str] = []
    for r in rows:
        study = study_label(r["study"], root)
        failed = [v for v in r["views"] if v["error"] is not None]
        views = f"{len(r['views']) - len(failed)}/{len(r['views'])}" if failed \
            else str(len(r["views"]))
        out.add_row(study, r["body_part"] or "", text(r["label"]),
                    fig(r["score"]) if r["score"] is not None else "",
                    r["prediction"] or "", r["status"] + ("*" if r["partial"] else ""), views)
        if r["error"]:
            problems.append(f"{study}: {r['error']}")
        for v in failed:
            problems.append(f"{study}/{os.path.basename(v['source'])}: {v['error']}")
    print_table(out)
    if problems:
        click.echo(f"{len(problems)} failed studies or views:")
        for line in problems:
            click.echo(f"  {line}")


def _write_heatmaps(db: Any, job_id: int, rows: list[dict[str, Any]], out: str) -> None:
    from bonexray.db.query import get_job
    from bonexray.db.session import session_scope
    from bonexray.db.tables import Model
    from bonexray.errors import JobNotFoundError
    from bonexray.pipeline.heatmaps import write_heatmaps

    with session_scope(db) as session:
        job_row = get_job(session=session, job_id=job_id)
        model = session.get(Model, job_row.model_id) if job_row is not None else None
        if job_row is None or model is None:
            raise JobNotFoundError(f"no job {job_id} in the database")
        root, model_path, sha = job_row.root, model.path, model.sha256
    views = [v["source"] for r in rows for v in r["views"]]
    done = write_heatmaps(model_path=model_path, expected_sha256=sha, views=views, root=root,
                          out_dir=out)
    click.echo(f"heatmaps: {len(done['written'])} written to {out}, {len(done['failed'])} "
               "views could not be read", err=True)


JOB_COLUMNS = ("job", "model", "mode", "created_at", "finished_at", "studies", "views",
               "done", "failed", "empty", "queued", "finished", "duration_s", "images_per_s",
               "root")


@cli.command(short_help="List the newest jobs.")
@db_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many of the newest jobs.")
@output_format
@user_errors
def jobs(database_url: str | None, limit: int, fmt: str) -> None:
    """The newest jobs: model, studies by status, duration and throughput."""
    from bonexray.db.query import count_jobs, job_timings, list_jobs
    from bonexray.db.session import session_scope

    apply_overrides(database_url=database_url)
    with session_scope(base.engine(read_only=True)) as session:
        rows = list_jobs(session=session, limit=limit)
        total = count_jobs(session=session)
        timings = job_timings(session=session, job_ids=[r["job"] for r in rows])
    rows = [{**r, **timings.get(r["job"], {"duration_s": None, "images_per_s": None})}
            for r in rows]
    emit(rows, fmt, lambda: _print_jobs(rows, total), columns=JOB_COLUMNS)


def _print_jobs(rows: list[dict[str, Any]], total: int) -> None:
    out = table(f"{n_of_m(len(rows), total, 'jobs')}, newest first; times in UTC",
                [("job", "num"), ("model", "path"), ("created", "key"), ("studies", "num"),
                 ("done", "num"), ("failed", "num"), ("queued", "num"), ("time", "num"),
                 ("img/s", "num"), ("root", "path")])
    for r in rows:
        out.add_row(str(r["job"]), r["model"],
                    utc(r["created_at"])[5:], str(r["studies"]), str(r["done"]),
                    str(r["failed"]), str(r["queued"]), duration(r["duration_s"]),
                    "" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}",
                    r["root"])
    print_table(out)


_EVAL_COLUMNS = ("accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity")
_SHORT = {"accuracy": "acc", "sensitivity": "sens", "specificity": "spec"}


@cli.command(short_help="Score a job's predictions against the labels.")
@click.argument("job", type=int, required=False)
@db_option
@output_format
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

    apply_overrides(database_url=database_url)
    db = base.engine(read_only=True)
    job_id = base.job_id(db, job)
    with session_scope(db) as session:
        result = evaluate_job(session=session, job_id=job_id, resamples=resamples, seed=seed,
                              threshold=threshold, exclude_partial=exclude_partial,
                              by_flags=by_flags, manifest=manifest, save=save)
    if plots_dir is not None:
        from bonexray.plots import write_evaluation_plots

        written = write_evaluation_plots(result, plots_dir)
        click.echo(f"plots: {', '.join(str(p) for p in written)}", err=True)
    figures = {"job": job_id, "evaluation": result.run, **result.to_json()}
    if fmt == "csv":
        emit(_evaluation_rows(figures), fmt, lambda: None)
    else:
        emit(figures, fmt, lambda: _print_evaluation(figures))


def _groups(figures: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("overall", figures["overall"]), *figures["by_body_part"].items()]
    groups += [(f"{flag}={value}", f) for flag, values in (figures.get("by_flag") or {}).items()
               for value, f in values.items()]
    return groups


def _evaluation_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per group: counts, each figure and its interval."""
    rows = []
    for name, f in _groups(figures):
        row: dict[str, Any] = {"job": figures["job"], "evaluation": figures["evaluation"],
                               "group": name, "n": f["n"], "positives": f["positives"],
                               "unscored": f["unscored"]}
        for m in _EVAL_COLUMNS:
            low, high = f[f"{m}_ci"]
            row.update({m: f[m], f"{m}_low": low, f"{m}_high": high})
        rows.append(row)
    return rows


def _print_evaluation(figures: dict[str, Any]) -> None:
    overall = figures["overall"]
    partial = overall.get("partial", 0)
    verb = "left out" if overall.get("partial_excluded") else "included"
    partial_note = f"; {partial} partial studies {verb}" if partial else ""
    run = figures["evaluation"]
    stored = f"evaluation {run}" if run is not None else "not stored (--no-save)"
    out = table(f"job {figures['job']}, {stored}: threshold {overall['threshold']:g}; "
                f"{overall['unscored']} labelled studies unscored, "
                f"{overall['unlabelled']} unlabelled skipped{partial_note}",
                [("group", "text"), ("n", "num"), ("pos", "num"), ("unsc", "num"),
                 *((_SHORT.get(m, m), "num") for m in _EVAL_COLUMNS)],
                caption="value, and below it the 95% bootstrap interval; n/a: undefined "
                        "(e.g. AUROC of a group with one class)")
    for name, f in _groups(figures):
        out.add_row(name, str(f["n"]), str(f["positives"]), str(f["unscored"]),
                    *(_with_ci(f[m], f[f"{m}_ci"]) for m in _EVAL_COLUMNS))
    print_table(out)


def _with_ci(value: float | None, ci: list[float | None]) -> str:
    if value is None:
        return "n/a"
    if ci[0] is None or ci[1] is None:
        return f"{value:.3f}"
    return f"{value:.3f}\n{_short(ci[0])}–{_short(ci[1])}"


def _short(value: float) -> str:
    """0.712 -> .71, 1.0 -> 1, -0.05 -> -.05: an interval end in four characters or fewer."""
    text = f"{value:.2f}"
    if text in ("1.00", "-1.00"):
        return text[:-3]
    return text.replace("0.", ".", 1)


@cli.command("export-predictions", short_help="Write a job's predictions as MURA's CSV.")
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
    from bonexray.db.session import session_scope
    from bonexray.evaluate import write_mura_predictions

    apply_overrides(database_url=database_url)
    db = base.engine(read_only=True)
    job_id = base.job_id(db, job)
    with session_scope(db) as session:
        summary = write_mura_predictions(session=session, job_id=job_id,
                                         out=sys.stdout if out == "-" else out,
                                         relative_to=relative_to)
    click.echo(f"wrote {summary['written']} predictions to "
               f"{'stdout' if out == '-' else out}"
               + (f"; {summary['unscored']} studies without a prediction left out"
                  if summary["unscored"] else "")
               + (f"; {summary['not_folders']} DICOM studies left out (see export-dicom)"
                  if summary["not_folders"] else ""), err=True)


@cli.command("export-dicom", short_help="Write a job's DICOM results back as DICOM SR.")
@click.argument("job", type=int, required=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for the SR files (<StudyInstanceUID>/<SOPInstanceUID>.dcm).")
@db_option
@output_format
@user_errors
def export_dicom(job: int | None, out_dir: str, database_url: str | None, fmt: str) -> None:
    """Write one Comprehensive 3D SR (TID 1500 Measurement Report) per scored DICOM study
    of JOB (the latest when omitted), in the study it reports on: the finding (normal or
    abnormal), the study probability, the body part, the model's name and sha256, and
    every view the score came from. Needs the dicom extra."""
    from bonexray.db.session import session_scope
    from bonexray.dicom_sr import export_job

    apply_overrides(database_url=database_url)
    db = base.engine(read_only=True)
    job_id = base.job_id(db, job)
    with session_scope(db) as session:
        done = export_job(session=session, job_id=job_id, out_dir=out_dir)
    record = {"job": job_id, "written": len(done.written), "failed": len(done.failed),
              "not_dicom": done.not_dicom, "unscored": done.unscored, "files": done.written,
              "errors": {str(k): v for k, v in done.failed.items()}}

    def human() -> None:
        click.echo(f"job {job_id}: {len(done.written)} SR objects written to {out_dir}"
                   + (f"; {done.unscored} DICOM studies without a score" if done.unscored
                      else "")
                   + (f"; {done.not_dicom} studies are not DICOM (no SR)" if done.not_dicom
                      else ""))
        for study_id, reason in sorted(done.failed.items()):
            click.echo(f"  study {study_id}: {reason}")

    emit(record, fmt, human)


@cli.command("send-results", short_help="Send a job's DICOM SR results to a PACS.")
@click.argument("job", type=int, required=False)
@click.option("--to", "send_to", default=None, metavar="AET@HOST:PORT|URL",
              help="C-STORE destination, or a DICOMweb root for STOW-RS [env: "
                   "BONEXRAY_SEND_TO].")
@click.option("--calling-aet", default=None,
              help="Our AE title for C-STORE [env: BONEXRAY_LISTEN_AE_TITLE; default: "
                   "BONEXRAY].")
@db_option
@output_format
@user_errors
def send_results(job: int | None, send_to: str | None, calling_aet: str | None,
                 database_url: str | None, fmt: str) -> None:
    """Send the SR of every scored DICOM study of JOB (the latest when omitted) to the PACS,
    once per study, model and destination: studies sent before are skipped, failed ones
    are tried again. Exit 1 when some could not be sent (see `status`)."""
    from bonexray.delivery import deliver_job, parse_destination
    from bonexray.errors import InvalidValueError

    apply_overrides(database_url=database_url, send_to=send_to,
                    listen_ae_title=calling_aet)
    settings = get_settings()
    if not settings.send_to:
        raise InvalidValueError("no destination: give --to AET@HOST:PORT or a DICOMweb URL "
                                "(or set BONEXRAY_SEND_TO)")
    destination = parse_destination(settings.send_to)
    db = base.engine(read_only=True)  # never a new database: there would be nothing to send
    job_id = base.job_id(db, job)
    done = deliver_job(engine=db, job_id=job_id, destination=destination,
                       calling_aet=settings.listen_ae_title)
    record = {"job": job_id, "destination": destination.text, "sent": done.sent,
              "already": done.already, "failed": len(done.failed),
              "not_dicom": done.not_dicom, "unscored": done.unscored,
              "errors": {str(k): v for k, v in done.failed.items()}}

    def human() -> None:
        click.echo(f"job {job_id}: {done.sent} SR sent to {destination.text}, "
                   f"{done.already} sent before, {len(done.failed)} failed")
        for study_id, reason in sorted(done.failed.items()):
            click.echo(f"  study {study_id}: {reason}")

    emit(record, fmt, human)
    if done.failed:
        sys.exit(1)
