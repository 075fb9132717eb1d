"""A plain PyTorch training loop, no bonexray code: the yardstick of ../shared/MEASURED.md
rebuilt, to compare with `bonexray train` on the very same train/valid split.

DenseNet-169 from scratch, grayscale images resized (stretched) to SIZE px and repeated to
3 channels with ImageNet normalisation, AdamW with a one-cycle schedule peaking at 1e-3,
batch 32, random flips and +-15 degree rotations, BCE with pos_weight = negatives /
positives, validation AUROC (one image = one study) after every epoch.

    python benchmarks/plain_loop.py DATA [--epochs 8] [--size 128] [--out SCORES.json]

DATA is a MURA layout with train/ and valid/ (and test/) splits whose study folders end
in _positive / _negative (what `bonexray import fracatlas` writes). The epoch with the
best validation AUROC is kept; when DATA has test/, that epoch scores it once at the end.
Prints one JSON object per epoch and a final one; --out writes the test scores and
labels (for bootstrap intervals).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import models, transforms


def items(root: Path) -> list[tuple[str, int]]:
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg") and path.is_file():
            study = path.parent.name
            if study.endswith("_positive") or study.endswith("_negative"):
                out.append((str(path), int(study.endswith("_positive"))))
    return out


class Views(Dataset):
    def __init__(self, entries: list[tuple[str, int]], transform: transforms.Compose) -> None:
        self.entries, self.transform = entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        path, label = self.entries[i]
        with Image.open(path) as img:
            x = self.transform(img.convert("L"))
        return x.repeat(3, 1, 1), float(label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    norm = transforms.Normalize([0.485, 0.456, 0.406][:1], [0.229, 0.224, 0.225][:1])
    train_tf = transforms.Compose([
        transforms.Resize((args.size, args.size)), transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(15), transforms.ToTensor(), norm])
    valid_tf = transforms.Compose([
        transforms.Resize((args.size, args.size)), transforms.ToTensor(), norm])
    train_items, valid_items = items(args.data / "train"), items(args.data / "valid")
    positives = sum(label for _, label in train_items)
    pos_weight = torch.tensor((len(train_items) - positives) / positives)
    train_loader = DataLoader(Views(train_items, train_tf), batch_size=args.batch, shuffle=True,
                              num_workers=args.workers, drop_last=False)
    valid_loader = DataLoader(Views(valid_items, valid_tf), batch_size=64,
                              num_workers=args.workers)

    model = models.densenet169(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=args.epochs * len(train_loader))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    def predict(loader: DataLoader) -> tuple[list[float], list[float]]:
        model.eval()
        scores, labels = [], []
        with torch.no_grad():
            for x, y in loader:
                scores.extend(torch.sigmoid(model(x).squeeze(1)).tolist())
                labels.extend(y.tolist())
        return scores, labels

    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, args.epochs + 1):
        started = time.monotonic()
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x).squeeze(1), y.float())
            loss.backward()
            optimizer.step()
            schedule.step()
        scores, labels = predict(valid_loader)
        auroc = float(roc_auc_score(labels, scores))
        if auroc > best:
            best, best_epoch = auroc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(json.dumps({"epoch": epoch, "valid_auroc": round(auroc, 4),
                          "seconds": round(time.monotonic() - started, 1)}), flush=True)
    final = {"best_valid_auroc": round(best, 4), "best_epoch": best_epoch,
             "train": len(train_items), "valid": len(valid_items), "size": args.size,
             "epochs": args.epochs, "seed": args.seed}
    test_items = items(args.data / "test") if (args.data / "test").is_dir() else []
    if test_items and best_state is not None:
        model.load_state_dict(best_state)
        test_loader = DataLoader(Views(test_items, valid_tf), batch_size=64,
                                 num_workers=args.workers)
        scores, labels = predict(test_loader)
        final.update(test=len(test_items), test_auroc=round(float(roc_auc_score(labels, scores)),
                                                             4))
        if args.out is not None:
            args.out.write_text(json.dumps({
                **final, "scores": scores, "labels": labels,
                "studies": [str(Path(path).parent) for path, _ in test_items]}))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
