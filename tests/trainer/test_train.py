"""Trainer: data set, model weights loading, one short training run and its checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bonexray.errors import InvalidValueError
from bonexray.metrics import choose_threshold
from bonexray.studies import find_studies
from bonexray.trainer.data import FAILED, TrainAugment, ViewDataset, collate_views
from bonexray.trainer.network import (
    BoneXRayNet,
    Preprocess,
    WeightsError,
    build_model,
    frozen_modules,
    imagenet_weights_path,
    parse_freeze,
)
from bonexray.trainer.train import (
    TrainConfig,
    TrainError,
    class_weights,
    pick_device,
    predict_studies,
    split_studies,
    train,
)


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
    split = split_studies(find_studies(root), seed=0)
    train_s, valid_s = split.train, split.valid
    assert valid_s and train_s and split.method == "patients held out"
    assert not {s.patient for s in train_s} & {s.patient for s in valid_s}
    assert len({s.patient for s in valid_s}) == 2  # 20% of 10 patients
    again = split_studies(find_studies(root), seed=0)
    assert [s.key for s in again.valid] == [s.key for s in valid_s]


def test_layout_split_keeps_test_apart_and_names_shared_patients(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_mura(tmp_path / "d", patients=2, splits=("train", "valid", "test"))
    split = split_studies(find_studies(root), seed=0)
    assert split.method == "layout" and split.shared_patients == 0
    assert {s.split for s in split.test} == {"test"} and len(split.test) == 8
    assert {s.split for s in split.train} == {"train"}
    assert {s.split for s in split.valid} == {"valid"}
    # A patient folder copied into valid/ (a leaking layout) is counted and warned about.
    leaked = next((root / "train" / "XR_WRIST").iterdir())
    import shutil
    shutil.copytree(leaked, root / "valid" / "XR_WRIST" / leaked.name)
    with caplog.at_level(logging.WARNING):
        split = split_studies(find_studies(root), seed=0)
    assert split.shared_patients == 1
    assert f"1 patients have studies on two sides of the split (e.g. {leaked.name}" \
        in caplog.text


def test_class_weights_follow_mura(tmp_path: Path) -> None:
    root = make_mura(tmp_path / "d", patients=2, splits=("train",), parts=("XR_WRIST",))
    studies = find_studies(root)
    # Drop one normal study: 4 abnormal views, 2 normal views.
    studies = [s for s in studies if not (s.label == 0 and s.patient == "00001")]
    ds = ViewDataset(studies, image_size=16, check=False)
    w = class_weights(ds)
    torch.testing.assert_close(w[0], torch.tensor([4 / 6, 2 / 6]))


def test_class_weights_global_and_none(tmp_path: Path) -> None:
    root = make_mura(tmp_path / "d", patients=2, splits=("train",),
                     parts=("XR_WRIST", "XR_HAND"))
    studies = find_studies(root)
    # Wrist loses one normal study: wrist 4 abnormal / 2 normal, hand 4 / 4 (views).
    studies = [s for s in studies
               if not (s.label == 0 and s.patient == "00001" and s.body_part == "wrist")]
    ds = ViewDataset(studies, image_size=16, check=False)
    by_part = class_weights(ds, "body-part")
    wrist = [i for i, s in enumerate(ds.studies) if s.body_part == "wrist"][0]
    hand = [i for i, s in enumerate(ds.studies) if s.body_part == "hand"][0]
    torch.testing.assert_close(by_part[wrist], torch.tensor([4 / 6, 2 / 6]))
    torch.testing.assert_close(by_part[hand], torch.tensor([0.5, 0.5]))
    overall = class_weights(ds, "global")  # 8 abnormal, 6 normal views in all
    torch.testing.assert_close(overall[wrist], torch.tensor([8 / 14, 6 / 14]))
    torch.testing.assert_close(overall[hand], torch.tensor([8 / 14, 6 / 14]))
    assert torch.equal(class_weights(ds, "none"), torch.ones(len(ds.studies), 2))
    with pytest.raises(TrainError, match="body-part, global, none"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), loss_weights="pos")


def test_config_errors_name_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TrainError, match="auto, cpu, cuda"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), device="tpu")
    with pytest.raises(TrainError, match="letterbox"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), resize="crop")
    # Head options that would do nothing, or something else than they say.
    with pytest.raises(TrainError, match="needs --head"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), batch_norm=True)
    TrainConfig(data=str(tmp_path), out=str(tmp_path), batch_norm=True, head=(8,))
    with caplog.at_level("WARNING"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), dropout=0.2)
    assert "without --head" in caplog.text


def test_training_batches_never_end_with_a_single_view(mura: Path, tmp_path: Path) -> None:
    # A head with BatchNorm1d fails on a batch of one view in training mode; the training
    # loader drops a last partial batch, the validation loader keeps every view.
    from bonexray.studies import find_studies
    from bonexray.trainer.data import ViewDataset
    from bonexray.trainer.train import _loader

    config = TrainConfig(data=str(mura), out=str(tmp_path), workers=0, batch_size=4)
    views = ViewDataset(find_studies(str(mura / "train")), image_size=32)
    size = len(views) - 1  # one view left over
    sizes = [len(b[1]) for b in _loader(views, config, shuffle=True, batch_size=size)]
    assert sizes == [size]
    kept = [len(b[1]) for b in _loader(views, config, shuffle=False, batch_size=size)]
    assert kept == [size, 1]


def test_plateau_divides_after_one_epoch_without_improvement() -> None:
    from bonexray.trainer.train import _optimizer_and_schedule

    config = TrainConfig(data=".", out=".", schedule="plateau", lr=1e-3)
    model = torch.nn.Linear(2, 1)
    optimizer, scheduler, _, _ = _optimizer_and_schedule(config, model, 10)
    scheduler.step(1.0)
    scheduler.step(1.0)  # the first epoch without improvement (MURA)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


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
    assert ckpt["image_size"] == 64 and ckpt["resize"] == "letterbox"  # the default
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
    # The split is recorded: how it was made and which studies validated the run.
    assert ckpt["split"]["method"] == "layout" and len(ckpt["split"]["valid"]) == 12
    assert all(p.startswith("valid/") for p in ckpt["split"]["valid"])
    assert ckpt["split"]["test"] == [] and summary["test_metrics"] is None


def test_test_split_is_scored_once_with_the_chosen_epoch_and_threshold(
        tmp_path: Path) -> None:
    data = make_mura(tmp_path / "d", patients=2, splits=("train", "valid", "test"))
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(data), out=str(out), epochs=2, image_size=48,
                                batch_size=4, max_steps=2, workers=0, threshold="youden"))
    best = torch.load(out / "best.pt", weights_only=True)
    tested = best["test_metrics"]
    assert tested == summary["test_metrics"]
    assert tested["n"] == 8 and tested["epoch"] == best["epoch"] == 2  # the kept weights'
    assert tested["kept"] == best["kept"]["rule"] == summary["kept"] == "ema"  # the default
    # The threshold is the one chosen on validation, applied as a number, not re-tuned.
    assert tested["threshold"] == best["threshold"]
    written = json.loads((out / "test.json").read_text())
    assert len(written["scores"]) == 8 and written["labels"].count(1) == 4
    # Recomputing from the written scores gives the reported figures: nothing re-chose.
    from bonexray.metrics import binary_metrics
    again = binary_metrics(written["labels"], written["scores"], best["threshold"])
    assert again["accuracy"] == pytest.approx(tested["accuracy"])
    assert len(tested["ci95"]["auroc"]) == 2
    assert len(best["split"]["test"]) == 8 and best["split"]["train_studies"] == 8
    # The history (validation every epoch) never saw the test studies.
    assert all(h["valid"]["n"] == 8 for h in json.loads((out / "history.json").read_text()))
    # A relative --test path survives a resume (it is resolved before the comparison).
    import os
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        relative = TrainConfig(data="d", out="rel", epochs=1, image_size=48, batch_size=4,
                               max_steps=1, workers=0, test="d/test")
        train(relative)
        again = train(dataclasses.replace(relative, epochs=2, schedule="constant"),
                      resume=False)
        assert again["test_metrics"]["n"] == 8
        more = dataclasses.replace(relative, out="rel2", schedule="constant")
        train(more)
        assert train(dataclasses.replace(more, epochs=2), resume=True)["epochs"] == 2
    finally:
        os.chdir(here)
    # --test DIR: another folder is the test set; overlapping train data is refused.
    with pytest.raises(TrainError, match="test studies are also train or validation"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "r2"), epochs=1, image_size=48,
                          batch_size=4, max_steps=1, workers=0, test=str(data / "train")))


def test_train_refuses_data_without_studies(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="need labelled studies"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), epochs=1, workers=0))


def test_head_dict_rebuilds_the_network() -> None:
    model = BoneXRayNet(head=(16, 8), dropout=0.3, batch_norm=True, init="xavier")
    again = BoneXRayNet(**model.head_config)
    again.load_state_dict(model.state_dict())  # same modules, same shapes
    assert again.head_config == model.head_config
    with pytest.raises(ValueError, match="disagree"):
        BoneXRayNet(head=(4,), layers=[8])


def test_freeze_keeps_weights_and_batchnorm_statistics() -> None:
    assert parse_freeze("none") is None and parse_freeze("backbone") == 0
    assert parse_freeze("all-but-2") == 2
    with pytest.raises(ValueError, match="all-but-K"):
        parse_freeze("all-but-5")
    model = BoneXRayNet(freeze="all-but-1").train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("net.features.denseblock4", "net.features.norm5",
                                       "net.classifier")) for n in names)
    assert not model.net.features.denseblock3.training
    assert model.net.features.denseblock4.training
    frozen = dict(model.net.features.norm0.named_buffers())["running_mean"].clone()
    model(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(model.net.features.norm0.running_mean, frozen)
    head_only = BoneXRayNet(freeze="backbone")
    assert {n.split(".")[1] for n, p in head_only.named_parameters()
            if p.requires_grad} == {"classifier"}
    assert frozen_modules(BoneXRayNet().net, "none") == []


def test_augmentation_depends_on_seed_epoch_and_item(mura: Path) -> None:
    ds = ViewDataset(find_studies(mura), image_size=32, augment=TrainAugment(30), seed=1)
    first = torch.stack([ds[i][0] for i in range(6)])
    again = torch.stack([ds[i][0] for i in range(6)])
    assert torch.equal(first, again)
    ds.epoch = 1
    assert not torch.equal(first, torch.stack([ds[i][0] for i in range(6)]))
    plain = ViewDataset(find_studies(mura), image_size=32)
    assert not torch.equal(first, torch.stack([plain[i][0] for i in range(6)]))


def test_zoom_shift_and_gamma_add_to_flips_and_rotations() -> None:
    pixels = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64).remainder(251) \
        .to(torch.uint8)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    base = TrainAugment(15)(pixels, seeded())
    # all three off: the very draws and pixels of flips and rotations alone
    assert torch.equal(TrainAugment(15, zoom=0, shift=0, gamma=0)(pixels, seeded()), base)
    for extra in ({"zoom": 0.2}, {"shift": 0.1}, {"gamma": 0.5}):
        out = TrainAugment(15, **extra)(pixels, seeded())
        assert out.dtype == torch.uint8 and out.shape == pixels.shape
        assert not torch.equal(out, base), extra
        assert torch.equal(out, TrainAugment(15, **extra)(pixels, seeded()))
    # gamma keeps black black and white white
    ends = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    assert TrainAugment(0, flip=False, gamma=1.0)(ends, seeded()).tolist() == [[[0, 255]]]
    for bad in ({"zoom": 1.0}, {"shift": 0.6}, {"gamma": -0.1}):
        with pytest.raises(InvalidValueError):
            TrainAugment(15, **bad)


def test_threshold_rule_is_chosen_on_validation(mura: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(TrainConfig(data=str(mura), out=str(out), epochs=1, image_size=32,
                                batch_size=4, max_steps=2, workers=0, threshold="youden"))
    ckpt = torch.load(out / "best.pt", weights_only=True)
    model = BoneXRayNet(**ckpt["head"])
    model.load_state_dict(ckpt["model"])
    valid = [s for s in find_studies(mura) if s.split == "valid"]
    ds = ViewDataset(valid, image_size=32, resize=ckpt["resize"])
    pred = predict_studies(model, DataLoader(ds, batch_size=8, collate_fn=collate_views), ds,
                           pick_device("cpu"))
    want = choose_threshold(pred["labels"], pred["scores"], "youden")
    assert ckpt["threshold"] == pytest.approx(want)
    assert ckpt["threshold_rule"] == "youden" and summary["threshold"] == pytest.approx(want)
    assert ckpt["metrics"]["threshold"] == pytest.approx(want)
    assert (out / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TrainError, match="sensitivity=X"):
        TrainConfig(data=str(mura), out=str(out), threshold="median")


def test_resume_continues_exactly(mura: Path, tmp_path: Path) -> None:
    def config(out: Path, epochs: int, **kw: object) -> TrainConfig:
        return TrainConfig(data=str(mura), out=str(out), epochs=epochs, image_size=32,
                           batch_size=4, max_steps=2, workers=0, schedule="constant",
                           lr=1e-3, head=(8,), dropout=0.5, **kw)  # type: ignore[arg-type]

    train(config(tmp_path / "straight", 2))
    train(config(tmp_path / "split", 1))
    summary = train(config(tmp_path / "split", 2), resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert b["epoch"] == 2 and [h["epoch"] for h in b["history"]] == [1, 2]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    assert summary["best_epoch"] in (1, 2)
    with pytest.raises(TrainError, match="image_size: 32 -> 48"):
        train(dataclasses.replace(config(tmp_path / "split", 3), image_size=48), resume=True)
    cycle = dataclasses.replace(config(tmp_path / "cycle", 1), schedule="onecycle")
    train(cycle)
    with pytest.raises(TrainError, match="laid out for 1 epochs"):
        train(dataclasses.replace(cycle, epochs=2), resume=True)
    with pytest.raises(TrainError, match="not found"):
        train(config(tmp_path / "nothing", 1), resume=True)


def test_cli_train_variants(mura: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bonexray.cli import cli

    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, [
        "train", str(mura), "--out", str(out), "--epochs", "1", "--image-size", "32",
        "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--head", "16,8",
        "--dropout", "0.2", "--batch-norm", "--init", "kaiming", "--freeze", "all-but-2",
        "--threshold", "sensitivity=0.9", "--resize", "stretch", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["resize"] == "stretch" and ckpt["config"]["resize"] == "stretch"
    assert ckpt["head"] == {"layers": [16, 8], "dropout": 0.2, "batch_norm": True,
                            "init": "kaiming"}
    assert ckpt["config"]["freeze"] == "all-but-2"
    assert ckpt["config"]["out"] == str(out.resolve())
    assert summary["threshold"] == ckpt["threshold"]
    bad = CliRunner().invoke(cli, ["train", str(mura), "--out", str(out), "--head", "x"])
    assert bad.exit_code != 0 and "512,256" in bad.output
    bad = CliRunner().invoke(cli, ["train", str(mura), "--out", str(out), "--freeze", "some"])
    assert bad.exit_code != 0 and "all-but-K" in bad.output and "Traceback" not in bad.output


def test_snapshots_keep_the_last_epochs_for_an_ensemble(mura: Path, tmp_path: Path) -> None:
    from bonexray.export.onnx import load_members

    out = tmp_path / "snap"
    train(TrainConfig(data=str(mura), out=str(out), epochs=3, image_size=32, batch_size=4,
                      max_steps=1, workers=0, snapshots=2))
    assert sorted(p.name for p in out.glob("epoch*.pt")) == ["epoch2.pt", "epoch3.pt"]
    members = load_members([out / "epoch2.pt", out / "epoch3.pt"])
    assert [m.ckpt["epoch"] for m in members] == [2, 3]
    assert "optimizer" not in members[0].ckpt  # weights and what export reads, no more
    last = torch.load(out / "last.pt", weights_only=True)
    torch.testing.assert_close(dict(members[1].net.state_dict()), dict(last["model"]))
    with pytest.raises(TrainError, match="snapshots must be within 0..epochs"):
        TrainConfig(data=str(mura), out=str(out), epochs=2, snapshots=3)


def test_weight_ema_follows_parameters_and_batchnorm_statistics() -> None:
    from bonexray.trainer.train import WeightEMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(net, decay=0.5)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)  # in place, as an optimizer step is
        net.train()(torch.randn(4, 3))  # moves BatchNorm's running statistics
        ema.update()
        d = min(0.5, (1 + ema.updates) / (10 + ema.updates))
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
            else:
                expected[k] = v.clone()
    got = ema.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)
    assert got["1.num_batches_tracked"] == 3  # integer buffers are copied, not averaged
    assert not torch.equal(got["0.weight"], net.state_dict()["0.weight"])


def test_checkpoint_rules_keep_the_weights_they_name(mura: Path, tmp_path: Path) -> None:
    from bonexray.trainer.train import average_weights

    data = make_mura(tmp_path / "d", patients=2, splits=("train", "valid", "test"))
    out = tmp_path / "ema"
    summary = train(TrainConfig(data=str(data), out=str(out), epochs=3, image_size=32,
                                batch_size=4, max_steps=2, workers=0, checkpoint="ema",
                                candidates=True, average_last=2))
    assert summary["kept"] == "ema" and summary["kept_epochs"] == [1, 2, 3]
    assert set(summary["candidates"]) == {"best-valid", "last", "ema", "average"}
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["kept"] == {"rule": "ema", "epochs": [1, 2, 3]}
    assert "optimizer" not in best and "ema" not in best
    last = torch.load(out / "last.pt", weights_only=True)
    torch.testing.assert_close(best["model"], last["ema"])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    # best.pt's threshold and metrics are its own weights' on validation; test used them.
    assert best["metrics"]["auroc"] == summary["kept_metrics"]["auroc"] == \
        summary["candidates"]["ema"]
    assert best["test_metrics"]["kept"] == "ema" and summary["test_metrics"]["n"] == 8
    cand = {p.stem: torch.load(p, weights_only=True) for p in (out / "candidates").glob("*.pt")}
    torch.testing.assert_close(cand["ema"]["model"], best["model"])
    torch.testing.assert_close(cand["last"]["model"], last["model"])
    # average: the mean of the last two epochs' weights, which the run kept as snapshots.
    snaps = [torch.load(out / f"epoch{n}.pt", weights_only=True)["model"] for n in (2, 3)]
    key = "net.features.conv0.weight"
    torch.testing.assert_close(cand["average"]["model"][key], (snaps[0][key] + snaps[1][key]) / 2)
    torch.testing.assert_close(average_weights(snaps)[key], cand["average"]["model"][key])
    assert cand["average"]["kept"]["epochs"] == [2, 3]
    assert cand["best-valid"]["kept"]["rule"] == "best-valid"
    # The last epoch's weights: best.pt is last.pt's model.
    out2 = tmp_path / "last"
    train(TrainConfig(data=str(mura), out=str(out2), epochs=2, image_size=32, batch_size=4,
                      max_steps=1, workers=0, checkpoint="last"))
    torch.testing.assert_close(torch.load(out2 / "best.pt", weights_only=True)["model"],
                               torch.load(out2 / "last.pt", weights_only=True)["model"])
    assert not (out2 / "candidates").exists()
    # best-valid with --candidates: best.pt is the best epoch, and candidates/ holds it too;
    # a fresh run in the same folder removes what the earlier run kept.
    summary = train(TrainConfig(data=str(mura), out=str(out2), epochs=2, image_size=32,
                                batch_size=4, max_steps=1, workers=0, candidates=True,
                                checkpoint="best-valid"))
    assert summary["kept"] == "best-valid" and summary["kept_epochs"] == [summary["best_epoch"]]
    best = torch.load(out2 / "best.pt", weights_only=True)
    torch.testing.assert_close(best["model"], torch.load(
        out2 / "candidates" / "best-valid.pt", weights_only=True)["model"])
    assert summary["kept_metrics"]["auroc"] == summary["best_auroc"]
    train(TrainConfig(data=str(mura), out=str(out2), epochs=1, image_size=32, batch_size=4,
                      max_steps=1, workers=0, checkpoint="last"))
    assert not list((out2 / "candidates").glob("*.pt"))


def test_resume_continues_the_weight_average(mura: Path, tmp_path: Path) -> None:
    def config(out: Path, epochs: int) -> TrainConfig:
        return TrainConfig(data=str(mura), out=str(out), epochs=epochs, image_size=32,
                           batch_size=4, max_steps=2, workers=0, schedule="constant",
                           lr=1e-3, checkpoint="ema")

    train(config(tmp_path / "straight", 2))
    train(config(tmp_path / "split", 1))
    train(config(tmp_path / "split", 2), resume=True)
    a = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "best.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    with pytest.raises(TrainError, match="checkpoint: 'ema' -> 'last'"):
        train(dataclasses.replace(config(tmp_path / "split", 3), checkpoint="last"),
              resume=True)
    with pytest.raises(TrainError, match="candidates: False -> True"):
        train(dataclasses.replace(config(tmp_path / "split", 3), candidates=True),
              resume=True)
    # A run that stopped after its last epoch but before keeping its weights keeps them
    # when resumed; a finished run is left as it is.
    (tmp_path / "split" / "best.pt").unlink()
    summary = train(config(tmp_path / "split", 2), resume=True)
    assert summary["kept"] == "ema" and summary["kept_epochs"] == [1, 2]
    again = torch.load(tmp_path / "split" / "best.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=0, atol=0)
    assert train(config(tmp_path / "split", 2), resume=True)["kept"] == "ema"


def test_recipes_fill_what_is_not_given(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> \
        None:
    from bonexray.trainer.recipes import RECIPES
    from bonexray.trainer.train import recipe_config

    plain = recipe_config("default", data="d", out="o", image_size=None)
    assert plain == TrainConfig(data="d", out="o", recipe="default")
    with caplog.at_level(logging.WARNING):
        mura = recipe_config("mura", data="d", out="o", batch_size=4)
    assert "ImageNet weights" in caplog.text
    assert (mura.image_size, mura.batch_size, mura.lr, mura.optimizer, mura.schedule) == \
        (320, 4, 1e-4, "adam", "plateau")
    assert (mura.loss_weights, mura.checkpoint, mura.rotation, mura.recipe) == \
        ("body-part", "best-valid", 30.0, "mura")
    # Every recipe names every setting the recipes control, so none leaks from another.
    assert len({frozenset(r) for r in RECIPES.values()}) == 1
    with pytest.raises(TrainError, match="unknown recipe 'fast'; choose one of default, mura"):
        recipe_config("fast", data="d", out="o")


def test_cli_recipe_mura_trains_with_adam(mura: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bonexray.cli import cli

    out = tmp_path / "m"
    result = CliRunner().invoke(cli, [
        "train", str(mura), "--out", str(out), "--recipe", "mura", "--epochs", "1",
        "--image-size", "32", "--max-steps", "1", "--workers", "0", "--zoom", "0.1",
        "--gamma", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["recipe"] == "mura" and ckpt["config"]["batch_size"] == 8
    assert (ckpt["config"]["zoom"], ckpt["config"]["shift"], ckpt["config"]["gamma"]) == \
        (0.1, 0.0, 0.2)
    assert ckpt["config"]["image_size"] == 32  # given on the command line: it wins
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert "betas" in ckpt["optimizer"]["param_groups"][0]
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0  # Adam, not AdamW
    assert ckpt["scheduler"].get("patience") == 0  # divide on plateau, MURA's
