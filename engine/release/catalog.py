"""Ego-Exo4D schema constants: proficiency levels, ego-pose joint names, the Aria RGB stream.

These are the real release's values, used by the benchmarks (``engine.tasks``) and by the
miniature generator. The miniature's own scenarios, tasks and keysteps live in
``engine.miniature.scenarios``.
"""
from __future__ import annotations

PROFICIENCY_LEVELS = ("Novice", "Early Expert", "Intermediate Expert", "Late Expert")

BODY_JOINTS = (
    "nose", "left-eye", "right-eye", "left-ear", "right-ear", "left-shoulder", "right-shoulder",
    "left-elbow", "right-elbow", "left-wrist", "right-wrist", "left-hip", "right-hip",
    "left-knee", "right-knee", "left-ankle", "right-ankle",
)
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
HAND_JOINTS = tuple(
    f"{side}_{name}"
    for side in ("left", "right")
    for name in ["wrist"] + [f"{finger}_{k}" for finger in FINGERS for k in range(1, 5)]
)
# The Aria RGB stream: its stream id and its key in frame_aligned_videos.
EGO_STREAM, EGO_STREAM_NAME = "214-1", "rgb"
