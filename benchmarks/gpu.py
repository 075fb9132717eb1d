"""GPU figures for a session lent a GPU (see benchmarks/gpu.sh): what can travel there.

onnxruntime-gpu (256 MB) cannot travel to the lent machine, so this measures the two walls
of a GPU worker with what is there: DenseNet-169 in PyTorch CUDA at fp32 / fp16 / bf16
(channels_last; the ceiling an ORT CUDA session approaches) and the pipeline's decode
capacity with all the machine's cores (bonexray.imaging.load_view in a thread pool). It
prints one JSON object as its last line and appends a section to benchmarks/RESULTS.md.

    PYTHONPATH=. python3 benchmarks/gpu.py [--quick] [--device cuda] [--results FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonexray.bench import measure_decode  # noqa: E402
from bonexray.synth import render_view  # noqa: E402


def measure_model(device: str, dtype_name: str, size: int, batch: int, repeats: int) -> float:
    """Images per second of BoneXRayNet on uint8 input, eval mode, no grad."""
    import torch

    from bonexray.trainer.network import BoneXRayNet

    net = BoneXRayNet().eval().to(device).to(memory_format=torch.channels_last)
    pixels = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    on_cuda = device.startswith("cuda")

    def step() -> None:
        with torch.no_grad(), torch.autocast(device_type="cuda" if on_cuda else "cpu",
                                             dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
            net(pixels)

    return batch / median_seconds(step, repeats, warmup=3, on_cuda=on_cuda)


def median_seconds(step: Callable[[], None], repeats: int, *, warmup: int,
                   on_cuda: bool) -> float:
    """Median wall time of step(), synchronising the GPU around each timed call."""
    import torch

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_train_step(device: str, size: int, batch: int, repeats: int) -> float:
    """Training images per second with bf16 autocast (the trainer's CUDA recipe)."""
    import torch

    from bonexray.trainer.network import BoneXRayNet

    net = BoneXRayNet().train().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    pixels = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device).float()
    on_cuda = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device_type="cuda" if on_cuda else "cpu", dtype=torch.bfloat16,
                            enabled=on_cuda):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(pixels), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / median_seconds(step, repeats, warmup=2, on_cuda=on_cuda)


def write_images(folder: Path, n: int, side: int, fmt: str) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = render_view(rng, body_part="wrist", abnormal=bool(i % 2), sign=None, size=side)
        img = Image.fromarray(pixels)
        if fmt == "png":
            img.save(folder / f"v{i:04d}.png", compress_level=6)
        else:
            img.save(folder / f"v{i:04d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run with --device cpu for a smoke test")
    repeats = 3 if args.quick else 10
    sizes = (224,) if args.quick else (224, 320)
    batches = (32,) if args.quick else (32, 128)
    dtypes = ("fp32", "bf16") if args.quick else ("fp32", "fp16", "bf16")
    if args.device == "cpu":
        sizes, batches, dtypes, repeats = (64,), (8,), ("fp32",), 2
    result: dict[str, object] = {
        "date": dt.date.today().isoformat(),
        "machine": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                    else platform.processor() or platform.machine()),
        "cores": os.cpu_count(), "torch": torch.__version__, "device": args.device,
        "inference_ips": {}, "train_ips": {}, "decode_ips": {},
    }
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    for size in sizes:
        for batch in batches:
            for dtype in dtypes:
                key = f"{dtype}@{size}px,b{batch}"
                result["inference_ips"][key] = round(  # type: ignore[index]
                    measure_model(args.device, dtype, size, batch, repeats), 1)
        train_batch = 8 if args.device == "cpu" else 64
        result["train_ips"][f"bf16@{size}px,b{train_batch}"] = round(  # type: ignore[index]
            measure_train_step(args.device, size, train_batch, max(2, repeats // 2)), 1)
    n_images = 64 if (args.quick or args.device == "cpu") else 256
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "jpg"):
            write_images(Path(tmp) / fmt, n_images, 760, fmt)
            for threads in sorted({1, os.cpu_count() or 1}):
                paths = sorted(str(p) for p in (Path(tmp) / fmt).iterdir())
                result["decode_ips"][f"{fmt}@224px,{threads}threads"] = round(  # type: ignore[index]
                    measure_decode(paths, 224, threads, max(2, repeats // 3)), 1)
    text = json.dumps(result)
    section = (f"\n## GPU run, {result['date']}, {result['machine']} ({result['cores']} cores)\n\n"
               f"Command: `PYTHONPATH=. python3 benchmarks/gpu.py"
               f"{' --quick' if args.quick else ''} --device {args.device}`\n\n"
               f"```json\n{json.dumps(result, indent=1)}\n```\n")
    with open(args.results, "a") as fh:
        fh.write(section)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu.json").write_text(text + "\n")
        Path(out, "RESULTS-gpu.md").write_text(section)
    print(text)


if __name__ == "__main__":
    main()
