"""Training speed on this machine: images/s of optimizer steps of DenseNet-169, plain
PyTorch (torchvision, float input) against bonexray's network (uint8 input, preprocessing
in the model) in the memory format the trainer picks for the device, and channels_last
against contiguous for each.

    python benchmarks/train_speed.py [--size 128] [--batch 16] [--steps 6] [--repeats 3]

Every setting runs `steps` optimizer steps after one warm-up step, interleaved over
`repeats` rounds; the median images/s of each is printed with the ratios, as one JSON
object. Thread count: torch's default (set OMP_NUM_THREADS to pin it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

from bonexray.trainer.network import BoneXRayNet
from bonexray.trainer.train import _memory_format


def _steps(model: nn.Module, make_batch: Callable[[], torch.Tensor], memory: torch.memory_format,
           steps: int) -> float:
    """Images/s of `steps` AdamW steps (BCE on one logit), after one warm-up step."""
    model = model.to(memory_format=memory).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    x = make_batch().contiguous(memory_format=memory)
    y = torch.randint(0, 2, (x.shape[0],)).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).reshape(-1), y)
        loss.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * x.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    plain = models.densenet169(weights=None)
    plain.classifier = nn.Linear(plain.classifier.in_features, 1)
    ours = BoneXRayNet()

    def floats() -> torch.Tensor:
        return torch.randn(args.batch, 3, args.size, args.size)

    def pixels() -> torch.Tensor:
        return torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8)

    trainer_format = _memory_format(torch.device("cpu"))
    settings: dict[str, tuple[nn.Module, Callable[[], torch.Tensor], torch.memory_format]] = {
        "plain_contiguous": (plain, floats, torch.contiguous_format),
        "plain_channels_last": (plain, floats, torch.channels_last),
        "bonexray_contiguous": (ours, pixels, torch.contiguous_format),
        "bonexray_channels_last": (ours, pixels, torch.channels_last),
    }
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (model, make, memory) in settings.items():
            rates[name].append(_steps(model, make, memory, args.steps))
    median = {name: statistics.median(values) for name, values in rates.items()}
    trainer_name = ("bonexray_channels_last" if trainer_format == torch.channels_last
                    else "bonexray_contiguous")
    print(json.dumps({
        "size": args.size, "batch": args.batch, "steps": args.steps,
        "threads": torch.get_num_threads(),
        "images_per_s": {k: round(v, 2) for k, v in median.items()},
        "repeats": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "trainer_cpu_memory_format": str(trainer_format),
        "channels_last_over_contiguous": {
            "plain": round(median["plain_channels_last"] / median["plain_contiguous"], 3),
            "bonexray": round(median["bonexray_channels_last"]
                              / median["bonexray_contiguous"], 3)},
        "trainer_over_best_plain": round(
            median[trainer_name] / max(median["plain_contiguous"],
                                       median["plain_channels_last"]), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
