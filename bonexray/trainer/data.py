"""Views of labelled studies as a torch Dataset, with MURA's flip + rotation augmentation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from bonexray.errors import InvalidValueError
from bonexray.imaging import DEFAULT_MAX_PIXELS, DEFAULT_RESIZE, ImageError, load_view
from bonexray.studies import Study

log = logging.getLogger(__name__)

# Study index returned for a view that failed to decode; collate_views drops it.
FAILED = -1


class TrainAugment:
    """Augmentation on uint8 [1,S,S] tensors: MURA's random lateral (horizontal) flip and
    rotation by up to +-`rotation` degrees; optionally a zoom by a factor in [1-zoom,
    1+zoom], a shift by up to +-`shift` of the side each way, and a gamma drawn
    log-uniformly from [exp(-gamma), exp(gamma)] (an exposure/window change that keeps
    black and white). Drawn from an explicit generator so that an item's augmentation
    depends on (seed, epoch, item) only, not on DataLoader workers; the flip and rotation
    draws come first, so adding the others leaves them as they were."""

    def __init__(self, rotation: float = 30.0, flip: bool = True, *, zoom: float = 0.0,
                 shift: float = 0.0, gamma: float = 0.0) -> None:
        if rotation < 0:
            raise InvalidValueError(f"rotation must be >= 0 degrees, got {rotation}")
        if not 0.0 <= zoom < 1.0:
            raise InvalidValueError(f"zoom must be within [0, 1), got {zoom}")
        if not 0.0 <= shift <= 0.5:
            raise InvalidValueError(f"shift must be within [0, 0.5] of the side, got {shift}")
        if not 0.0 <= gamma <= 2.0:
            raise InvalidValueError(f"gamma must be within [0, 2], got {gamma}")
        self.rotation = float(rotation)
        self.flip = flip
        self.zoom, self.shift, self.gamma = float(zoom), float(shift), float(gamma)

    def __call__(self, pixels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        draws = torch.rand(2, generator=generator).tolist()
        more = torch.rand(4, generator=generator).tolist() \
            if self.zoom or self.shift or self.gamma else [0.5] * 4
        if self.flip and draws[0] < 0.5:
            pixels = v2.functional.horizontal_flip(pixels)
        angle = (2.0 * draws[1] - 1.0) * self.rotation
        if self.zoom or self.shift:
            side = pixels.shape[-1]
            scale = 1.0 + (2.0 * more[0] - 1.0) * self.zoom
            moves = [round((2.0 * d - 1.0) * self.shift * side) for d in more[1:3]]
            pixels = v2.functional.affine(pixels, angle=angle, translate=moves, scale=scale,
                                          shear=[0.0, 0.0],
                                          interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        elif self.rotation > 0:
            pixels = v2.functional.rotate(pixels, angle,
                                          interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        if self.gamma:
            pixels = v2.functional.adjust_gamma(
                pixels, math.exp((2.0 * more[3] - 1.0) * self.gamma))
        return pixels


def check_header(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a view cannot be an image, from its header only (cheap), or None when it may be."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not a decodable image"
    except Image.DecompressionBombError:
        return "image too large"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable: {exc}"
    if w * h > max_pixels or w < 1 or h < 1:
        return f"unusable size {w}x{h}"
    return None


class ViewDataset(Dataset[tuple[torch.Tensor, float, int]]):
    """Every view of the given labelled studies: (uint8 [1,S,S], label, study index).

    Views whose header is unusable (missing, empty, not an image, too large) are dropped
    at build with one warning; a view that fails at full decode (truncated, corrupt data)
    yields study index FAILED, which `collate_views` drops, so training goes on.
    """

    def __init__(self, studies: Sequence[Study], *, image_size: int,
                 resize: str = DEFAULT_RESIZE, augment: TrainAugment | None = None,
                 check: bool = True, seed: int = 0) -> None:
        unlabelled = [s.key for s in studies if s.label is None]
        if unlabelled:
            raise InvalidValueError(
                f"{len(unlabelled)} studies have no label (e.g. {unlabelled[0]}); "
                "name folders *_positive / *_negative or add MURA CSVs"
            )
        self.studies = list(studies)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.seed = seed
        self.epoch = 0  # set by the trainer before each epoch; new workers see it
        self.items: list[tuple[str, int]] = []
        dropped: list[tuple[str, str]] = []
        for index, study in enumerate(self.studies):
            for view in study.views:
                reason = check_header(view) if check else None
                if reason is None:
                    self.items.append((view, index))
                else:
                    dropped.append((view, reason))
        if dropped:
            log.warning("dropped %d of %d views that cannot be read (e.g. %s: %s)",
                        len(dropped), len(dropped) + len(self.items), *dropped[0])
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int]:
        """The label of every item, in order (for class weights)."""
        return [int(self.studies[i].label or 0) for _, i in self.items]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, float, int]:
        path, index = self.items[item]
        try:
            pixels = load_view(path, self.image_size, self.resize)
        except ImageError as exc:
            log.warning("view skipped: %s: %s", path, exc)
            return torch.zeros(1, self.image_size, self.image_size, dtype=torch.uint8), \
                float("nan"), FAILED
        tensor = torch.from_numpy(pixels.copy()).unsqueeze(0)
        if self.augment is not None:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 10_000_019 + item)
            tensor = self.augment(tensor, generator)
        return tensor, float(self.studies[index].label or 0), index


def collate_views(
    batch: list[tuple[torch.Tensor, float, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch, dropping views that failed to decode (possibly to an empty batch)."""
    kept = [b for b in batch if b[2] != FAILED]
    if not kept:
        size = batch[0][0].shape[-1] if batch else 0
        return (torch.zeros(0, 1, size, size, dtype=torch.uint8), torch.zeros(0),
                torch.zeros(0, dtype=torch.long))
    return (torch.stack([b[0] for b in kept]),
            torch.tensor([b[1] for b in kept], dtype=torch.float32),
            torch.tensor([b[2] for b in kept], dtype=torch.long))
