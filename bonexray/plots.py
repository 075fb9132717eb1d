"""Pictures for people: ROC curves, confusion matrix, per-body-part chart, CAM overlays."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from bonexray.errors import BonexrayError
from bonexray.imaging import content_box
from bonexray.metrics import confusion_counts, roc_curve

if TYPE_CHECKING:
    from bonexray.evaluate import JobEvaluation

log = logging.getLogger(__name__)

ROC_PNG = "roc.png"
CONFUSION_PNG = "confusion_matrix.png"
BODY_PART_PNG = "by_body_part.png"
CHART_METRICS = ("auroc", "kappa", "sensitivity", "specificity")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BonexrayError("plots need matplotlib: pip install 'bonexray[report]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]],
             aurocs: dict[str, float] | None = None, threshold: float | None = None) -> Path:
    """ROC curves, one per name (labels, scores); names with a single class are skipped.
    With `threshold`, the overall curve's operating point there is marked. The legend sits
    outside the axes, so it never covers the curves."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    try:
        for name, (labels, scores) in curves.items():
            if len(set(np.asarray(labels).tolist())) < 2:
                continue
            fpr, tpr, _ = roc_curve(labels, scores)
            auc = (aurocs or {}).get(name)
            label = name if auc is None or auc != auc else f"{name} (AUROC {auc:.3f})"
            line = ax.plot(fpr, tpr, lw=2.5 if name == "overall" else 1.2, label=label)[0]
            if name == "overall" and threshold is not None:
                (tn, fp), (fn, tp) = confusion_counts(np.asarray(labels), np.asarray(scores),
                                                      threshold)
                ax.plot([fp / max(1, fp + tn)], [tp / max(1, tp + fn)], "o", ms=9,
                        mfc="none", mew=2, color=line.get_color(),
                        label=f"operating point (threshold {threshold:g})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
               ylabel="sensitivity (true positive rate)", title="ROC, studies")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_confusion(path: str | Path, labels: np.ndarray, scores: np.ndarray,
                   threshold: float) -> Path:
    """The confusion matrix of studies at `threshold`, counts written in the cells."""
    plt = _pyplot()
    matrix = confusion_counts(labels, scores, threshold)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    try:
        ax.imshow(matrix, cmap="Blues")
        names = ["normal", "abnormal"]
        ax.set_xticks([0, 1], labels=names)
        ax.set_yticks([0, 1], labels=names)
        ax.set(xlabel="prediction", ylabel="label",
               title=f"studies at threshold {threshold:g}")
        top = matrix.max() or 1
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > top / 2 else "black")
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_by_body_part(path: str | Path, by_part: dict[str, dict[str, Any]],
                      metrics: Sequence[str] = CHART_METRICS) -> Path:
    """Grouped bars of `metrics` per body part with their bootstrap 95% intervals."""
    plt = _pyplot()
    parts = list(by_part)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(parts) + 2), 4.5))
    try:
        width = 0.8 / max(1, len(metrics))
        x = np.arange(len(parts))
        for k, name in enumerate(metrics):
            values = np.array([_num(by_part[p].get(name)) for p in parts])
            cis = [by_part[p].get(f"{name}_ci") or (None, None) for p in parts]
            low = np.array([_num(c[0]) for c in cis])
            high = np.array([_num(c[1]) for c in cis])
            err = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
            err = np.nan_to_num(err)
            offsets = x + (k - (len(metrics) - 1) / 2) * width
            bars = ax.bar(offsets, np.nan_to_num(values), width, yerr=err, capsize=2,
                          label=name)
            for pos, value in zip(offsets, values, strict=True):
                if value != value:  # undefined (one class only): "n/a", not a zero bar
                    ax.text(pos, 0.02, "n/a", ha="center", va="bottom", rotation=90,
                            fontsize=9, fontweight="bold",
                            color=bars.patches[0].get_facecolor())
        ax.set_xticks(x, labels=[f"{p}\n(n={by_part[p].get('n', 0)})" for p in parts])
        ax.set(ylim=(min(0.0, _floor(by_part, metrics)), 1.2), ylabel="value",
               title="by body part (whiskers: 95% bootstrap interval)")
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize=8, ncol=len(metrics), loc="upper center")
        return _save(fig, path)
    finally:
        plt.close(fig)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _floor(by_part: dict[str, dict[str, Any]], metrics: Sequence[str]) -> float:
    lows = [_num((p.get(f"{m}_ci") or (None, None))[0]) for p in by_part.values()
            for m in metrics]
    finite = [v for v in lows if v == v]
    return min(finite, default=0.0) - 0.05


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    return out


