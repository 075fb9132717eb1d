"""Classification metrics for studies and views: AUROC, kappa, F1, sens/spec, per group."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from bonexray.errors import InvalidValueError

AGGREGATIONS = ("mean", "max")


def _arrays(labels: Sequence[Any] | np.ndarray,
            scores: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} of {s.size} scores are NaN")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.int64), s


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], sorted_vals.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def auroc(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half).

    NaN when only one class is present; ValueError on NaN scores.
    """
    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _div(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def confusion_counts(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                     threshold: float) -> np.ndarray:
    """[[tn, fp], [fn, tp]]: rows the label (normal, abnormal), columns the prediction (a
    score >= threshold is abnormal)."""
    pred = np.asarray(scores) >= threshold
    y = np.asarray(labels) == 1
    return np.array([[np.sum(~y & ~pred), np.sum(~y & pred)],
                     [np.sum(y & ~pred), np.sum(y & pred)]], dtype=np.int64)


def binary_metrics(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                   threshold: float = 0.5) -> dict[str, float | int]:
    """n, positives, accuracy, F1, Cohen's kappa, AUROC, sensitivity, specificity.

    A score >= threshold predicts abnormal (1). Undefined figures are NaN.
    """
    y, s = _arrays(labels, scores)
    n = int(y.size)
    (tn, fp), (fn, tp) = confusion_counts(y, s, threshold).tolist()
    accuracy = _div(tp + tn, n)
    # Cohen's kappa: agreement beyond what the two marginals give by chance.
    if n:
        p_chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
        kappa = _div(accuracy - p_chance, 1.0 - p_chance)  # NaN when chance is 1, as sklearn
    else:
        kappa = float("nan")
    return {
        "n": n,
        "positives": int(tp + fn),
        "accuracy": accuracy,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "kappa": kappa,
        "auroc": auroc(y, s) if n else float("nan"),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
    }


def aggregate(probs: Sequence[float] | np.ndarray, how: str) -> float:
    """A study's score from its views' probabilities: MURA's mean, or max. The one rule the
    trainer, the gates and the workers share."""
    if how == "mean":
        return float(np.mean(probs))
    if how == "max":
        return float(np.max(probs))
    raise InvalidValueError(f"unknown aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")


def study_scores(view_study_ids: Sequence[Hashable], view_probs: Sequence[float] | np.ndarray,
                 how: str = "mean") -> dict[Hashable, float]:
    """Study score from its views' probabilities: mean (as in MURA) or max."""
    if how not in AGGREGATIONS:
        raise InvalidValueError(f"unknown aggregation {how!r}"
                                f"; choose one of {', '.join(AGGREGATIONS)}")
    probs = np.asarray(view_probs, dtype=np.float64).ravel()
    if len(view_study_ids) != probs.size:
        raise ValueError(f"{len(view_study_ids)} study ids but {probs.size} view probabilities")
    grouped: dict[Hashable, list[float]] = {}
    for sid, p in zip(view_study_ids, probs.tolist(), strict=True):
        grouped.setdefault(sid, []).append(p)
    return {sid: aggregate(v, how) for sid, v in grouped.items()}


def metrics_by_group(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                     groups: Sequence[Hashable], threshold: float = 0.5) -> dict[str, Any]:
    """binary_metrics overall and for each group (e.g. body part), groups sorted by name."""
    y, s = _arrays(labels, scores)
    if len(groups) != y.size:
        raise ValueError(f"{len(groups)} groups but {y.size} labels")
    g = np.asarray([str(x) for x in groups], dtype=object)
    by_group = {
        name: binary_metrics(y[g == name], s[g == name], threshold)
        for name in sorted(set(g.tolist()))
    }
    return {"overall": binary_metrics(y, s, threshold), "by_group": by_group}


def choose_threshold(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                     rule: str = "0.5") -> float:
    """A decision threshold by rule: a number ("0.5"), "youden" (max sens + spec - 1) or
    "sensitivity=X" (the highest threshold whose sensitivity is at least X)."""
    rule = rule.strip().lower()
    try:
        value = float(rule)
    except ValueError:
        value = None
    if value is not None:
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise InvalidValueError(f"threshold {value} outside 0..1")
        return value
    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or (rule == "youden" and n_neg == 0):
        raise InvalidValueError(
            f"rule {rule!r} needs both classes; got {n_pos} positives, {n_neg} negatives"
        )
    # Candidate thresholds: every distinct score, descending ("score >= t" is positive).
    candidates = np.unique(s)[::-1]
    sens = np.array([(s[y == 1] >= t).sum() / n_pos for t in candidates])
    if rule == "youden":
        spec = np.array([(s[y == 0] < t).sum() / n_neg for t in candidates])
        j = sens + spec - 1.0
        return float(candidates[int(np.argmax(j))])  # first max = highest threshold
    if rule.startswith("sensitivity="):
        try:
            target = float(rule.split("=", 1)[1])
        except ValueError:
            raise InvalidValueError(f"bad sensitivity target in {rule!r}") from None
        if not 0.0 < target <= 1.0:
            raise InvalidValueError(f"sensitivity target {target} outside (0, 1]")
        ok = np.flatnonzero(sens >= target - 1e-12)
        return float(candidates[int(ok[0])])  # sens reaches 1 at the lowest score
    raise InvalidValueError(
        f"unknown threshold rule {rule!r}; use a number in 0..1, 'youden' or 'sensitivity=X'"
    )


def json_safe(value: Any) -> Any:
    """A copy with NaN/inf floats as None and tuples as lists, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


CI_METRICS = ("accuracy", "f1", "kappa", "auroc", "sensitivity", "specificity")


def roc_curve(labels: Sequence[Any] | np.ndarray,
              scores: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, from (0, 0) to (1, 1).

    The first threshold is +inf (nothing positive). ValueError unless both classes occur.
    """
    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC curve needs both classes; got {n_pos} positives, "
                         f"{n_neg} negatives")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # The last index of each run of equal scores: "score >= t" takes whole runs.
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return fpr, tpr, np.r_[np.inf, s_sorted[last]]


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap draws: int [resamples, n] of indices into 0..n-1, with replacement.

    bootstrap_metrics draws the same indices, block by block, from the same generator.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


