"""Metrics against hand-computed cases and brute-force pair counting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bonexray import metrics as metrics_module
from bonexray.metrics import (
    CI_METRICS,
    auroc,
    binary_metrics,
    bootstrap_ci,
    bootstrap_metrics,
    choose_threshold,
    json_safe,
    metrics_by_group,
    metrics_with_ci,
    resample_indices,
    roc_curve,
    study_scores,
)


def brute_auroc(labels: list[int], scores: list[float]) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_cases() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.2, 0.9]) == 1.0
    assert auroc([0, 1], [0.9, 0.2]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied
    # pairs: (0.6 vs 0.6) tie, (0.6 vs 0.2) win, (0.9 vs both) wins -> 3.5 / 4
    assert auroc([1, 1, 0, 0], [0.6, 0.9, 0.6, 0.2]) == pytest.approx(0.875)


def test_auroc_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n).tolist()
        if len(set(labels)) < 2:
            labels[0], labels[1] = 0, 1
        scores = (rng.integers(0, 6, n) / 5).tolist()  # many ties
        assert auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))


def test_auroc_edge_cases() -> None:
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="1 of 3 scores are NaN"):
        auroc([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0, 2], [0.1, 0.2])


def test_binary_metrics_hand_case() -> None:
    # threshold 0.5: tp=3 (0.9, 0.8, 0.5), fn=1 (0.2), fp=1 (0.7), tn=3
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.5, 0.2, 0.7, 0.3, 0.1, 0.4]
    m = binary_metrics(labels, scores, 0.5)
    assert m["n"] == 8 and m["positives"] == 4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # p_o = 0.75, p_e = (4*4 + 4*4) / 64 = 0.5 -> kappa = 0.25 / 0.5
    assert m["kappa"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(brute_auroc(labels, scores))


def test_kappa_unbalanced_hand_case() -> None:
    # tp=1 fp=2 fn=0 tn=7: p_o=0.8, p_e=(3*1 + 7*9)/100 = 0.66 -> kappa = 0.14/0.34
    labels = [1] + [0] * 9
    scores = [0.9, 0.8, 0.6] + [0.1] * 7
    assert binary_metrics(labels, scores, 0.5)["kappa"] == pytest.approx(0.14 / 0.34)


def test_binary_metrics_one_class_is_nan_not_crash() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0
    assert math.isnan(m["sensitivity"]) and math.isnan(m["auroc"]) and math.isnan(m["kappa"])
    assert json_safe(m)["auroc"] is None


def test_study_scores_mean_and_max() -> None:
    ids = ["a", "b", "a", "a", "b"]
    probs = [0.2, 0.9, 0.4, 0.6, 0.1]
    assert study_scores(ids, probs) == pytest.approx({"a": 0.4, "b": 0.5})
    assert study_scores(ids, probs, how="max") == {"a": 0.6, "b": 0.9}
    with pytest.raises(ValueError, match="mean, max"):
        study_scores(ids, probs, how="median")


def test_metrics_by_group() -> None:
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.1, 0.3, 0.6, 0.7]
    groups = ["wrist", "wrist", "hand", "hand", "hand"]
    result = metrics_by_group(labels, scores, groups, 0.5)
    assert result["overall"]["n"] == 5
    assert set(result["by_group"]) == {"hand", "wrist"}
    assert result["by_group"]["wrist"]["accuracy"] == 1.0
    assert result["by_group"]["hand"]["accuracy"] == pytest.approx(1 / 3)
    assert result["by_group"]["hand"]["auroc"] == pytest.approx(0.5)  # 0.7 > 0.6, 0.3 < 0.6


def test_choose_threshold_rules() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.3, 0.6, 0.4, 0.7, 0.9]
    assert choose_threshold(labels, scores, "0.5") == 0.5
    assert choose_threshold(labels, scores, "0.25") == 0.25
    # t=0.7: sens 2/3 spec 1 (J .667); t=0.4: sens 1 spec 2/3 (J .667); first max = 0.7
    assert choose_threshold(labels, scores, "youden") == 0.7
    assert choose_threshold(labels, scores, "sensitivity=0.9") == 0.4
    assert choose_threshold(labels, scores, "sensitivity=0.6") == 0.7
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(labels, scores, "best")
    with pytest.raises(ValueError, match="outside 0..1"):
        choose_threshold(labels, scores, "1.5")


# ---------------------------------------------------------------------------- against sklearn

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_case(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(np.clip(labels * 0.2 + rng.random(n) * 0.8, 0, 1), 2)  # ties
    return labels, scores


@pytest.mark.parametrize("seed", range(8))
def test_binary_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels, scores = _random_case(rng, int(rng.integers(5, 400)))
    threshold = float(rng.choice([0.3, 0.5, 0.62]))
    pred = (scores >= threshold).astype(int)
    m = binary_metrics(labels, scores, threshold)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, pred))
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(labels, pred, zero_division=0))
    assert m["kappa"] == pytest.approx(sklearn_metrics.cohen_kappa_score(labels, pred))
    assert m["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(
        sklearn_metrics.recall_score(labels, pred, pos_label=0))


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels, scores = _random_case(rng, 200)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    s_fpr, s_tpr, s_thr = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, s_fpr)
    np.testing.assert_allclose(tpr, s_tpr)
    np.testing.assert_allclose(thresholds[1:], s_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(labels, scores))


def test_roc_curve_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="3 positives, 0 negatives"):
        roc_curve([1, 1, 1], [0.1, 0.5, 0.9])
    fpr, tpr, _ = roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])  # all tied: one step
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------- bootstrap


def _loop_bootstrap(labels: np.ndarray, scores: np.ndarray, threshold: float,
                    resamples: int, seed: int) -> dict[str, np.ndarray]:
    idx = resample_indices(labels.size, resamples, seed)
    draws = [binary_metrics(labels[i], scores[i], threshold) for i in idx]
    return {name: np.array([d[name] for d in draws], dtype=float) for name in CI_METRICS}


@pytest.mark.parametrize("block_cells", [2_000_000, 37])
def test_bootstrap_equals_resampling_one_by_one(monkeypatch: pytest.MonkeyPatch,
                                                block_cells: int) -> None:
    # Small blocks (37 cells: one resample each) must draw the same indices as one block.
    monkeypatch.setattr(metrics_module, "_BLOCK_CELLS", block_cells)
    rng = np.random.default_rng(7)
    labels, scores = _random_case(rng, 30)
    labels[:6] = 1  # unbalanced: some resamples lack negatives, AUROC NaN there
    fast = bootstrap_metrics(labels, scores, 0.5, resamples=300, seed=11)
    slow = _loop_bootstrap(labels, scores, 0.5, 300, 11)
    for name in CI_METRICS:
        np.testing.assert_allclose(fast[name], slow[name], equal_nan=True, err_msg=name)


def test_bootstrap_ci_is_the_percentile_interval() -> None:
    rng = np.random.default_rng(3)
    labels, scores = _random_case(rng, 120)
    ci = bootstrap_ci(labels, scores, 0.5, resamples=500, seed=5)
    slow = _loop_bootstrap(labels, scores, 0.5, 500, 5)
    for name in CI_METRICS:
        low, high = np.nanpercentile(slow[name], [2.5, 97.5])
        assert ci[name] == pytest.approx((low, high)), name
    point = binary_metrics(labels, scores, 0.5)
    assert all(ci[n][0] <= point[n] <= ci[n][1] for n in CI_METRICS)
    assert bootstrap_ci(labels, scores, 0.5, resamples=500, seed=5) == ci  # reproducible
    assert bootstrap_ci(labels, scores, 0.5, resamples=500, seed=6) != ci
    wide = bootstrap_ci(labels[:30], scores[:30], 0.5, resamples=500, seed=5)
    assert wide["auroc"][1] - wide["auroc"][0] > ci["auroc"][1] - ci["auroc"][0]


def test_metrics_with_ci_hand_cases() -> None:
    # All one class: AUROC and sensitivity undefined, with undefined intervals.
    m = metrics_with_ci([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.3], 0.5, resamples=200)
    assert m["accuracy"] == 0.75 and m["specificity"] == 0.75
    for name in ("auroc", "sensitivity"):
        assert math.isnan(m[name]) and all(math.isnan(x) for x in m[f"{name}_ci"])
    assert m["kappa"] == 0.0  # chance agreement equals the observed: as sklearn
    assert 0.0 <= m["accuracy_ci"][0] <= 0.75 <= m["accuracy_ci"][1] <= 1.0
    assert json_safe(m)["auroc_ci"] == [None, None]
    # Every score tied: AUROC is exactly one half in every resample that has both classes.
    tied = metrics_with_ci([0, 1] * 20, [0.4] * 40, 0.5, resamples=200)
    assert tied["auroc"] == 0.5 and tied["auroc_ci"] == (0.5, 0.5)
    assert tied["sensitivity_ci"] == (0.0, 0.0) and tied["specificity_ci"] == (1.0, 1.0)
    # Perfect separation.
    perfect = metrics_with_ci([0, 0, 1, 1, 1], [0.1, 0.2, 0.8, 0.9, 0.95], 0.5, resamples=200)
    assert perfect["auroc_ci"] == (1.0, 1.0) and perfect["kappa_ci"] == (1.0, 1.0)
    # A single positive: a third of the resamples lack it; the rest give the interval.
    labels, scores = [1] + [0] * 19, np.linspace(1, 0, 20) ** 2
    scores[0] = 0.5  # the positive ranks above 14 of the 19 negatives
    single = metrics_with_ci(labels, scores, 0.5, resamples=400)
    assert single["auroc"] == pytest.approx(14 / 19)
    low, high = single["auroc_ci"]
    assert low <= 14 / 19 <= high and high - low > 0.3
    draws = bootstrap_metrics(labels, scores, 0.5, resamples=400)["auroc"]
    assert 0.2 < np.isnan(draws).mean() < 0.5  # resamples without the positive, left out


def test_bootstrap_refuses_nan_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1 of 3 scores are NaN"):
        bootstrap_ci([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="1 of 3 scores are NaN"):
        metrics_with_ci([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="resamples must be at least 1"):
        bootstrap_metrics([0, 1], [0.1, 0.9], resamples=0)
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_ci([0, 1], [0.1, 0.9], level=95)
    empty = metrics_with_ci([], [], 0.5, resamples=10)
    assert empty["n"] == 0 and math.isnan(empty["auroc"]) and math.isnan(empty["f1_ci"][0])
