"""Trainer: data set, model weights loading, one short training run and its checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonexray.studies import find_studies
from bonexray.trainer.data import FAILED, TrainAugment, ViewDataset, collate_views
from bonexray.trainer.model import (
    BoneXRayNet,
    Preprocess,
    WeightsError,
    build_model,
    imagenet_weights_path,
)
from bonexray.trainer.train import TrainConfig, TrainError, class_weights, split_studies, train


def draw_view(abnormal: bool, rng: np.random.Generator, size: tuple[int, int] = (72, 56)) -> \
        np.ndarray:
    """A bright vertical bar on noise; an abnormal one has a dark gap across it."""
    h, w = size
    img = rng.integers(0, 40, size=(h, w)).astype(np.uint8)
    left = int(rng.integers(w // 3, w // 2))
    img[4:-4, left:left + 10] = 220
    if abnormal:
        top = int(rng.integers(h // 3, h // 2))
        img[top:top + 8, left:left + 10] = 20
    return img


def make_mura(root: Path, *, patients: int = 6, splits: tuple[str, ...] = ("train", "valid"),
              parts: tuple[str, ...] = ("XR_WRIST", "XR_HAND"), seed: int = 0) -> Path:
    """A tiny MURA layout: split/XR_PART/patientNNNNN/studyK_{positive,negative}/imageJ.png."""
    rng = np.random.default_rng(seed)
    pid = 0
    for split in splits:
        for part in parts:
            for _ in range(patients):
                pid += 1
                for k, abnormal in enumerate((True, False), start=1):
                    label = "positive" if abnormal else "negative"
                    folder = root / split / part / f"patient{pid:05d}" / f"study{k}_{label}"
                    folder.mkdir(parents=True)
                    for j in range(1, 3):
                        Image.fromarray(draw_view(abnormal, rng)).save(folder / f"image{j}.png")
    return root


@pytest.fixture(scope="module")
def mura(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mura(tmp_path_factory.mktemp("mura"), patients=3)


def test_preprocess_matches_imagenet_normalisation() -> None:
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    got = Preprocess()(pixels)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = (pixels.float().repeat(1, 3, 1, 1) / 255 - mean) / std
    assert got.shape == (2, 3, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Preprocess()(pixels.float()), want, atol=1e-5, rtol=1e-5)


def test_model_outputs_one_logit_per_image() -> None:
    model = BoneXRayNet(head=(16,), dropout=0.2, batch_norm=True, init="kaiming").eval()
    logits = model(torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8))
    assert logits.shape == (3,)
    with pytest.raises(ValueError, match="default, kaiming, xavier"):
        build_model(init="nope")


def test_legacy_keys_load(tmp_path: Path) -> None:
    reference = build_model()
    state = reference.state_dict()
    legacy = {}
    for key, value in state.items():
        if key.startswith("classifier.") or key.endswith("num_batches_tracked"):
            continue  # the LuaTorch-ported files have no BatchNorm step counters
        # torchvision's old release named 'denselayer1.norm1.weight' 'denselayer1.norm.1.weight'
        for name in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                key = key.replace(f".{name}{i}.", f".{name}.{i}.")
        legacy[key] = value
    assert any(".norm.1." in k for k in legacy)
    legacy["classifier.weight"] = torch.zeros(1000, 1664)  # ImageNet's 1000-class head
    legacy["classifier.bias"] = torch.zeros(1000)
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)

    loaded = build_model(weights=str(path), head=(8,))
    got = loaded.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(got[key], value)
    assert got["classifier.2.weight"].shape == (1, 8)


def test_bad_weights_name_the_problem(tmp_path: Path) -> None:
    torch.save({"features.conv0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="not a DenseNet-169 state dict"):
        build_model(weights=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError, match="not found"):
        build_model(weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_missing_is_a_clear_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert str(imagenet_weights_path()).startswith(str(tmp_path))
    with pytest.raises(WeightsError, match="densenet169-b2777c0a.pth"):
        build_model(weights="imagenet")


def test_dataset_drops_unreadable_views(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> \
        None:
    root = make_mura(tmp_path / "d", patients=1, splits=("train",), parts=("XR_WRIST",))
    study = next(s for s in find_studies(root) if s.label == 1)
    Path(study.views[0]).write_bytes(b"")  # empty: dropped at build
    truncated = Path(study.views[1])
    truncated.write_bytes(truncated.read_bytes()[:60])  # header fine, data cut: fails lazily
    with caplog.at_level(logging.WARNING):
        ds = ViewDataset(find_studies(root), image_size=32, augment=TrainAugment(30))
    assert "dropped 1 of 4 views" in caplog.text
    assert len(ds) == 3
    items = [ds[i] for i in range(len(ds))]
    assert sum(1 for it in items if it[2] == FAILED) == 1
    pixels, labels, owners = collate_views(items)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 1, 32, 32)
    assert labels.tolist() == [0.0, 0.0] and (owners != FAILED).all()


def test_split_by_patient_when_no_valid_split(tmp_path: Path) -> None:
    root = make_mura(tmp_path / "d", patients=5, splits=("train",))
    train_s, valid_s = split_studies(find_studies(root), seed=0)
    assert valid_s and train_s
    assert not {s.patient for s in train_s} & {s.patient for s in valid_s}
    assert len({s.patient for s in valid_s}) == 2  # 20% of 10 patients
    again = split_studies(find_studies(root), seed=0)
    assert [s.path for s in again[1]] == [s.path for s in valid_s]


def test_class_weights_follow_mura(tmp_path: Path) -> None:
    root = make_mura(tmp_path / "d", patients=2, splits=("train",), parts=("XR_WRIST",))
    studies = find_studies(root)
    # Drop one normal study: 4 abnormal views, 2 normal views.
    studies = [s for s in studies if not (s.label == 0 and s.patient == "00001")]
    ds = ViewDataset(studies, image_size=16, check=False)
    w = class_weights(ds)
    torch.testing.assert_close(w[0], torch.tensor([4 / 6, 2 / 6]))


def test_config_errors_name_choices(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="auto, cpu, cuda"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), device="tpu")
    with pytest.raises(TrainError, match="letterbox"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), resize="crop")


def test_train_one_short_epoch(mura: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig(data=str(mura), out=str(out), epochs=1, image_size=64, batch_size=4,
                         max_steps=3, workers=0, head=(8,), dropout=0.1)
    summary = train(config)
    assert summary["best_epoch"] == 1
    for name in ("best.pt", "last.pt", "history.json"):
        assert (out / name).is_file()
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["format"] == 1 and ckpt["architecture"] == "densenet169"
    assert ckpt["image_size"] == 64 and ckpt["resize"] == "letterbox"
    assert ckpt["threshold"] == 0.5 and ckpt["epoch"] == 1
    assert ckpt["config"]["data"] == str(mura.resolve())
    assert ckpt["head"] == {"layers": [8], "dropout": 0.1, "batch_norm": False,
                            "init": "default"}
    assert set(ckpt["metrics"]) >= {"auroc", "kappa", "accuracy", "f1", "loss", "by_body_part"}
    assert set(ckpt["metrics"]["by_body_part"]) == {"wrist", "hand"}
    assert ckpt["metrics"]["n"] == 12  # valid studies
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1
    model = BoneXRayNet(head=(8,), dropout=0.1)
    model.load_state_dict(ckpt["model"])
    ckpt_last = torch.load(out / "last.pt", weights_only=True)
    assert "state" in ckpt_last["optimizer"] and ckpt_last["scheduler"]


def test_train_refuses_data_without_studies(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="need labelled studies"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), epochs=1, workers=0))
