"""What a shard job will write: its configuration, the windows of a take, the shards of a split.

Everything here is a pure function of the release and the configuration, so a rerun after a
crash plans exactly the same shards with the same keys.
"""
from __future__ import annotations

import dataclasses

from engine import params as P
from engine.release import records as rec

MODES = ("remux", "transcode", "frames")
VIEW_SETS = ("ego", "ego+best_exo", "all")
SPLITS = ("train", "val", "test")
DRIFT_POLICIES = ("reject", "trim")
RESOLUTIONS = ("full", "448")


@dataclasses.dataclass(frozen=True)
class ShardConfig(P.Params):
    splits: tuple[str, ...] = P.setting(SPLITS, "splits to shard", choices=SPLITS)
    views: str = P.setting("all", "views in each sample", choices=VIEW_SETS)
    # 16 s windows, back to back: every frame lands in exactly one sample, a window holds most
    # keystep segments whole, and remux's pre-roll (the frames from the keyframe before a
    # window, up to a GOP per view) adds about a quarter to the clips' bytes with 250-frame
    # GOPs, half with 8 s windows (bench/shard.py).
    window: float = P.setting(16.0, "window length in seconds")
    stride: float | None = P.setting(None, "window stride in seconds (default: the window)")
    mode: str = P.setting("remux", "remux: copy packets (fast, cuts snap to keyframes); transcode: re-encode "
                                   "exact windows; frames: JPEG frames", choices=MODES)
    resolution: str = P.setting("448", "which source videos to read", choices=RESOLUTIONS)
    short_side: int | None = P.setting(None, "transcode/frames: output short side (default: as the source)")
    fps: float | None = P.setting(None, "transcode/frames: output frame rate (default: 30, every frame)")
    gop: int = P.setting(30, "transcode: keyframe interval in frames")
    shard_mb: float = P.setting(1000.0, "target shard size in MB")
    drift: str = P.setting("reject", "a take whose views differ in frame count: reject it, or trim every view to "
                                     "the frames all of them have (recorded in the sample and problems.json)",
                           choices=DRIFT_POLICIES)

    def __post_init__(self):
        super().__post_init__()
        if not self.window > 0 or (self.stride is not None and not self.stride > 0):
            raise ValueError("window and stride must be positive")
        if self.mode == "remux" and (self.short_side or self.fps):
            raise ValueError("remux copies packets: short_side and fps need mode transcode or frames")

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1e6)


def window_frames(num_frames: int, window: float, stride: float | None, fps: float = 30.0) -> list[tuple[int, int]]:
    """[start, end) frame ranges covering a take; the last window is cut at the take's end."""
    length = max(1, int(round(window * fps)))
    step = max(1, int(round((stride or window) * fps)))
    out, start = [], 0
    while start < num_frames:
        out.append((start, min(start + length, num_frames)))
        if start + length >= num_frames:
            break
        start += step
    return out


def select_views(take: rec.Take, views: str, resolution: str) -> list[tuple[str, rec.View]]:
    """(member name, view) pairs: the ego view is always named ``ego``, exo views by cam_id."""
    all_views = take.views(resolution)
    ego = [("ego", v) for v in all_views if v.is_ego]
    exo = [(v.cam_id, v) for v in all_views if not v.is_ego]
    if views == "ego":
        return ego
    if views == "ego+best_exo":
        best = [(n, v) for n, v in exo if n == take.best_exo] or exo[:1]
        return ego + best
    return ego + exo


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    take_uids: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


def plan_shards(split: str, takes: list[tuple[str, int]], shard_bytes: int) -> list[ShardSpec]:
    """Pack takes (uid, estimated bytes), in uid order, into shards of about ``shard_bytes``.

    A take is never split across shards, so a take's samples are contiguous and a bad take
    never leaves half of itself behind.
    """
    specs, current, size = [], [], 0
    for uid, nbytes in sorted(takes):
        if current and size + nbytes > shard_bytes:
            specs.append(ShardSpec(split, len(specs), tuple(current)))
            current, size = [], 0
        current.append(uid)
        size += nbytes
    if current:
        specs.append(ShardSpec(split, len(specs), tuple(current)))
    return specs
