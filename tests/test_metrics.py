"""Official metrics against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from engine.tasks.metrics import (
    balanced_accuracy,
    body_category,
    body_pose_errors,
    boundary_f,
    calibrated_ap,
    detection_map,
    evaluated_frames,
    hand_pose_errors,
    location_error,
    majority_class,
    mask_iou,
    point_detection_ap,
    resize_longest_side,
    top1_accuracy,
)


def test_top1_accuracy_and_majority_baseline():
    assert top1_accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert top1_accuracy(["Novice"] * 3, ["Novice"] * 3) == 1.0          # a single class present
    assert top1_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 items"):
        top1_accuracy([1, 2], [1, 2, 3])
    assert majority_class(["b", "a", "b"]) == "b"
    assert majority_class(["b", "a"]) == "a"                              # tie: the smallest label


def test_point_detection_ap_by_hand():
    truths = [("A", 1.0), ("A", 5.0)]
    predictions = [("A", 1.1, 0.9), ("A", 9.0, 0.8), ("A", 5.2, 0.7)]
    # hit, miss, hit: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; envelope 1, 2/3, 2/3.
    assert point_detection_ap(predictions, truths, 0.25) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert point_detection_ap(predictions, truths, 0.05) == 0.0           # nothing within 50 ms
    assert point_detection_ap(predictions, truths, 10.0) == pytest.approx(1.0 * 0.5 + 1.0 * 0.5)
    # Two predictions near one truth: the second is a false positive.
    assert point_detection_ap([("A", 1.0, 0.9), ("A", 1.1, 0.8)], [("A", 1.0)], 0.25) == 1.0
    assert point_detection_ap([("A", 1.1, 0.8), ("A", 1.0, 0.9)], [("A", 1.0)], 0.25) == 1.0
    # Equal scores rank as the official script ranks them, numpy's argsort reversed: a miss ranked
    # first gives 1/2, a hit first gives 1.
    for tied in ([("A", 9.0, 0.5), ("A", 1.0, 0.5)], [("A", 1.0, 0.5), ("A", 9.0, 0.5)]):
        first = tied[int(np.argsort([0.5, 0.5])[::-1][0])]
        assert point_detection_ap(tied, [("A", 1.0)], 0.25) == (1.0 if first[1] == 1.0 else 0.5)
    # The right time in the wrong take does not match.
    assert point_detection_ap([("B", 1.0, 0.9)], [("A", 1.0)], 0.25) == 0.0
    assert point_detection_ap([], [("A", 1.0)], 0.25) == 0.0              # empty predictions
    assert point_detection_ap([("A", 1.0, 0.9)], [], 0.25) is None        # no truth: not scored


def test_detection_map_averages_classes_with_truth_then_thresholds():
    truths = {"good_executions": [("A", 1.0), ("A", 5.0)], "tips_for_improvement": [("A", 3.0)],
              "unused": []}
    predictions = {"good_executions": [("A", 1.1, 0.9), ("A", 9.0, 0.8), ("A", 5.2, 0.7)],
                   "tips_for_improvement": [("A", 3.4, 0.5)]}
    result = detection_map(predictions, truths)
    good = 0.5 + 0.5 * 2 / 3
    assert result["mAP@0.25"] == pytest.approx((good + 0.0) / 2)          # the tip is 0.4 s off
    assert result["mAP@0.5"] == pytest.approx((good + 1.0) / 2)
    assert result["mAP@1.0"] == pytest.approx((good + 1.0) / 2)
    assert result["mAP"] == pytest.approx(((good + 0) / 2 + 2 * (good + 1) / 2) / 3)
    assert detection_map({}, truths)["mAP"] == 0.0                        # a class never predicted scores 0


def test_evaluated_body_frames_are_the_runs_the_official_filter_keeps():
    # Runs break where the step exceeds 3 frames; a run counts when last - first + 3 >= 120.
    long_run = list(range(0, 118, 3)) + [117]          # 0 .. 117: 117 + 3 = 120, kept
    short_run = list(range(200, 316, 3))                # 200 .. 314: 114 + 3 = 117, dropped
    assert evaluated_frames(long_run + short_run) == long_run
    # A step of 3 frames continues a run; a step of 4 ends it, and the halves are too short.
    joined = list(range(0, 61)) + list(range(63, 130))
    assert evaluated_frames(joined) == joined
    broken = list(range(0, 60)) + list(range(63, 130))
    assert evaluated_frames(broken) == []
    assert evaluated_frames(broken, min_run=65) == list(range(63, 130))   # 59 + 3 < 65 <= 66 + 3
    assert evaluated_frames([]) == []


def test_body_pose_errors_by_hand():
    joints = np.zeros((3, 3))
    truth = {f: joints + [f / 100, 0, 0] for f in range(0, 120, 3)}
    truth[3] = truth[3].copy()
    truth[3][1] = np.nan                                # an absent joint
    # Predictions 0.1 m off in y everywhere; at frame 6 joint 0 is 0.5 m off instead.
    predicted = {f: v + [0, 0.1, 0] for f, v in truth.items()}
    predicted[3] = np.nan_to_num(predicted[3])          # whatever is predicted for the absent joint
    predicted[6] = predicted[6].copy()
    predicted[6][0] = truth[6][0] + [0, 0.5, 0]
    position, joints_n, velocity, velocities = body_pose_errors(truth, predicted, min_run=100)
    frames = len(truth)
    assert joints_n == 3 * frames - 1
    assert position == pytest.approx(0.1 * (joints_n - 1) + 0.5)
    # Velocity errors: only joint 0 between frames 3->6 and 6->9 (0.4 m over 3 frames, x 30/3),
    # pairs with the absent joint skipped.
    assert velocities == 3 * (frames - 1) - 2
    assert velocity == pytest.approx(2 * 0.4 * 10)
    # Frames further apart than 9 frames give no velocity; a missing prediction is an error.
    sparse = {f: joints for f in range(0, 130, 10)}
    assert body_pose_errors(sparse, sparse, min_run=0)[3] == 0
    with pytest.raises(KeyError):
        body_pose_errors(truth, {f: v for f, v in predicted.items() if f != 60}, min_run=100)
    # Frames 0..117 make a run of 120 by the official measure; without frame 117 it is too short.
    assert body_pose_errors(truth, predicted)[1] == joints_n
    del truth[117]
    assert body_pose_errors(truth, predicted)[1] == 0


def test_body_categories_follow_the_official_take_name_matching():
    assert body_category("upenn_0711_Cooking_2_3") == "cooking"
    assert body_category("sfu_covid_008_4") == "health"
    assert body_category("uniandes_bouldering_003_10") == "bouldering"
    assert body_category("georgiatech_piano_01_2") == "music"
    assert body_category("unknown_take") == "other"


def test_hand_pose_errors_in_mm_with_procrustes_alignment():
    rng = np.random.default_rng(0)
    hand = rng.normal(size=(21, 3)) * 0.05                     # metres
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    moved = 1.3 * hand @ rotation.T + [0.1, -0.2, 0.3]          # a similarity transform of the hand
    mpjpe, pa = hand_pose_errors(hand, moved)
    assert mpjpe == pytest.approx(1000 * np.linalg.norm(moved - hand, axis=1).mean())
    assert pa == pytest.approx(0.0, abs=1e-9)
    # A mirror image is not a similarity transform: alignment may not reflect it away.
    assert hand_pose_errors(hand, hand * [-1, 1, 1])[1] > 1.0
    # A uniform 1 cm shift: 10 mm before alignment, nothing after.
    assert hand_pose_errors(hand, hand + [0.01, 0, 0]) == (pytest.approx(10.0), pytest.approx(0.0, abs=1e-9))


def test_calibrated_ap_by_hand():
    # 2 positives, 4 negatives (w = 2). Ranked: P N P N N N.
    # cPrec at rank 1: 1 / (1 + 0) = 1; at rank 3: 2 / (2 + 1 / 2) = 0.8.
    assert calibrated_ap([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [1, 0, 1, 0, 0, 0]) == pytest.approx((1 + 0.8) / 2)
    assert calibrated_ap([0.3, 0.2], [1, 1]) == 1.0                    # positives only
    assert calibrated_ap([0.3, 0.2], [0, 0]) is None                   # no positives: no AP
    assert calibrated_ap([0.1, 0.9], [1, 0]) == pytest.approx(0.5)     # worst ranking: 1 / (1 + 1)
    # Ties earn nothing: negatives rank first among equal scores, whatever the listed order.
    assert calibrated_ap([0.5, 0.5], [1, 0]) == calibrated_ap([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert calibrated_ap([0.9, 0.5, 0.5, 0.5], [0, 1, 0, 0]) == pytest.approx(1 / (1 + 3 / 3))
    # Random scores give about 0.5 whatever the share of positives.
    rng = np.random.default_rng(0)
    for share in (0.05, 0.5):
        labels = rng.random(200_000) < share
        assert calibrated_ap(rng.random(len(labels)), labels) == pytest.approx(0.5, abs=0.01)


def test_correspondence_mask_metrics_by_hand():
    # Ground truth is scored with its longer side at 480, nearest neighbour, no padding.
    small = np.array([[1, 0, 0, 1], [0, 0, 1, 1]], np.uint8)
    big = resize_longest_side(small)
    assert big.shape == (240, 480) and np.array_equal(big[::120, ::120], small)
    assert resize_longest_side(np.zeros((1080, 1920), np.uint8)).shape == (270, 480)
    assert resize_longest_side(np.zeros((1408, 1404), np.uint8)).shape == (480, 478)

    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0:2, 0:2], b[1:3, 1:3] = True, True
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0            # nothing to find, nothing found

    # Boundaries match within ceil(0.008 x diagonal) = 2 pixels on 100 x 100.
    gt = np.zeros((100, 100), bool)
    gt[20:60, 20:60] = True
    assert boundary_f(gt, gt) == 1.0 and boundary_f(gt, np.roll(gt, 1, axis=1)) == 1.0
    assert 0 < boundary_f(gt, np.roll(gt, 3, axis=1)) < 1
    assert boundary_f(gt, np.zeros_like(gt)) == 0.0 and boundary_f(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    # Objects smaller than the 5-pixel reach on 400 x 400: one 3 pixels off matches, one 12 off does not.
    dot, near, far = (np.zeros((400, 400), bool) for _ in range(3))
    dot[100, 100:102], near[100, 103:105], far[100, 112:114] = True, True, True
    assert boundary_f(dot, near) == 1.0 and boundary_f(dot, far) == 0.0

    # Box centres (integer) over the 480 x 480 diagonal: (14, 34) against (44, 34).
    truth, shifted = np.zeros((100, 200), bool), np.zeros((100, 200), bool)
    truth[30:40, 10:20], shifted[30:40, 40:50] = True, True
    assert location_error(truth, shifted) == pytest.approx(30 / np.hypot(480, 480))
    # An empty prediction's centre is the official script's: the padded mask's (height // 2,
    # width // 2) as (x, y): (150, 200) in a 300 x 400 frame padded by 100, against (114, 134).
    assert location_error(truth, np.zeros_like(truth)) == pytest.approx(np.hypot(36, 66) / np.hypot(480, 480))

    assert balanced_accuracy([1, 1, 1, 0], [1, 0, 1, 0]) == pytest.approx((2 / 3 + 1) / 2)
    assert balanced_accuracy([1, 1], [1, 0]) == 0.5                     # classes present in the truth only
