"""Official metrics of the Ego-Exo4D benchmarks, as plain functions of plain data.

- top-1 accuracy (keystep recognition, demonstrator proficiency) and the majority-class
  baseline beside it;
- mAP of temporal point detection (demonstration proficiency): a predicted time matches an
  unmatched ground-truth time of the same take and class within an L1 distance threshold,
  predictions taken by descending score (ranked as the official script ranks them); AP is the area under the precision envelope
  (all-point interpolation); mAP averages classes with ground truth, then thresholds
  (0.25, 0.5 and 1.0 s).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

DETECTION_THRESHOLDS = (0.25, 0.5, 1.0)


def top1_accuracy(predicted: Sequence, truth: Sequence) -> float:
    """Share of items whose prediction equals the truth; 0.0 when there are no items."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} items")
    if not truth:
        return 0.0
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def majority_class(labels: Iterable):
    """The most frequent label (ties: the smallest, so the baseline is deterministic)."""
    counts = Counter(labels)
    if not counts:
        raise ValueError("no labels")
    best = max(counts.values())
    return min(label for label, n in counts.items() if n == best)


def point_detection_ap(predictions: Sequence[tuple[str, float, float]], truths: Sequence[tuple[str, float]],
                       threshold: float) -> float | None:
    """AP of (take_uid, time, score) predictions against (take_uid, time) truths of one class.

    Each prediction, by descending score, takes the nearest unmatched truth of its take within
    ``threshold`` seconds, or counts as a false positive (so does any prediction in a take
    without truth). Predictions are ranked as the official script ranks them, numpy's default
    argsort of the scores reversed: equal scores come out in the order that gives (for a few
    predictions, the later one first). None when the class has no truth (it then takes no part
    in the mean).
    """
    if not truths:
        return None
    by_take: dict[str, list[float]] = {}
    for take, time in truths:
        by_take.setdefault(take, []).append(time)
    used = {take: np.zeros(len(times), bool) for take, times in by_take.items()}
    order = np.argsort(np.asarray([p[2] for p in predictions], float))[::-1]
    hits = []
    for i in order:
        take, time, _ = predictions[i]
        times = np.asarray(by_take.get(take, []))
        hit = False
        if len(times):
            distance = np.where(used[take], np.inf, np.abs(times - time))
            j = int(np.argmin(distance))
            if distance[j] <= threshold:
                used[take][j] = hit = True
        hits.append(hit)
    if not hits:
        return 0.0
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / len(truths)
    # All-point interpolation: precision at each recall step is the best precision at any
    # recall at least as high.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def detection_map(predictions: dict[str, Sequence[tuple[str, float, float]]],
                  truths: dict[str, Sequence[tuple[str, float]]],
                  thresholds: Sequence[float] = DETECTION_THRESHOLDS) -> dict[str, float]:
    """{"mAP@0.25": ..., "mAP@0.5": ..., "mAP@1.0": ..., "mAP": mean of those}, classes keyed alike
    in both dicts (a class missing from ``predictions`` scores 0 where it has truth)."""
    out = {}
    for threshold in thresholds:
        aps = [point_detection_ap(predictions.get(cls, []), truths[cls], threshold) for cls in sorted(truths)]
        aps = [ap for ap in aps if ap is not None]
        out[f"mAP@{threshold}"] = float(np.mean(aps)) if aps else 0.0
    out["mAP"] = float(np.mean([out[f"mAP@{t}"] for t in thresholds]))
    return out
