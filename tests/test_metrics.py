"""Official metrics against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from engine.tasks.metrics import detection_map, majority_class, point_detection_ap, top1_accuracy


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
