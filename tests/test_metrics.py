"""Metrics against hand-computed cases and brute-force pair counting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bonexray.metrics import (
    auroc,
    binary_metrics,
    choose_threshold,
    json_safe,
    metrics_by_group,
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
