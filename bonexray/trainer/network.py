"""The network: in-graph preprocessing + DenseNet-169 with a one-logit head."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import DenseNet169_Weights, densenet169

from bonexray.errors import BonexrayError, InvalidValueError

log = logging.getLogger(__name__)

ARCHITECTURE = "densenet169"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INITS = ("default", "kaiming", "xavier")
DENSE_BLOCKS = 4
# Older torchvision DenseNet checkpoints name layers 'norm.1' where modules now say 'norm1';
# the same pattern torchvision's own loader remaps.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_STRIP_PREFIXES = ("module.", "net.")


class WeightsError(BonexrayError, ValueError):
    """Initial weights that cannot be found or do not fit the network."""


class Preprocess(nn.Module):
    """uint8 (or float 0..255) [N,1,H,W] -> ImageNet-normalised float [N,3,H,W]."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: constants of the recipe, not weights; checkpoints stay model-only.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != 1):
            raise ValueError(f"expected pixels [N,1,H,W], got {tuple(pixels.shape)}")
        # (x/255 - mean)/std folded into one multiply-add; broadcasting repeats the channel.
        return x * self.scale - self.shift


def _make_head(in_features: int, head: tuple[int, ...], dropout: float, batch_norm: bool,
               init: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in head:
        if hidden < 1:
            raise InvalidValueError(f"head layer widths must be >= 1, got {head}")
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    if dropout > 0 and not head:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, 1))
    for m in layers:
        if isinstance(m, nn.Linear):
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:  # torchvision's DenseNet initialisation of its classifier
                continue
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def imagenet_weights_path() -> Path:
    """Where torchvision's cache keeps the ImageNet DenseNet-169 weights file."""
    url = DenseNet169_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(f"cannot read weights from {path}: {exc}") from None
    # A bonexray checkpoint or a {"state_dict": ...} wrapper: take the weights inside.
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return obj


def remap_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and rename legacy 'norm.1'-style DenseNet keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if match := _LEGACY_KEY.match(key):
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def load_backbone_weights(net: nn.Module, path: str | Path) -> None:
    """Load a DenseNet-169 state dict into `net`; a classifier that does not fit is skipped."""
    state = remap_state_dict(_read_state_dict(Path(path)))
    own = net.state_dict()
    classifier = {k: v for k, v in state.items() if k.startswith("classifier.")}
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    fits = all(k in own and own[k].shape == v.shape for k, v in classifier.items())
    if classifier and fits and set(classifier) == {k for k in own if k.startswith("classifier.")}:
        state.update(classifier)
    elif classifier:
        log.info("weights %s: classifier (%d keys) does not fit the head; head kept fresh",
                 path, len(classifier))
    # Files from older releases lack BatchNorm's step counters; they are not weights.
    missing = [k for k in own if not k.startswith("classifier.") and k not in state
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path} is not a DenseNet-169 state dict: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} of the wrong shape (e.g. {mismatched[:2]})"
        )
    net.load_state_dict(state, strict=False)


def build_model(*, weights: str | None = None, head: tuple[int, ...] = (), dropout: float = 0.0,
                batch_norm: bool = False, init: str = "default") -> nn.Module:
    """DenseNet-169 whose classifier is a head ending in one logit.

    weights: None (from scratch), "imagenet" (torchvision's IMAGENET1K_V1, read from the
    torch hub cache, never downloaded) or a path to a local state dict.
    """
    if init not in INITS:
        raise InvalidValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if not 0.0 <= dropout < 1.0:
        raise InvalidValueError(f"dropout {dropout} outside [0, 1)")
    net = densenet169(weights=None)
    # The head first, so that a bonexray checkpoint with the same head keeps its classifier.
    net.classifier = _make_head(net.classifier.in_features, tuple(head), dropout, batch_norm,
                                init)
    if weights == "imagenet":
        path = imagenet_weights_path()
        if not path.is_file():
            raise WeightsError(
                f"ImageNet weights not found at {path}; this machine does not download them. "
                f"Fetch {DenseNet169_Weights.IMAGENET1K_V1.url} elsewhere and copy it there "
                "(or set TORCH_HOME), or pass the file's path as weights"
            )
        load_backbone_weights(net, path)
    elif weights is not None:
        load_backbone_weights(net, weights)
    return net


def parse_freeze(spec: str) -> int | None:
    """Dense blocks left trainable: None for "none" (all of it trains), 0 for "backbone",
    K for "all-but-K" (the last K of DenseNet's 4 dense blocks train, the rest is frozen)."""
    text = spec.strip().lower()
    if text == "none":
        return None
    if text in ("backbone", "all"):
        return 0
    if text.startswith("all-but-"):
        try:
            k = int(text[len("all-but-"):])
        except ValueError:
            k = -1
        if 1 <= k <= DENSE_BLOCKS:
            return k
    raise InvalidValueError(
        f"unknown freeze {spec!r}; choose none, backbone or all-but-K with K in 1..{DENSE_BLOCKS}"
    )


def frozen_modules(net: nn.Module, spec: str) -> list[nn.Module]:
    """The modules of a torchvision DenseNet that `spec` (see parse_freeze) freezes."""
    keep = parse_freeze(spec)
    if keep is None:
        return []
    features = net.features  # type: ignore[union-attr]
    names = [name for name, _ in features.named_children()]
    if keep == 0:
        return [features]
    # Everything before the first trainable dense block; its transitions and norm5 train.
    first = f"denseblock{DENSE_BLOCKS - keep + 1}"
    return [getattr(features, n) for n in names[: names.index(first)]]


class BoneXRayNet(nn.Module):
    """uint8 [N,1,H,W] -> abnormality logits [N]; used alike by training and export.

    `BoneXRayNet(**checkpoint["head"])` rebuilds the network a checkpoint was trained with
    (`layers` is the head's name in that dict; `freeze` only matters while training).
    """

    def __init__(self, *, weights: str | None = None, head: tuple[int, ...] = (),
                 dropout: float = 0.0, batch_norm: bool = False, init: str = "default",
                 layers: list[int] | tuple[int, ...] | None = None,
                 freeze: str = "none") -> None:
        super().__init__()
        if layers is not None:
            if head and tuple(head) != tuple(layers):
                raise InvalidValueError(f"head {head} and layers {layers} disagree; give one")
            head = tuple(layers)
        self.preprocess = Preprocess()
        self.net = build_model(weights=weights, head=tuple(head), dropout=dropout,
                               batch_norm=batch_norm, init=init)
        self.frozen = frozen_modules(self.net, freeze)
        for module in self.frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.head_config = {"layers": list(head), "dropout": float(dropout),
                            "batch_norm": bool(batch_norm), "init": init}

    def train(self, mode: bool = True) -> BoneXRayNet:
        super().train(mode)
        # A frozen part keeps its BatchNorm statistics too, not just its weights.
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(pixels)).squeeze(1)
