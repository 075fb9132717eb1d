"""A tiny model trained by the trainer on images whose abnormal sign sits at a known place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 64  # DenseNet's last feature map is then 2x2: one cell per quadrant
SIGN = 12  # side of the square sign, px
QUADRANTS = 4


def draw_sign_view(rng: np.random.Generator, quadrant: int | None) -> np.ndarray:
    """Dark noise; an abnormal view (quadrant 0..3, row-major) has a bright square lying
    wholly inside that quadrant, so the CAM cell that should light up is known."""
    img = rng.integers(0, 60, size=(SIZE, SIZE)).astype(np.uint8)
    if quadrant is not None:
        half = SIZE // 2
        top = (quadrant // 2) * half + int(rng.integers(2, half - SIGN - 2))
        left = (quadrant % 2) * half + int(rng.integers(2, half - SIGN - 2))
        img[top : top + SIGN, left : left + SIGN] = 220
    return img


def write_sign_mura(root: Path, *, train: int, valid: int, seed: int = 0) -> Path:
    """MURA layout, one view per study, half the studies abnormal."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("valid", valid)):
        for k in range(count):
            abnormal = k % 2 == 0
            label = "positive" if abnormal else "negative"
            folder = root / split / "XR_WRIST" / f"patient{split}{k:04d}" / f"study1_{label}"
            folder.mkdir(parents=True)
            quadrant = int(rng.integers(0, QUADRANTS)) if abnormal else None
            Image.fromarray(draw_sign_view(rng, quadrant)).save(folder / "image1.png")
    return root


@pytest.fixture(scope="session")
def sign_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sign_mura(tmp_path_factory.mktemp("signs"), train=64, valid=40)


@pytest.fixture(scope="session")
def trained_checkpoint(sign_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a few training steps: enough to find the square (measured: the loss
    falls below 0.05 within 5 steps), cheap enough for every test run."""
    from bonexray.trainer.train import TrainConfig, train

    summary = train(TrainConfig(data=str(sign_data), out=str(tmp_path_factory.mktemp("run")),
                                epochs=1, image_size=SIZE, batch_size=16, max_steps=4,
                                lr=3e-3, rotation=0.0, workers=0, seed=0,
                                # the last step's weights (an average over 4 steps would
                                # still carry the random start), letterboxed as the tests
                                # of the heat maps' geometry expect
                                checkpoint="last", resize="letterbox"))
    return Path(summary["best"])
