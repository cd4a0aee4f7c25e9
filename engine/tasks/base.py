"""What every benchmark gives the training loop, and the features it reads.

A task turns features (one file per take and view, from ``ee4d features``) and the release's
annotations into examples (a pooled feature vector and a class per example), scores logits
with the official metric, and writes and reads the official submission file; it may replace
the default head (an MLP on standardized features) or loss (cross-entropy). The training loop
(``engine.train``) knows nothing else about a task; adding a benchmark is one module with a
``Task`` subclass plus one entry in ``engine.tasks.TASKS``.

Scoring has one path: ``evaluate(submission(logits, examples), truth)``, the same function
``ee4d evaluate`` runs on anyone's submission file, so a training run's printed metric and
an evaluation of its submission agree by construction.
"""
from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np

from engine import storage


@dataclasses.dataclass
class Examples:
    x: np.ndarray                  # float32 [N, D]
    y: np.ndarray                  # int64 [N]; -1 where the split has no label
    meta: list[dict]               # what the submission needs to name each example

    def __len__(self) -> int:
        return len(self.y)

    @staticmethod
    def concat(parts: list["Examples"], dim: int) -> "Examples":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Examples(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), [])
        return Examples(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                        [m for p in parts for m in p.meta])


class Task:
    name: str = ""
    metric: str = ""               # the key of evaluate()'s result that early stopping maximizes

    def num_classes(self, release) -> int:
        raise NotImplementedError

    def head(self, scale: np.ndarray, classes: int, hidden: int, dropout: float):
        """The model on the features; by default an MLP on standardized features."""
        return build_head(scale, classes, hidden, dropout)

    def loss(self):
        import torch
        return torch.nn.CrossEntropyLoss()

    def examples(self, release, features: "FeatureStore", split: str, train: bool) -> Examples:
        """Train examples may add views that evaluation does not use (exo for ego-only tasks)."""
        raise NotImplementedError

    def truth(self, release, split: str) -> dict:
        """The split's ground truth as plain JSON, all that evaluate() needs."""
        raise NotImplementedError

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        raise NotImplementedError

    def evaluate(self, submission: dict, truth: dict) -> dict:
        """Official metrics; entries for takes or segments the truth does not know are ignored
        and counted under ``ignored``."""
        raise NotImplementedError

    def baselines(self, train: Examples, truth: dict, split: str) -> dict:
        """Trivial baselines on the split, scored by evaluate()."""
        raise NotImplementedError


class FeatureStore:
    """A feature stage's output: per take view, window times and vectors."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url, storage_options
        self.fs, self.path = storage.filesystem(url, storage_options)
        stage_path = storage.join(self.path, "stage.json")
        if not self.fs.exists(stage_path):
            raise ValueError(f"{url} holds no finished feature stage (no stage.json); run `ee4d features` first")
        self.stage = storage.read_json(self.fs, stage_path)
        self.dim = int(self.stage["dim"])
        self.names = sorted(p.rsplit("/", 1)[-1][:-3] for p in self.fs.glob(storage.join(self.path, "*.pt")))
        self._by_take: dict[str, list[str]] = {}
        for name in self.names:
            self._by_take.setdefault(name.rsplit("_", 2)[0], []).append(name)

    def views(self, take_uid: str) -> tuple[str | None, list[str]]:
        """(ego feature name or None, exo feature names) of a take. Aria's stream is named ``rgb``."""
        names = self._by_take.get(take_uid, [])
        ego = [n for n in names if n.endswith("_rgb")]
        return (ego[0] if ego else None), [n for n in names if not n.endswith("_rgb")]

    @functools.lru_cache(maxsize=4096)
    def load(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t0 [W], t1 [W], vectors float32 [W, D]) of one take view."""
        import pyarrow.parquet as pq
        with self.fs.open(storage.join(self.path, "parquet", f"{name}.parquet"), "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
        order = np.argsort(table.column("window").to_numpy())
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        return table.column("t0").to_numpy()[order], table.column("t1").to_numpy()[order], vectors[order]

    def release_url(self) -> str:
        """The release these features come from: features -> shards -> release, by their _config.json."""
        config = storage.read_json(self.fs, storage.join(self.path, "_config.json"))
        shards_fs, shards = storage.filesystem(config["source"], self.storage_options)
        return storage.read_json(shards_fs, storage.join(shards, "_config.json"))["source"]


def build_head(scale: np.ndarray, classes: int, hidden: int, dropout: float):
    """An MLP whose first step standardizes each feature with the train set's mean and std
    (``scale`` = [2, D]), kept in the state_dict so the saved head takes raw features."""
    import torch
    from torch import nn

    class Standardize(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(scale[0], dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(scale[1], dtype=torch.float32))

        def forward(self, x):
            return (x - self.mean) / self.std

    return nn.Sequential(Standardize(), nn.Linear(scale.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, classes))


def feature_scale(x: np.ndarray) -> np.ndarray:
    return np.stack([x.mean(axis=0), x.std(axis=0) + 1e-6]).astype(np.float32)


def pool(t0: np.ndarray, t1: np.ndarray, vectors: np.ndarray, start: float, end: float) -> np.ndarray:
    """Mean of the windows whose centre lies in [start, end]; the nearest window when none does."""
    centre = (t0 + t1) / 2
    inside = (centre >= start) & (centre <= end)
    if not inside.any():
        inside = np.abs(centre - (start + end) / 2) == np.abs(centre - (start + end) / 2).min()
    return vectors[inside].mean(axis=0)
