"""What every benchmark gives the training loop.

A task turns features (one file per take and view, from ``ee4d features``, read through
``engine.features.store.FeatureStore``) or the release's own streams, and the release's
annotations, into examples (an input vector and a class, or a vector of regression targets,
per example), scores the head's outputs with the official metric, and writes and reads the
official submission file; it may replace the default head (an MLP on standardized inputs) or
loss (cross-entropy). The training loop (``engine.train``) knows
nothing else about a task; adding a benchmark is one module with a ``Task`` subclass decorated
with ``@register``, plus one import line in ``engine/tasks/__init__.py`` (or, for a user's own,
its module in ``EE4D_PLUGINS``). A task's settings are its ``Options``: the training loop's
``TrainConfig`` plus any of its own, declared once for the spec, the flags and the fingerprint.

Scoring has one path: ``evaluate(submission(logits, examples), truth)``, the same function
``ee4d evaluate`` runs on anyone's submission file, so a training run's printed metric and
an evaluation of its submission agree by construction.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from engine import params as P

if TYPE_CHECKING:
    from engine.features.store import FeatureStore


@dataclasses.dataclass
class Examples:
    x: np.ndarray                  # float32 [N, D]
    y: np.ndarray                  # int64 [N] classes, -1 where the split has no label; or
                                   # float32 [N, K] regression targets, NaN where unknown
    meta: list[dict]               # what the submission needs to name each example

    def __len__(self) -> int:
        return len(self.y)

    def labelled(self) -> np.ndarray:
        """Which examples carry a target (a class, or at least one known regression value)."""
        if self.y.dtype.kind == "f":
            return np.isfinite(self.y).reshape(len(self.y), -1).any(axis=1)
        return self.y >= 0

    def subset(self, keep: np.ndarray) -> Examples:
        return Examples(self.x[keep], self.y[keep], [m for m, k in zip(self.meta, keep) if k])

    @staticmethod
    def concat(parts: list[Examples], dim: int) -> Examples:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Examples(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), [])
        return Examples(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                        [m for p in parts for m in p.meta])


@dataclasses.dataclass(frozen=True)
class TrainConfig(P.Params):
    """The training loop's settings, which every benchmark takes."""
    epochs: int = P.setting(40, "epochs at most")
    batch_size: int = P.setting(64, "global batch, split across workers")
    lr: float = P.setting(1e-3, "learning rate (AdamW)")
    weight_decay: float = P.setting(1e-4, "AdamW weight decay")
    hidden: int = P.setting(256, "hidden units of the head")
    dropout: float = P.setting(0.1, "dropout of the head")
    patience: int = P.setting(8, "epochs without a better val metric before stopping")
    seed: int = P.setting(0, "random seed (data order, initialisation, dropout)")
    workers: int = P.setting(1, "Ray Train workers (GPUs when the cluster has them)")
    cpus_per_worker: float = P.setting(1.0, "CPUs per worker, also torch's thread count")
    use_gpu: bool | None = P.setting(None, "train on GPUs (default: when the cluster has them)")
    max_failures: int = P.setting(2, "worker failures Ray Train recovers from, from the last checkpoint",
                                  fingerprint=False)
    checkpoint_every: int = P.setting(1, "epochs between checkpoints (the last epoch always gets one)",
                                      fingerprint=False)


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Make a benchmark known to the spec, the command line and the graph, by its ``name``."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"benchmark {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


class Task:
    name: str = ""
    metric: str = ""               # the key of evaluate()'s result that early stopping follows
    maximize: bool = True          # False where the metric is an error (MPJPE): lower is better
    reads_features: bool = True    # False where the inputs are frames or sensors: features change nothing
    Options: type[TrainConfig] = TrainConfig    # a benchmark with options of its own subclasses it

    def __init__(self, options: TrainConfig | None = None):
        self.options = options if options is not None else self.Options()

    def outputs(self, release) -> int:
        """Width of the head's output: classes, or regression targets."""
        raise NotImplementedError

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        """The model on the inputs; by default an MLP on standardized inputs. ``scale`` is the
        train set's ``example_scale``."""
        return build_head(scale["x"], outputs, hidden, dropout)

    def loss(self):
        import torch
        return torch.nn.CrossEntropyLoss()

    def examples(self, release, features: FeatureStore, split: str, train: bool) -> Examples:
        """Train examples may add views that evaluation does not use (exo for ego-only tasks)."""
        raise NotImplementedError

    def truth(self, release, split: str) -> dict:
        """The split's ground truth, all that evaluate() needs: plain JSON, or numpy images where
        the truth is images (translation's ego frames)."""
        raise NotImplementedError

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        raise NotImplementedError

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        """Official metrics; entries for takes or segments the truth does not know are ignored
        and counted under ``ignored``. Where the official script stops at a missing prediction,
        so does this, naming it; ``lenient`` scores a partial submission without the missing
        items instead and counts them under ``missing``."""
        raise NotImplementedError

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """Trivial baselines on the split whose examples are ``evaluated``, scored by evaluate()."""
        raise NotImplementedError

    def tradeoff(self, metrics: dict) -> dict | None:
        """Operating points for the report to plot, from evaluate()'s result: {"x", "y" (axis
        labels), "points": {name: (x, y)}, "limits": {name: x}}; None for most benchmarks."""
        return None

    def read_submission(self, url: str) -> dict:
        """A submission as ``ee4d evaluate`` is given it (by default a JSON file)."""
        from engine import storage
        fs, path = storage.filesystem(url)
        return storage.read_json(fs, path)

    def showcase(self, submission: dict, release):
        """(matplotlib figure, caption) of one val prediction beside its truth, for the report;
        None for most benchmarks."""
        return None

    def official_files(self, submission: dict, release, split: str) -> dict[str, dict | bytes]:
        """Files for an official scorer whose input differs from our submission (name -> JSON, or
        the file's bytes), written beside it; none by default."""
        return {}


def affine(scale: np.ndarray, inverse: bool = False):
    """A module mapping v to (v - mean) / std, or back with ``inverse`` (``scale`` = [2, K]); the
    statistics are buffers, so a saved model takes and gives raw values."""
    import torch
    from torch import nn

    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(scale[0], dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(scale[1], dtype=torch.float32))

        def forward(self, v):
            return v * self.std + self.mean if inverse else (v - self.mean) / self.std

    return Affine()


def build_head(x_scale: np.ndarray, outputs: int, hidden: int, dropout: float):
    """An MLP whose first step standardizes each input with the train set's mean and std
    (``x_scale`` = [2, D])."""
    from torch import nn

    return nn.Sequential(affine(x_scale), nn.Linear(x_scale.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, outputs))


def example_scale(train: Examples) -> dict:
    """Means and stds of the train inputs (``x``, [2, D]) and, for regression, of the known
    targets (``y``, [2, K]; None for classes), for heads to standardize with."""
    def stats(v: np.ndarray) -> np.ndarray:
        std = np.nanstd(v, axis=0)
        # A column constant over train (a keystep never seen, a dead feature) is left unscaled:
        # dividing by a tiny std would blow up whatever other value it takes later.
        # A column with no known value at all (a joint never annotated) is centred on zero.
        return np.stack([np.nan_to_num(np.nanmean(v, axis=0)), np.where(std > 1e-6, std, 1.0)]).astype(np.float32)

    return {"x": stats(train.x), "y": stats(train.y[train.labelled()]) if train.y.dtype.kind == "f" else None}


def segment_key(take_uid: str, start: float, end: float) -> str:
    """How a segment is matched between submission and truth: take and times to the millisecond."""
    return f"{take_uid}|{start:.3f}|{end:.3f}"


def match_segments(segments: list[dict], wanted: dict) -> tuple[dict[str, dict], int]:
    """A submission's segment entries by the key of the truth's segment they name, and how many
    name no segment of the truth (ignored)."""
    predicted, ignored = {}, 0
    for seg in segments:
        key = segment_key(seg["take_uid"], float(seg["start_time"]), float(seg["end_time"]))
        if key in wanted:
            predicted[key] = seg
        else:
            ignored += 1
    return predicted, ignored


def pool(t0: np.ndarray, t1: np.ndarray, vectors: np.ndarray, start: float, end: float) -> np.ndarray:
    """Mean of the windows whose centre lies in [start, end]; the nearest window when none does."""
    centre = (t0 + t1) / 2
    inside = (centre >= start) & (centre <= end)
    if not inside.any():
        inside = np.abs(centre - (start + end) / 2) == np.abs(centre - (start + end) / 2).min()
    return vectors[inside].mean(axis=0)
