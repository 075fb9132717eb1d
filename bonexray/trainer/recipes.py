"""Named training recipes (no torch import: the CLI's help reads them).

default: the settings `bonexray train` uses unless told otherwise, each chosen by
measurement on real radiographs (README, benchmarks/RESULTS.md "Training").
mura: MURA's published recipe (Rajpurkar et al. 2017): 320 x 320 inputs, batch 8, Adam
(0.9, 0.999) at 1e-4 divided by 10 when the validation loss stops improving, per-body-part
class weights, flips and +-30 degree rotations. MURA kept the models with the lowest
validation loss; this recipe keeps the epoch with the best validation AUROC. MURA started
from ImageNet weights: pass --weights too.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # Measured on FracAtlas split by likely exam (README, "Training"; RESULTS.md, "One
    # choice at a time"), 8 epochs at 128 px, two seeds, one choice at a time from the
    # defaults of the time (stretch): per-part class weights lost 0.078 AUROC to one global
    # weight, stretching lost 0.015 to letterbox (ahead on both seeds, not beyond doubt),
    # batch 16 lost 0.012, no class weight 0.009, no rotation 0.027, +-30 degrees instead of
    # +-15 showed no difference; from scratch, a constant learning rate lost 0.026 to
    # one-cycle and cosine 0.005, a one-cycle peak of 3e-3 lost 0.020 to 1e-3 (from
    # letterbox). From letterbox on seeds 3 and 4, zooms of +-10% with shifts of +-5% lost
    # 0.018 and gamma within e^+-0.3 lost 0.006: both stay off; a peak of 5e-4 gained
    # 0.006 (ahead on both seeds and on validation): lr None means 5e-4 from scratch. The
    # weights kept are a moving average over training, not the epoch a noisy validation
    # AUROC favours.
    "default": {"image_size": 224, "batch_size": 32, "lr": None, "optimizer": "auto",
                "schedule": "auto", "rotation": 15.0, "flip": True, "resize": "letterbox",
                "zoom": 0.0, "shift": 0.0, "gamma": 0.0,
                "loss_weights": "global", "checkpoint": "ema", "average_last": 3,
                "threshold": "0.5"},
    "mura": {"image_size": 320, "batch_size": 8, "lr": 1e-4, "optimizer": "adam",
             "schedule": "plateau", "rotation": 30.0, "flip": True, "resize": "stretch",
             "zoom": 0.0, "shift": 0.0, "gamma": 0.0,
             "loss_weights": "body-part", "checkpoint": "best-valid", "average_last": 3,
             "threshold": "0.5"},
}
DEFAULT = RECIPES["default"]


def recipe_help(field: str, text: str) -> str:
    """An option's help with its value in each recipe."""
    def show(value: Any) -> str:
        return "auto" if value is None else str(value)

    return (f"{text} [default: {show(RECIPES['default'][field])}; --recipe mura: "
            f"{show(RECIPES['mura'][field])}]").lstrip()
