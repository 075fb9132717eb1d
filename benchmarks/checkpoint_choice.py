"""Which weights to keep, and whether cheap inference tricks pay: the test split of one
training run scored with every candidate the trainer wrote, each alone and with
horizontal-flip test-time augmentation, and the snapshot ensemble of its last epochs.

    bonexray train DATA --out RUN ... --candidates --snapshots K
    python benchmarks/checkpoint_choice.py RUN [--out DIR]

RUN/candidates/<rule>.pt are the weights of each --checkpoint rule (best-valid, last, ema,
average), validated by the trainer; RUN/epoch<N>.pt are the snapshots. The test studies
are those the run recorded (its checkpoint's split: the layout's test/ or --test DIR).
This is a research tool: it looks at the test split once per candidate, which a run that
chooses its weights must not do; the trainer itself scores only the weights it keeps.

Prints one JSON object: per candidate (and per candidate with flip TTA, and the snapshot
ensemble) the validation AUROC the trainer recorded, the test AUROC and its 95% bootstrap
interval. --out DIR writes DIR/<name>.json with scores, labels and studies, for
benchmarks/compare_runs.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonexray.export.onnx import load_checkpoint_model
from bonexray.metrics import auroc, bootstrap_ci
from bonexray.studies import find_studies
from bonexray.trainer.data import ViewDataset
from bonexray.trainer.train import TrainConfig, _loader, predict_studies


class MeanOfProbabilities(nn.Module):
    """Several networks (or one, with flip TTA) as one: the logit of the mean probability."""

    def __init__(self, nets: list[nn.Module], flip: bool) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.flip = flip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        views = [pixels, pixels.flip(-1)] if self.flip else [pixels]
        probs = [torch.sigmoid(net(v)) for net in self.nets for v in views]
        return torch.logit(torch.stack(probs).mean(0), eps=1e-7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    paths = sorted((args.run / "candidates").glob("*.pt"))
    if not paths:
        raise SystemExit(f"{args.run}/candidates holds no checkpoint: train with --candidates")
    loaded = {p.stem: load_checkpoint_model(p) for p in paths}
    ckpts = {name: ckpt for name, (_, ckpt) in loaded.items()}
    first = next(iter(ckpts.values()))
    split = first["split"]
    root = Path(split["data"])
    wanted = {(root / rel).as_posix() if not Path(rel).is_absolute() else rel
              for rel in split["test"]}
    config = first["config"]
    search = [root] + ([Path(config["test"])] if config.get("test") else [])
    by_path = {Path(s.key).as_posix(): s for base in search for s in find_studies(base)}
    studies = [s for path, s in by_path.items() if path in wanted]
    if len(studies) != len(wanted):
        raise SystemExit(f"found {len(studies)} of the {len(wanted)} recorded test studies")
    dataset = ViewDataset(studies, image_size=int(first["image_size"]),
                          resize=str(first["resize"]))
    loader = _loader(dataset, TrainConfig(data=str(root), out=str(args.run),
                                          workers=args.workers), shuffle=False, batch_size=64)
    device = torch.device("cpu")

    models: dict[str, tuple[nn.Module, float | None]] = {}
    for name, (net, ckpt) in loaded.items():
        valid = (ckpt.get("metrics") or {}).get("auroc")
        models[name] = (MeanOfProbabilities([net], flip=False), valid)
        models[f"{name}+flip"] = (MeanOfProbabilities([net], flip=True), None)
    snapshots = sorted(args.run.glob("epoch*.pt"), key=lambda p: int(p.stem[5:]))
    if len(snapshots) > 1:
        nets: list[nn.Module] = [load_checkpoint_model(p)[0] for p in snapshots]
        label = f"snapshots{snapshots[0].stem[5:]}-{snapshots[-1].stem[5:]}"
        models[label] = (MeanOfProbabilities(nets, flip=False), None)

    report: dict[str, Any] = {"run": str(args.run), "test_studies": len(studies),
                              "candidates": {}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for name, (model, valid) in models.items():
        pred = predict_studies(model, loader, dataset, device)
        low, high = bootstrap_ci(pred["labels"], pred["scores"], 0.5, seed=0)["auroc"]
        report["candidates"][name] = {
            "valid_auroc": None if valid is None else round(float(valid), 4),
            "test_auroc": round(auroc(pred["labels"], pred["scores"]), 4),
            "ci95": [round(low, 4), round(high, 4)]}
        if args.out is not None:
            (args.out / f"{name}.json").write_text(json.dumps(
                {"scores": pred["scores"], "labels": pred["labels"],
                 "studies": pred["studies"]}))
        print(json.dumps({name: report["candidates"][name]}), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
