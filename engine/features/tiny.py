"""The built-in encoders behind the model names ``tiny_video`` and ``tiny_image``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tiny(kind: str):
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
