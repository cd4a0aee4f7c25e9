"""Official metrics of the Ego-Exo4D benchmarks, as plain functions of plain data.

- top-1 accuracy (keystep recognition, demonstrator proficiency) and the majority-class
  baseline beside it;
- mAP of temporal point detection (demonstration proficiency): a predicted time matches an
  unmatched ground-truth time of the same take and class within an L1 distance threshold,
  predictions taken by descending score (ranked as the official script ranks them); AP is the area under the precision envelope
  (all-point interpolation); mAP averages classes with ground truth, then thresholds
  (0.25, 0.5 and 1.0 s);
- body pose errors (ego body pose), as the official bodypose/evaluation/evaluate.py computes
  them: MPJPE pooled over every joint with ground truth, and MPJVE over consecutive evaluated
  frames, on the frames that survive its filter of short runs;
- hand pose errors (ego hand pose), as the official handpose/evaluation/evaluate.py: MPJPE and
  PA-MPJPE (after the similarity transform that best aligns the prediction) of one hand, in mm;
- calibrated average precision (procedure understanding), as defined with online action
  detection (De Geest et al., arXiv 1604.06506): precision with false positives weighted by
  positives / negatives, so that a random ranking scores about 0.5 whatever the class balance.
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


# The official body pose evaluation's categories, matched as substrings of the lower-cased take
# name in this order (the script stops with an assertion on a take none matches; we count it
# under "other").
BODY_CATEGORIES = (("basketball", ("basketball",)), ("bike", ("bike",)), ("cooking", ("cooking",)),
                   ("dance", ("dance",)), ("soccer", ("soccer",)), ("health", ("cpr", "covid")),
                   ("bouldering", ("bouldering",)), ("music", ("piano", "violin", "guitar", "music")))
MIN_RUN_FRAMES = 120     # 4 s at 30 fps: shorter runs of annotated frames are not evaluated
RUN_GAP_FRAMES = 3       # a larger step between annotated frames ends a run
VELOCITY_GAP_FRAMES = 10  # velocities only between evaluated frames closer than this


def body_category(take_name: str) -> str:
    name = take_name.lower()
    for category, parts in BODY_CATEGORIES:
        if any(part in name for part in parts):
            return category
    return "other"


def evaluated_frames(frames: Sequence[int], min_run: int = MIN_RUN_FRAMES) -> list[int]:
    """The annotated frames the official script scores: sorted frames split into runs wherever
    the step exceeds RUN_GAP_FRAMES; a run counts when last - first + 3 >= min_run (the script's
    own measure of a run's length, which credits each run with 3 frames)."""
    kept, run = [], []
    for t in sorted(frames):
        if run and t - run[-1] > RUN_GAP_FRAMES:
            if run[-1] - run[0] + 3 >= min_run:
                kept += run
            run = []
        run.append(t)
    if run and run[-1] - run[0] + 3 >= min_run:
        kept += run
    return kept


def body_pose_errors(truth: dict[int, np.ndarray], predicted: dict[int, np.ndarray],
                     min_run: int = MIN_RUN_FRAMES, missing: list | None = None) -> tuple[float, int, float, int]:
    """One take's (position error sum in m, joints, velocity error sum in m/s, joint velocities).

    ``truth`` and ``predicted`` map frames to [J, 3] world coordinates; a ground-truth joint
    with NaN is absent. Every evaluated frame must have a prediction (KeyError otherwise, as in
    the official script). Velocities compare the displacement from the previous evaluated frame
    (even across a dropped run) when it is fewer than VELOCITY_GAP_FRAMES frames back, scaled to
    per second at 30 fps, for joints present in both frames' ground truth. Given a ``missing``
    list, frames without a prediction are appended to it and left out instead."""
    position, joints, velocity, velocities = 0.0, 0, 0.0, 0
    previous = None
    for t in evaluated_frames(list(truth), min_run):
        if missing is not None and t not in predicted:
            missing.append(t)
            previous = None
            continue
        gt, pred = np.asarray(truth[t], float), np.asarray(predicted[t], float)
        known = ~np.isnan(gt[:, 0])
        position += float(np.linalg.norm(gt[known] - pred[known], axis=1).sum())
        joints += int(known.sum())
        if previous is not None and t - previous[0] < VELOCITY_GAP_FRAMES:
            t0, gt0, pred0 = previous
            both = known & ~np.isnan(gt0[:, 0])
            step = (gt[both] - gt0[both]) - (pred[both] - pred0[both])
            velocity += float(np.linalg.norm(step, axis=1).sum()) * 30.0 / (t - t0)
            velocities += int(both.sum())
        previous = (t, gt, pred)
    return position, joints, velocity, velocities


def hand_pose_errors(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """(MPJPE, PA-MPJPE) in mm of one hand's valid joints, [J, 3] in metres each.

    PA-MPJPE first aligns the prediction to the truth with the scale, rotation (no reflection)
    and translation that minimize the squared error (Umeyama / orthogonal Procrustes)."""
    truth, predicted = np.asarray(truth, float) * 1000, np.asarray(predicted, float) * 1000
    mpjpe = float(np.linalg.norm(predicted - truth, axis=1).mean())
    t0, p0 = truth - truth.mean(axis=0), predicted - predicted.mean(axis=0)
    t_norm, p_norm = np.linalg.norm(t0), np.linalg.norm(p0)
    if t_norm == 0 or p_norm == 0:      # all joints at one point: only translation aligns
        return mpjpe, float(np.linalg.norm(p0 - t0, axis=1).mean())
    t0, p0 = t0 / t_norm, p0 / p_norm
    u, s, vt = np.linalg.svd(t0.T @ p0)
    v = vt.T
    if np.linalg.det(v @ u.T) < 0:     # a reflection: flip the weakest axis
        v[:, -1] *= -1
        s[-1] *= -1
    rotation = v @ u.T
    scale = s.sum() * t_norm / p_norm
    aligned = scale * (predicted - predicted.mean(axis=0)) @ rotation + truth.mean(axis=0)
    return mpjpe, float(np.linalg.norm(aligned - truth, axis=1).mean())


def calibrated_ap(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """cAP of one binary question: items ranked by descending score, cPrec(k) = TP(k) / (TP(k) +
    FP(k) / w) with w = negatives / positives, averaged over the ranks of the positives. Equal
    scores earn nothing for their order: within a tie, negatives rank first (a model that
    cannot tell items apart gets no credit from the order it listed them in). None without
    positives; 1.0 for a ranking of positives only."""
    labels = np.asarray(labels, bool)
    positives = int(labels.sum())
    if not positives:
        return None
    negatives = len(labels) - positives
    if not negatives:
        return 1.0
    ranked = labels[np.lexsort((labels, -np.asarray(scores, float)))]
    tp, fp = np.cumsum(ranked), np.cumsum(~ranked)
    w = negatives / positives
    precision = tp / (tp + fp / w)
    return float(precision[ranked].sum() / positives)
