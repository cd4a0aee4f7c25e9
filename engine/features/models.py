"""Feature models: what a name means, what input it takes, and how to build it without a network.

Names:
  tiny_video, tiny_image      built-in pure-torch encoders (random init from a fixed seed, or --weights)
  torchscript:PATH            a TorchScript file (torch.jit.save)
  export:PATH                 a torch.export program (torch.export.save, .pt2), exported with a
                              dynamic batch dimension (the last batch of a run is smaller)
  torchvision:NAME, timm:NAME architectures from those libraries when installed; weights from --weights
  package.module:factory      a user factory returning an nn.Module; weights from --weights (a state_dict)
  pretrained:RUN              the encoder an ``ee4d pretrain`` run wrote to RUN (its encoder.json names
                              the architecture, frames and size; encoder.pt holds the weights)

PATH and the weights are local paths or fsspec URLs (``s3://bucket/models/encoder.pt``): the
actor that runs the model reads them on its own node, so a cluster's driver needs no copy. With
an expected sha256 (``--weights-sha256``) every reader checks the bytes it got against it; the
driver checks what it can reach before any work.

Contract of every model: video models take float [B, 3, T, H, W], image models [B, 3, H, W],
normalized with the spec's mean and std; both return [B, D] (other shapes are flattened).
Naming and checking a model needs no torch (the command line stays quick); ``build`` does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io

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
    sha256: str | None = None      # expected sha256 of the weights (or of the model file when no weights)
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
# What a pretraining run leaves for ``pretrained:RUN``.
PRETRAINED_SPEC, PRETRAINED_WEIGHTS = "encoder.json", "encoder.pt"


def resolve(name: str, weights: str | None = None, kind: str | None = None, frames: int | None = None,
            size: int | None = None, sha256: str | None = None) -> ModelSpec:
    """The spec of a model name, checked before any work starts: unknown names, missing weights
    files (where this machine can see them), and libraries that are not installed are errors
    here, not on a worker an hour later."""
    if weights is not None:
        _check_exists(weights, "weights file")
    if name.startswith("pretrained:"):
        if weights is not None:
            raise ModelError(f"{name}: the run's {PRETRAINED_WEIGHTS} are its weights; give no --weights")
        run = name.partition(":")[2].rstrip("/")
        desc = pretrained_spec(run)
        weights = f"{run}/{PRETRAINED_WEIGHTS}"
        _check_exists(weights, "pretrained weights")
        kind, frames, size = kind or desc["kind"], frames or desc["frames"], size or desc["size"]
    elif name in BUILTINS:
        b_kind, b_frames, b_size = BUILTINS[name]
        kind, frames, size = kind or b_kind, frames or b_frames, size or b_size
    else:
        scheme, _, rest = name.partition(":")
        if not rest:
            raise ModelError(f"unknown model {name!r}: use {', '.join(BUILTINS)}, torchscript:PATH, export:PATH, "
                             "torchvision:NAME, timm:NAME or package.module:factory")
        if scheme in ("torchscript", "export"):
            _check_exists(rest, "model file")
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
    if sha256 is not None and not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise ModelError(f"weights sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return ModelSpec(name, kind, frames if kind == "video" else 1, size, weights, sha256)


def pretrained_spec(run: str) -> dict:
    """What a pretraining run at ``run`` says about its encoder (``encoder.json``)."""
    import json
    try:
        return json.loads(_read(f"{run.rstrip('/')}/{PRETRAINED_SPEC}"))
    except FileNotFoundError:
        raise ModelError(f"pretrained:{run}: no {PRETRAINED_SPEC} there; is it the output of a finished "
                         "ee4d pretrain run?") from None


def architecture_name(name: str) -> str:
    """The architecture behind a model name: for ``pretrained:RUN``, the one that run trained."""
    while name.startswith("pretrained:"):
        name = pretrained_spec(name.partition(":")[2])["model"]
    return name


def _is_url(path: str) -> bool:
    return "://" in path


def _check_exists(path: str, what: str) -> None:
    """A local file must exist here; a URL must exist when this machine can reach its store
    (otherwise the node that reads it checks)."""
    from engine import storage
    try:
        fs, target = storage.filesystem(path)
        found = fs.isfile(target)
    except Exception:   # noqa: BLE001 - no credentials or no route from here: the reading node checks
        if not _is_url(path):
            raise
        return
    if not found:
        raise ModelError(f"{what} not found: {path}")


def _source(spec: ModelSpec) -> str | None:
    """The file whose bytes fix the model's numbers: the weights, else a TorchScript or export file."""
    if spec.weights:
        return spec.weights
    return spec.name.partition(":")[2] if spec.name.startswith(("torchscript:", "export:")) else None


def _read(path: str) -> bytes:
    from engine import storage
    fs, target = storage.filesystem(path)
    with fs.open(target, "rb") as f:
        return f.read()


def _checked(spec: ModelSpec, data: bytes, path: str) -> bytes:
    """``data`` as read from ``path``, or ModelError when it is not the expected file."""
    got = hashlib.sha256(data).hexdigest()
    if spec.sha256 and got != spec.sha256:
        raise ModelError(f"{path}: sha256 is {got}, expected {spec.sha256}")
    return data


def weights_digest(spec: ModelSpec) -> str:
    """sha256 of what fixes the model's numbers: the weights file, the model file, or the seed.

    Read and checked when this machine can read it; otherwise the expected sha256 stands for it
    (and each reading node checks it)."""
    path = _source(spec)
    if path is None:
        return "random-init-seed-0"
    try:
        data = _read(path)
    except Exception as e:   # noqa: BLE001 - a URL this machine cannot reach
        if spec.sha256 and _is_url(path):
            return spec.sha256
        raise ModelError(f"cannot read {path} here ({type(e).__name__}: {e}); give its sha256 "
                         "(weights_sha256) so the run can name it and every node can check it") from None
    return hashlib.sha256(_checked(spec, data, path)).hexdigest()


def architecture(name: str):
    """The untrained module a name stands for (built-ins, torchvision, timm, factories)."""
    from engine.features.tiny import tiny

    scheme, _, rest = name.partition(":")
    if name in BUILTINS:
        return tiny(BUILTINS[name][0])
    if scheme == "torchvision":
        import torchvision
        return torchvision.models.get_model(rest, weights=None)
    if scheme == "timm":
        import timm
        return timm.create_model(rest, pretrained=False, num_classes=0)
    if scheme in ("torchscript", "export", "pretrained"):
        raise ModelError(f"{name}: not an architecture to build")
    return getattr(importlib.import_module(scheme), rest)()


def build(spec: ModelSpec):
    """The model as an eval-mode nn.Module on CPU."""
    import torch

    scheme, _, rest = spec.name.partition(":")
    if scheme == "torchscript":
        return torch.jit.load(io.BytesIO(_checked(spec, _read(rest), rest)), map_location="cpu").eval()
    if scheme == "export":
        return torch.export.load(io.BytesIO(_checked(spec, _read(rest), rest))).module()
    model = architecture(architecture_name(spec.name))
    if spec.weights:
        data = _checked(spec, _read(spec.weights), spec.weights)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()
