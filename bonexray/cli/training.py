"""Model commands: `train` fits DenseNet-169 on MURA-layout data, `export` writes the
gated ONNX file the workers run."""

from __future__ import annotations

import logging
from typing import Any

import click

from bonexray.cli.base import UserError, cli, user_errors
from bonexray.cli.render import emit, fig, output_format
from bonexray.trainer.recipes import recipe_help

log = logging.getLogger("bonexray")


@cli.command(short_help="Train DenseNet-169 on MURA-layout studies.")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--recipe", type=click.Choice(["default", "mura"]), default="default",
              show_default=True,
              help="Where unset options come from: default (chosen by measurement on real "
                   "radiographs, README) or mura (MURA's published recipe).")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(min=1),
              help="Passes over the training split.")
@click.option("--image-size", type=click.IntRange(min=16, max=4096), default=None,
              help=recipe_help("image_size", "Input side in px (MURA used 320, the follow-up "
                                "paper 224)."))
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=recipe_help("batch_size", ""))
@click.option("--lr", type=float, default=None,
              help=recipe_help("lr", "Peak learning rate (auto: 5e-4 from scratch, 1e-4 with "
                                "--weights)."))
@click.option("--optimizer", type=click.Choice(["auto", "adam", "adamw"]), default=None,
              help=recipe_help("optimizer", "auto: AdamW from scratch, Adam with --weights."))
@click.option("--weights", default="none", show_default=True,
              help="none (from scratch), imagenet (torchvision's, from TORCH_HOME), or a "
                   "path to a local DenseNet-169 state dict.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the initial weights, the shuffling and the augmentations.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes that decode images.")
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
@click.option("--zoom", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help=recipe_help("zoom", "Random zoom by a factor within [1-Z, 1+Z]; 0 turns "
                                "it off."))
@click.option("--shift", type=click.FloatRange(0.0, 0.5), default=None,
              help=recipe_help("shift", "Random shift by up to this share of the side, "
                                "each way; 0 turns it off."))
@click.option("--gamma", type=click.FloatRange(0.0, 2.0), default=None,
              help=recipe_help("gamma", "Random gamma drawn log-uniformly from "
                                "[exp(-G), exp(G)] (exposure); 0 turns it off."))
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
@output_format
@user_errors
def train(data: str, out: str, recipe: str, epochs: int, image_size: int | None,
          batch_size: int | None, lr: float | None, optimizer: str | None, weights: str,
          seed: int, workers: int, max_steps: int | None, device: str, head: str,
          dropout: float, batch_norm: bool, init_: str, freeze: str, threshold: str | None,
          schedule: str | None, rotation: float | None, zoom: float | None,
          shift: float | None, gamma: float | None, resize: str | None,
          loss_weights: str | None, checkpoint_rule: str | None, average_last: int | None,
          candidates: bool, test_dir: str | None, snapshots: int, resume: bool,
          fmt: str) -> None:
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
        schedule=schedule, rotation=rotation, zoom=zoom, shift=shift, gamma=gamma,
        resize=resize, loss_weights=loss_weights,
        checkpoint=checkpoint_rule, average_last=average_last, candidates=candidates,
        test=test_dir, snapshots=snapshots,
    )
    try:
        with RichTrainProgress() as progress:
            summary = run_training(config, resume=resume, progress=progress)
    except RuntimeError as exc:
        reason = resource_error(exc)
        if reason is None:
            raise  # a bug: keep the traceback
        raise UserError(f"{reason} (--resume continues from OUT/last.pt)") from None
    emit(summary, fmt, lambda: _print_training(summary))


def resource_error(exc: BaseException) -> str | None:
    """The machine, not the code: out of GPU memory, or a DataLoader worker killed (most
    often too little shared memory in a container). A one-line advice, else None."""
    text = " ".join(str(exc).split())
    if "out of memory" in text.lower():
        return (f"out of memory while training ({text[:120]}): lower --batch-size or "
                "--image-size")
    if "DataLoader worker" in text:
        return (f"a DataLoader worker died ({text[:160]}): give the container more shared "
                "memory (docker --shm-size) or lower --workers")
    return None


def _print_training(summary: dict[str, Any]) -> None:
    best = summary.get("kept_metrics") or {}
    epochs_kept = summary.get("kept_epochs") or [summary["best_epoch"]]
    span = (f"epoch {epochs_kept[0]}" if len(epochs_kept) == 1
            else f"epochs {epochs_kept[0]}-{epochs_kept[-1]}")
    click.echo(f"kept weights: {summary.get('kept')} ({span}): valid AUROC "
               f"{fig(best.get('auroc'))}, kappa {fig(best.get('kappa'))}, accuracy "
               f"{fig(best.get('accuracy'))}, F1 {fig(best.get('f1'))} on {best.get('n')} "
               f"studies at threshold {fig(summary.get('threshold'))}; checkpoint "
               f"{summary['best']}")
    tested = summary.get("test_metrics")
    if tested:
        low, high = (tested.get("ci95") or {}).get("auroc") or (None, None)
        click.echo(f"test (scored once, {tested.get('kept', 'best-valid')} weights): AUROC "
                   f"{fig(tested.get('auroc'))} (95% CI {fig(low)}-{fig(high)}), kappa "
                   f"{fig(tested.get('kappa'))}, accuracy {fig(tested.get('accuracy'))}, F1 "
                   f"{fig(tested.get('f1'))} on {tested.get('n')} studies")
    elif (summary.get("split") or {}).get("test"):
        click.echo("nothing trained in this run: the test split was scored when the run "
                   "ended (OUT/test.json)")
    else:
        click.echo("no test split (DATA/test or --test DIR): the validation figures above "
                   "chose the epoch and threshold, so they are optimistic")


@cli.command(short_help="Export checkpoints to a gated ONNX model.")
@click.argument("checkpoints", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.onnx path.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True,
              help="fp16 for GPU workers, int8 (static QDQ) for CPU workers; both judged "
                   "against fp32 on the validation split.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset of the graph.")
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
@output_format
@user_errors
def export(checkpoints: tuple[str, ...], out: str, precision: str, opset: int, atol: float,
           cam: bool, calibration: str | None, calibration_images: int | None,
           validation: str | None, min_agreement: float | None,
           max_score_change: float | None,
           aggregation: str, tta: str, fmt: str) -> None:
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
    emit(report, fmt, lambda: _print_export(report, precision))


def _print_export(report: dict[str, Any], precision: str) -> None:
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
        delta = check["auroc_delta"]
        click.echo(f"{precision} vs fp32 on {check['studies']} validation studies "
                   f"({check['source']}, {check['provider']}): AUROC {fig(check['auroc_fp32'], 4)}"
                   f" -> {fig(check['auroc'], 4)} ({'n/a' if delta is None else f'{delta:+.4f}'};"
                   f" bound {check['bound']}"
                   f"{'' if check['enforced'] else ', not enforced on so few'}); decisions "
                   f"agree on {check['decision_agreement']:.1%} (>= "
                   f"{check['min_agreement']:.0%}), largest score change "
                   f"{check['max_abs_score_diff']:.3g} (<= {check['max_score_change']:g})")
    click.echo(f"threshold: {meta.get('threshold_source', '')}")
