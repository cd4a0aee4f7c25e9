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
  positives / negatives, so that a random ranking scores about 0.5 whatever the class balance;
- mask metrics of ego-exo correspondence, as the official correspondence/evaluation scripts
  (ego-exo4d-relation) compute them: ground truth resized to a longest side of 480 (nearest),
  IoU, boundary F-measure (DAVIS), location error (box centres over the 480x480 diagonal) and
  balanced accuracy of visibility.
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


# ----------------------------------------------------------------------------- ego-exo correspondence

EVAL_MAX_SIDE = 480
BOUNDARY_THRESHOLD = 0.008        # of the image diagonal


def longest_side_shape(h: int, w: int, side: int = EVAL_MAX_SIDE) -> tuple[int, int]:
    """The (height, width) resize_longest_side gives an h x w mask, computed as the official
    script computes it (``int`` of each scaled side; 796 wide gives 479, not 480)."""
    ratio = 1.0 / h * side if h > w else 1.0 / w * side
    return int(h * ratio), int(w * ratio)


def resize_longest_side(mask: np.ndarray, side: int = EVAL_MAX_SIDE) -> np.ndarray:
    """A mask resized (nearest neighbour, no padding) so that its longer side is ``side``
    (``longest_side_shape``)."""
    h, w = mask.shape
    new_h, new_w = longest_side_shape(h, w, side)
    # Source index floor(i * scale), with the scale as OpenCV's INTER_NEAREST (which the official
    # script calls) takes it: the inverse of new / old, which can differ from old / new in its
    # last bit and move a pixel on an exact boundary.
    rows = np.minimum((np.arange(new_h) * (1.0 / (new_h / h))).astype(int), h - 1)
    cols = np.minimum((np.arange(new_w) * (1.0 / (new_w / w))).astype(int), w - 1)
    return mask[rows][:, cols]


def mask_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Intersection over union of two binary masks of one shape; 1.0 when both are empty."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    union = np.sum(truth | predicted)
    return 1.0 if union == 0 else float(np.sum(truth & predicted) / (union + 1e-7))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of a binary mask (pixels that differ from their right, lower or
    lower-right neighbour; the last row and column against their own neighbours)."""
    east, south, south_east = np.zeros_like(mask), np.zeros_like(mask), np.zeros_like(mask)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    out = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    out[-1, :] = mask[-1, :] ^ east[-1, :]
    out[:, -1] = mask[:, -1] ^ south[:, -1]
    out[-1, -1] = False
    return out


def mask_extent(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first, last) row and (first, last) column holding a pixel of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels (offsets with dx^2 + dy^2 <= r^2)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            # An offset as large as the mask moves every pixel out of it.
            if dx * dx + dy * dy <= radius * radius and abs(dy) < h and abs(dx) < w:
                out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                    mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def boundary_f(truth: np.ndarray, predicted: np.ndarray, threshold: float = BOUNDARY_THRESHOLD) -> float:
    """Boundary F-measure (contour accuracy): boundary pixels of each mask matched within
    ceil(threshold x the diagonal) pixels of the other's; both without boundary: 1.0."""
    radius = int(np.ceil(threshold * np.linalg.norm(truth.shape)))
    fg, gt = _boundary(predicted.astype(bool)), _boundary(truth.astype(bool))
    n_fg, n_gt = int(fg.sum()), int(gt.sum())
    if n_fg == 0 or n_gt == 0:
        precision, recall = (1.0, 0.0) if n_gt else (0.0, 1.0) if n_fg else (1.0, 1.0)
    else:
        # Only pixels of one map near the other's count: dilate within the box holding both
        # (the same sums as over the whole frame, in a fraction of the time for small objects).
        rows, cols = mask_extent(fg | gt)
        fg, gt = fg[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1], gt[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1]
        precision = float(np.sum(fg & _dilate(gt, radius))) / n_fg
        recall = float(np.sum(gt & _dilate(fg, radius))) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def location_error(truth: np.ndarray, predicted: np.ndarray, size: tuple[int, int] = (EVAL_MAX_SIDE, EVAL_MAX_SIDE)) -> float:
    """Distance between the centres of the two masks' boxes (integer centres), over the
    diagonal of ``size``. As in the official script, both masks are first padded by their
    height on every side, and an empty mask's centre is (padded height // 2, padded width // 2)
    taken as (x, y)."""
    def centre(mask: np.ndarray) -> tuple[int, int]:
        pad = mask.shape[0]
        mask = mask.astype(bool)
        if not mask.any():
            return (mask.shape[0] + 2 * pad) // 2, (mask.shape[1] + 2 * pad) // 2
        (top, bottom), (left, right) = mask_extent(mask)
        return (2 * pad + left + right) // 2, (2 * pad + top + bottom) // 2

    (x1, y1), (x2, y2) = centre(truth), centre(predicted)
    return float(np.hypot(x1 - x2, y1 - y2) / np.hypot(*size))


def balanced_accuracy(truth: Sequence[int], predicted: Sequence[int]) -> float:
    """The mean over the classes present in ``truth`` of the share of their items predicted
    right (scikit-learn's balanced_accuracy_score, which the official script calls)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    classes = np.unique(truth)
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in classes])) if len(classes) else 0.0