def write_evaluation_plots(evaluation: JobEvaluation, out_dir: str | Path) -> list[Path]:
    """roc.png, confusion_matrix.png and by_body_part.png of an evaluation in `out_dir`."""
    out = Path(out_dir)
    parts = np.asarray(evaluation.body_parts, dtype=object)
    curves = {"overall": (evaluation.labels, evaluation.scores)}
    aurocs = {"overall": evaluation.figures["overall"]["auroc"]}
    for name, figures in evaluation.figures["by_body_part"].items():
        mask = parts == name
        curves[name] = (evaluation.labels[mask], evaluation.scores[mask])
        aurocs[name] = figures["auroc"]
    return [
        plot_roc(out / ROC_PNG, curves, aurocs, threshold=evaluation.threshold),
        plot_confusion(out / CONFUSION_PNG, evaluation.labels, evaluation.scores,
                       evaluation.threshold),
        plot_by_body_part(out / BODY_PART_PNG, evaluation.figures["by_body_part"]),
    ]


# ---------------------------------------------------------------------------- heatmaps


def colorize(cam: np.ndarray) -> np.ndarray:
    """uint8 RGB [h, w, 3] of a map scaled to 0..1 (a blue-green-yellow-red ramp)."""
    t = np.clip(np.nan_to_num(cam.astype(np.float64)), 0.0, 1.0)
    stops = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]],
                     dtype=np.float64)
    pos = t * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay_cam(view: np.ndarray, cam: np.ndarray, *, input_size: int | None = None,
                resize: str = "letterbox", score: float | None = None,
                threshold: float | None = None, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB [H, W, 3] at the view's own resolution: the grayscale view with its CAM
    blended over it, on one fixed scale for every view, and the score written on it.

    The CAM is on the logit scale (its spatial mean is the view's logit); each cell is
    shown as sigmoid(cell), so 0.5 (a logit of 0) is the middle of the ramp whatever the
    view: a normal view stays cool instead of getting a hot spot of its own, as per-view
    min-max scaling gave. The map covers the model's input; only the part where the view
    lies (not the letterbox padding) is stretched over the view.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"expected a [h, w] class activation map, got shape {cam.shape}")
    height, width = view.shape[:2]
    size = input_size or max(height, width)
    unit = 1.0 / (1.0 + np.exp(-np.clip(np.nan_to_num(cam), -30.0, 30.0)))
    full = Image.fromarray(unit.astype(np.float32)).resize((size, size),
                                                           Image.Resampling.BILINEAR)
    top, left, rows, cols = content_box(height, width, size, resize)
    on_view = full.crop((left, top, left + cols, top + rows)).resize(
        (width, height), Image.Resampling.BILINEAR)
    gray = np.repeat(view[..., None].astype(np.float64), 3, axis=2)
    blended = (1 - alpha) * gray + alpha * colorize(np.asarray(on_view)).astype(np.float64)
    image = blended.round().clip(0, 255).astype(np.uint8)
    if score is not None:
        image = _write_score(image, score, threshold)
    return image


def score_caption(score: float, threshold: float | None) -> str:
    if threshold is None:
        return f"abnormal p={score:.3f}"
    verdict = "abnormal" if score >= threshold else "normal"
    return f"{verdict} p={score:.3f} (threshold {threshold:.3g})"


def _write_score(image: np.ndarray, score: float, threshold: float | None) -> np.ndarray:
    """The caption in white on a black band across the top-left, scaled to the view."""
    from PIL import ImageDraw, ImageFont

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height = max(10, min(canvas.height // 12, 48))
    try:
        font: Any = ImageFont.load_default(size=height)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    text = score_caption(score, threshold)
    box = draw.textbbox((0, 0), text, font=font)
    pad = max(2, height // 5)
    draw.rectangle((0, 0, box[2] + 2 * pad, box[3] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
