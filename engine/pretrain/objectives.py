"""Pretraining objectives, by name.

An objective owns what sits on top of the encoder (heads, a temperature) and the loss over a
batch of encoded ego and exo clips; the loop (``engine.pretrain.loop``) knows nothing else
about it. A new one is a subclass of ``Objective`` decorated with ``@register``, in a module
imported here or named in ``EE4D_PLUGINS``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"objective {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


class Objective:
    name = ""

    def heads(self, dim: int) -> nn.Module:
        """What the objective trains beside the encoder, for ``dim``-d encoder features."""
        raise NotImplementedError

    def loss(self, heads: nn.Module, ego: torch.Tensor, exo: torch.Tensor) -> torch.Tensor:
        """The loss of a batch: ``ego[i]`` and ``exo[i]`` are features of the same moment."""
        raise NotImplementedError

    def embed(self, heads: nn.Module, features: torch.Tensor, ego: bool) -> torch.Tensor:
        """Unit vectors to retrieve across views with (cosine similarity)."""
        raise NotImplementedError


def _projection(dim: int, out: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, out))


class _ContrastiveHeads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ego, self.exo = _projection(dim), _projection(dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # CLIP's initial temperature


@register
class EgoExoContrastive(Objective):
    """Ego-exo synchronous contrast: the ego and exo clips of one moment are positives, every
    other pairing in the batch (other moments, other takes) a negative; symmetric InfoNCE over
    cosine similarities with a learned temperature. Each view has its own projection head
    over the shared encoder. Negatives come from the worker's own batch."""
    name = "ego_exo_contrastive"

    def heads(self, dim: int) -> nn.Module:
        return _ContrastiveHeads(dim)

    def embed(self, heads, features, ego):
        return F.normalize((heads.ego if ego else heads.exo)(features.float()), dim=-1)

    def loss(self, heads, ego, exo):
        logits = self.embed(heads, ego, True) @ self.embed(heads, exo, False).T
        logits = logits * heads.logit_scale.clamp(max=math.log(100)).exp()
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
