"""What a shard job will write: its configuration, the windows of a take, the shards of a split.

Everything here is a pure function of the release and the configuration, so a rerun after a
crash plans exactly the same shards with the same keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from engine.release import records as rec

FORMAT_VERSION = 1
MODES = ("remux", "transcode", "frames")
VIEW_SETS = ("ego", "ego+best_exo", "all")


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    splits: tuple[str, ...] = ("train", "val", "test")
    views: str = "all"
    # 8 s windows, back to back: every frame lands in exactly one sample (shards hold the
    # source bytes once), a window holds most keystep segments whole, and remux's keyframe
    # pre-roll stays a small share of each clip.
    window: float = 8.0
    stride: float | None = None          # None: equal to window
    mode: str = "remux"                  # measured fastest; see bench/shard.py
    resolution: str = "448"              # source files: "448" (downscaled) or "full"
    short_side: int | None = None        # transcode/frames: target short side (None: as source)
    fps: float | None = None             # transcode/frames: target fps (None: 30, every frame)
    gop: int = 30                        # transcode: keyframe interval, first frame is a keyframe
    shard_bytes: int = 1_000_000_000     # target shard size

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.views not in VIEW_SETS:
            raise ValueError(f"views must be one of {', '.join(VIEW_SETS)}, got {self.views!r}")
        if self.resolution not in ("full", "448"):
            raise ValueError(f"resolution must be 'full' or '448', got {self.resolution!r}")
        if not self.window > 0 or (self.stride is not None and not self.stride > 0):
            raise ValueError("window and stride must be positive")
        if self.mode == "remux" and (self.short_side or self.fps):
            raise ValueError("remux copies packets: --short-side and --fps need --mode transcode or frames")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        blob = json.dumps({"config": self.to_json(), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def sample_key(take_uid: str, start_frame: int) -> str:
    """Deterministic, dot-free key of a window: webdataset splits names at the first dot."""
    return f"{take_uid}_{start_frame:08d}"


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
