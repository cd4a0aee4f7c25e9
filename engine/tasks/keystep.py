"""Keystep recognition: the keystep of a trimmed segment, from the ego view.

Examples: one per keystep_benchmark segment, the mean of the segment's feature windows. Train
may add the same segment seen from each exo view (``train_views="ego+exo"``); evaluation and
the submission use ego only, as the benchmark requires.

Submission: ``{"task": "keystep_recognition", "split", "segments": [{"take_uid",
"start_time", "end_time", "label_id", "logits": [...]}]}``; a segment is matched by take and
times (to the millisecond). Metric: top-1 accuracy over the split's segments; a segment
without a prediction counts as wrong.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from engine import params as P
from engine.features.store import is_ego
from engine.tasks.base import Examples, Task, TrainConfig, match_segments, pool, register, segment_key
from engine.tasks.metrics import majority_class, top1_accuracy

if TYPE_CHECKING:
    from engine.features.store import FeatureStore


@register
class KeystepRecognition(Task):
    name = "keystep_recognition"
    metric = "top1"

    @dataclasses.dataclass(frozen=True)
    class Options(TrainConfig):
        train_views: str = P.setting("ego", "views used for training (evaluation is ego only)",
                                     choices=("ego", "ego+exo"))

    def outputs(self, release) -> int:
        return max(m.label_id for m in release.label_mapping()) + 1

    def examples(self, release, features: FeatureStore, split: str, train: bool) -> Examples:
        xs, ys, meta = [], [], []
        for seg in release.keystep_segments(split):
            ego, exo = features.views(seg.take_uid)
            names = ([ego] if ego else []) + (exo if train and self.options.train_views == "ego+exo" else [])
            for name in names:
                xs.append(pool(*features.load(name), seg.start_time, seg.end_time))
                ys.append(-1 if seg.label_id is None else seg.label_id)
                meta.append({"take_uid": seg.take_uid, "start_time": seg.start_time, "end_time": seg.end_time,
                             "view": name})
        return Examples(np.asarray(xs, np.float32).reshape(-1, features.dim), np.asarray(ys, np.int64), meta)

    def truth(self, release, split: str) -> dict:
        return {"segments": {segment_key(s.take_uid, s.start_time, s.end_time): s.label_id
                             for s in release.keystep_segments(split) if s.label_id is not None}}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        segments = [{"take_uid": m["take_uid"], "start_time": m["start_time"], "end_time": m["end_time"],
                     "label_id": int(np.argmax(row)), "logits": [round(float(v), 5) for v in row]}
                    for m, row in zip(examples.meta, logits) if is_ego(m["view"])]
        return {"task": self.name, "split": split, "segments": segments}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        wanted = truth["segments"]
        matched, ignored = match_segments(submission.get("segments", []), wanted)
        predicted = {key: int(seg["label_id"]) for key, seg in matched.items()}
        keys = sorted(wanted)
        return {"top1": top1_accuracy([predicted.get(k, -1) for k in keys], [wanted[k] for k in keys]),
                "segments": len(keys), "missing": sum(k not in predicted for k in keys), "ignored": ignored}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        majority = majority_class(train.y[train.y >= 0].tolist())
        wanted = truth["segments"]
        return {"majority": top1_accuracy([majority] * len(wanted), list(wanted.values()))}
