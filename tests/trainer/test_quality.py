"""The trainer's quality bar on synthetic studies, and the synthetic signs it is measured on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonexray.studies import find_studies
from bonexray.synth import write_synthetic_mura
from bonexray.trainer.train import TrainConfig, train


def test_synthetic_signs_can_be_restricted(tmp_path: Path) -> None:
    a = write_synthetic_mura(tmp_path / "a", studies=6, seed=3, image_size=32,
                             signs=("hardware",))
    b = write_synthetic_mura(tmp_path / "b", studies=6, seed=3, image_size=32)
    assert a.abnormal == b.abnormal and a.views == b.views  # same plan, other signs
    with pytest.raises(ValueError, match="unknown signs"):
        write_synthetic_mura(tmp_path / "c", studies=2, signs=("tumour",))
    with pytest.raises(ValueError, match="unknown signs"):
        write_synthetic_mura(tmp_path / "d", studies=2, signs=())


@pytest.mark.slow
def test_reaches_auroc_095_on_synthetic_studies(tmp_path: Path) -> None:
    # Hardware (plates, nails, screws) among bright side markers that normal views carry
    # too: measured 0.976 study AUROC after 6 epochs at 64 px, ~40 s an epoch on one
    # busy core. Fractures and cortical breaks are much slower to learn from scratch at
    # this size (benchmarks/RESULTS.md, Training).
    data = tmp_path / "data"
    write_synthetic_mura(data, studies=300, seed=1, image_size=80, signs=("hardware",))
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(data), out=str(out), epochs=8, image_size=64,
                                batch_size=16, workers=1, seed=0))
    # The defaults' kept weights (not the best epoch picked on validation) reach the bar.
    assert summary["kept_metrics"]["auroc"] >= 0.95, summary["kept_metrics"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["auroc"] == summary["kept_metrics"]["auroc"]
    assert best["metrics"]["n"] == sum(1 for s in find_studies(data) if s.split == "valid")
    assert best["metrics"]["kappa"] > 0.5  # the 0.5 threshold works too, not just ranking
