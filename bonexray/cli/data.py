"""Data commands: `synth` writes synthetic studies, `import` turns public datasets into
the MURA layout."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from bonexray.cli.base import cli, user_errors
from bonexray.cli.render import emit, output_format


@cli.command(short_help="Write synthetic studies with known labels.")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--studies", default=140, show_default=True, help="Number of studies.")
@click.option("--seed", default=0, show_default=True, help="Seed of the images and the split.")
@click.option("--image-size", default=256, show_default=True, help="Typical image side, px.")
@click.option("--valid-fraction", default=0.2, show_default=True,
              help="Share of the studies written to valid/.")
@click.option("--signs", default="fracture,cortical_break,hardware", show_default=True,
              help="Abnormal signs to draw, comma-separated (hardware alone is learnt in "
                   "CPU minutes; thin fractures take far longer).")
@output_format
@user_errors
def synth(out: str, studies: int, seed: int, image_size: int, valid_fraction: float,
          signs: str, fmt: str) -> None:
    """Write a synthetic MURA-style tree of radiograph-like studies with known labels."""
    from bonexray.synth import write_synthetic_mura

    summary = write_synthetic_mura(out, studies=studies, seed=seed, image_size=image_size,
                                   valid_fraction=valid_fraction,
                                   signs=tuple(s.strip() for s in signs.split(",") if s.strip()))
    splits = ", ".join(f"{name} {count}" for name, count in summary.by_split.items())
    emit(asdict(summary), fmt, lambda: click.echo(
        f"wrote {summary.studies} studies ({summary.views} views, {summary.abnormal} "
        f"abnormal; {splits}) to {summary.root}"))


@cli.group("import", short_help="Turn a public dataset into the MURA layout.")
def import_() -> None:
    """Turn public datasets into the MURA layout (train/valid/test, one folder per study)."""


@import_.command("fracatlas", short_help="FracAtlas -> MURA layout, split by likely exam.")
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
@output_format
@user_errors
def import_fracatlas_cmd(src: str, out: str, seed: int, valid_fraction: float,
                         test_fraction: float, max_gap: int, near_duplicate: str, link: str,
                         conflicts: str, fmt: str) -> None:
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
    emit(report.as_dict(), fmt, lambda: _print_import(report))


def _print_import(report: Any) -> None:
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