_BLOCK_CELLS = 2_000_000  # resamples x studies per block: bounded memory on large jobs


def bootstrap_metrics(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                      threshold: float = 0.5, *, resamples: int = 1000,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """binary_metrics of each bootstrap resample (resample_indices(n, resamples, seed)),
    one array of `resamples` values per name in CI_METRICS; NaN where a resample leaves
    a figure undefined (e.g. AUROC of a resample with one class).

    Vectorised: a resample is a vector of counts per study, so the confusion counts are
    weighted sums, and the AUROC a weighted Mann-Whitney U over the distinct scores.
    """
    y, s = _arrays(labels, scores)
    n = y.size
    if resamples < 1:
        raise InvalidValueError(f"resamples must be at least 1, got {resamples}")
    if n == 0:
        return {name: np.full(resamples, np.nan) for name in CI_METRICS}
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // n)
    parts = []
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        parts.append(_resample_figures(y, s, threshold, idx))
    return {name: np.concatenate([p[name] for p in parts]) for name in CI_METRICS}


def _resample_figures(y: np.ndarray, s: np.ndarray, threshold: float,
                      idx: np.ndarray) -> dict[str, np.ndarray]:
    b, n = idx.shape
    counts = np.zeros((b, n), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(b), n), idx.ravel()), 1.0)
    pred = s >= threshold
    pos = y == 1
    tp = counts @ (pred & pos).astype(np.float64)
    fp = counts @ (pred & ~pos).astype(np.float64)
    fn = counts @ (~pred & pos).astype(np.float64)
    tn = counts @ (~pred & ~pos).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (tp + tn) / n
        p_chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
        kappa = (accuracy - p_chance) / (1.0 - p_chance)
        f1 = 2 * tp / (2 * tp + fp + fn)
        sensitivity = tp / (tp + fn)
        specificity = tn / (tn + fp)
        # AUROC: per distinct score level, the resample's positive and negative weight.
        levels, level_of = np.unique(s, return_inverse=True)
        pos_w = np.zeros((levels.size, b))
        neg_w = np.zeros((levels.size, b))
        np.add.at(pos_w, level_of[pos], counts[:, pos].T)
        np.add.at(neg_w, level_of[~pos], counts[:, ~pos].T)
        neg_below = np.cumsum(neg_w, axis=0) - neg_w  # negatives with a strictly lower score
        u = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=0)
        auroc_b = u / (pos_w.sum(axis=0) * neg_w.sum(axis=0))
    figures = {"accuracy": accuracy, "f1": f1, "kappa": kappa, "auroc": auroc_b,
               "sensitivity": sensitivity, "specificity": specificity}
    return {name: np.where(np.isfinite(v), v, np.nan) for name, v in figures.items()}


def bootstrap_ci(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                 threshold: float = 0.5, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for CI_METRICS, resampling studies with replacement.

    Resamples where a figure is undefined are left out of its interval; (NaN, NaN) when
    fewer than half of them define it (e.g. AUROC with a single positive study).
    """
    if not 0.0 < level < 1.0:
        raise InvalidValueError(f"confidence level {level} outside (0, 1)")
    draws = bootstrap_metrics(labels, scores, threshold, resamples=resamples, seed=seed)
    tail = (1.0 - level) / 2.0 * 100.0
    intervals: dict[str, tuple[float, float]] = {}
    for name, values in draws.items():
        finite = values[np.isfinite(values)]
        if finite.size * 2 < values.size or finite.size == 0:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(finite, [tail, 100.0 - tail])
            intervals[name] = (float(low), float(high))
    return intervals


def metrics_with_ci(labels: Sequence[Any] | np.ndarray, scores: Sequence[Any] | np.ndarray,
                    threshold: float = 0.5, *, resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """binary_metrics plus `<name>_ci: (low, high)` for each name in CI_METRICS.

    An interval is (NaN, NaN) where its point estimate is undefined.
    """
    result: dict[str, Any] = dict(binary_metrics(labels, scores, threshold))
    intervals = bootstrap_ci(labels, scores, threshold, resamples=resamples, seed=seed)
    for name in CI_METRICS:
        defined = math.isfinite(float(result[name]))
        result[f"{name}_ci"] = intervals[name] if defined else (float("nan"), float("nan"))
    return result
