"""Feature models: what a name means, what input it takes, and how to build it without a network.

Names:
  tiny_video, tiny_image      built-in pure-torch encoders (random init from a fixed seed, or --weights)
  torchscript:PATH            a TorchScript file (torch.jit.save)
  export:PATH                 a torch.export program (torch.export.save, .pt2), exported with a
                              dynamic batch dimension (the last batch of a run is smaller)
  torchvision:NAME, timm:NAME architectures from those libraries when installed; weights from --weights
  package.module:factory      a user factory returning an nn.Module; weights from --weights (a state_dict)

Contract of every model: video models take float [B, 3, T, H, W], image models [B, 3, H, W],
normalized with the spec's mean and std; both return [B, D] (other shapes are flattened).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """The model cannot be built as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str                      # "video" or "image"
    frames: int                    # video: frames fed per window (spread evenly over it); image: 1
    size: int                      # input is size x size: short side resized to it, then centre-cropped
    weights: str | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.kind not in ("video", "image"):
            raise ModelError(f"model kind must be 'video' or 'image', got {self.kind!r}")
        if self.frames < 1 or self.size < 8:
            raise ModelError(f"model input needs frames >= 1 and size >= 8, got {self.frames} and {self.size}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# name -> (kind, frames, size): the built-ins' own input; small enough for a laptop CPU.
BUILTINS = {"tiny_video": ("video", 8, 64), "tiny_image": ("image", 1, 64)}


def resolve(name: str, weights: str | None = None, kind: str | None = None, frames: int | None = None,
            size: int | None = None) -> ModelSpec:
    """The spec of a model name, checked before any work starts: unknown names, missing weights
    files, and libraries that are not installed are errors here, not on a worker an hour later."""
    if weights is not None and not os.path.isfile(weights):
        raise ModelError(f"weights file not found: {weights}")
    if name in BUILTINS:
        b_kind, b_frames, b_size = BUILTINS[name]
        kind, frames, size = kind or b_kind, frames or b_frames, size or b_size
    else:
        scheme, _, rest = name.partition(":")
        if not rest:
            raise ModelError(f"unknown model {name!r}: use {', '.join(BUILTINS)}, torchscript:PATH, export:PATH, "
                             "torchvision:NAME, timm:NAME or package.module:factory")
        if scheme in ("torchscript", "export"):
            if not os.path.isfile(rest):
                raise ModelError(f"model file not found: {rest}")
        elif scheme in ("torchvision", "timm"):
            if importlib.util.find_spec(scheme) is None:
                raise ModelError(f"{name}: {scheme} is not installed (pip install {scheme})")
            if weights is None:
                raise ModelError(f"{name}: give --weights; nothing is downloaded at run time")
        else:
            try:
                module = importlib.import_module(scheme)
            except ImportError as e:
                raise ModelError(f"{name}: cannot import {scheme}: {e}") from None
            if not callable(getattr(module, rest, None)):
                raise ModelError(f"{name}: {scheme} has no callable {rest!r}")
        kind = kind or "video"
        frames = frames or (32 if kind == "video" else 1)
        size = size or 224
    return ModelSpec(name, kind, frames if kind == "video" else 1, size, weights)


def weights_digest(spec: ModelSpec) -> str:
    """sha256 of what fixes the model's numbers: the weights file, the model file, or the seed."""
    path = spec.weights or (spec.name.partition(":")[2] if spec.name.startswith(("torchscript:", "export:")) else None)
    if path is None:
        return "random-init-seed-0"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def build(spec: ModelSpec):
    """The model as an eval-mode nn.Module on CPU."""
    scheme, _, rest = spec.name.partition(":")
    if spec.name in BUILTINS:
        model = _tiny(spec.kind)
    elif scheme == "torchscript":
        return torch.jit.load(rest, map_location="cpu").eval()
    elif scheme == "export":
        return torch.export.load(rest).module()
    elif scheme == "torchvision":
        import torchvision
        model = torchvision.models.get_model(rest, weights=None)
    elif scheme == "timm":
        import timm
        model = timm.create_model(rest, pretrained=False, num_classes=0)
    else:
        model = getattr(importlib.import_module(scheme), rest)()
    if spec.weights:
        state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def _tiny(kind: str):
    """The built-in encoders: a 64-bin colour histogram, for video also motion energy (mean
    absolute change of a 4x4 grid of mean colours between the frames it sees), and a small conv
    net (128-d) initialized from seed 0 on its own generator, so every actor on every node builds
    the same numbers without touching the global RNG. 240-d for video, 192-d for images.
    Meant for tests and demos: cheap, deterministic, and they keep what the miniature's labels
    show (a held object's colour, flashes, camera shake)."""
    video = kind == "video"
    conv, pool = (nn.Conv3d, nn.AdaptiveAvgPool3d) if video else (nn.Conv2d, nn.AdaptiveAvgPool2d)
    net = nn.Sequential(
        conv(3, 16, 5, stride=2, padding=2), nn.ReLU(),
        conv(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        conv(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        pool(1), nn.Flatten(), nn.Linear(64, 128))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            bound = 1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.05
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=generator) * (3 ** 0.5))
    return TinyVideo(net) if video else TinyImage(net)


def colour_histogram(x: torch.Tensor) -> torch.Tensor:
    """Share of pixels in each of 64 colour bins (4 levels per channel) of ImageNet-normalized
    input [B, 3, ...]: the held object's colour shows as a bin, wherever it sits in the frame."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1)   # IMAGENET_MEAN, spelled
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1)    # out for TorchScript
    rgb = (x.flatten(2) * std + mean).clamp(0, 0.999)
    level = (rgb * 4).floor().long()                             # [B, 3, N]
    bins = level[:, 0] * 16 + level[:, 1] * 4 + level[:, 2]     # [B, N]
    counts = torch.zeros(x.shape[0], 64, device=x.device).scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.float32))
    return counts / bins.shape[1]


class TinyVideo(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, 3, T, H, W]
        grid = F.adaptive_avg_pool3d(x, (x.shape[2], 4, 4))       # [B, 3, T, 4, 4]
        motion = (grid[:, :, 1:] - grid[:, :, :-1]).abs().mean(2).flatten(1)
        return torch.cat([colour_histogram(x), motion, self.net(x)], dim=1)


class TinyImage(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, 3, H, W]
        return torch.cat([colour_histogram(x), self.net(x)], dim=1)
