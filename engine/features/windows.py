"""Feature windows on a take's timeline, and the frames each needs, from shards or from the release.

Official convention (video models): 32-frame windows at 30 fps with stride 16; when the stride
does not end exactly at the take's end, one more window ``[n - 32, n)``. Image models: one
feature per frame at a chosen rate. Windows are computed from the take's frame count alone, so
a window that spans two shard samples is the same window, with the same frames, as on the
continuous video.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from engine import video
from engine.errors import ContentError
from engine.features.models import ModelSpec
from engine.release import records as rec
from engine.shards import schema
from engine.shards.dataset import view_frames

FPS = 30.0


class FeatureInputError(ContentError):
    """The frames of a take view cannot be produced; the message says why."""


@dataclasses.dataclass(frozen=True)
class Window:
    index: int
    start: int                  # [start, end) source frames on the take's timeline
    end: int
    picks: tuple[int, ...]      # the source frames the model sees, ascending

    @property
    def t0(self) -> float:
        return self.start / FPS

    @property
    def t1(self) -> float:
        return self.end / FPS


def video_windows(num_frames: int, window: int = 32, stride: int = 16) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the official rule; a take shorter than a window gives one."""
    if num_frames <= window:
        return [(0, num_frames)]
    spans = [(s, s + window) for s in range(0, num_frames - window + 1, stride)]
    if spans[-1][1] < num_frames:
        spans.append((num_frames - window, num_frames))
    return spans


def feature_windows(spec: ModelSpec, num_frames: int, window: int = 32, stride: int = 16,
                    fps: float | None = None) -> list[Window]:
    """The windows of a take for a model: video models see ``spec.frames`` frames spread evenly
    over each window; image models one frame every ``1/fps`` s (every frame when fps is None)."""
    if spec.kind == "image":
        return [Window(i, f, f + 1, (f,)) for i, f in enumerate(video.frames_at_rate(0, num_frames, FPS, fps))]
    out = []
    for i, (start, end) in enumerate(video_windows(num_frames, window, stride)):
        length = end - start
        out.append(Window(i, start, end, tuple(start + (k * length) // spec.frames for k in range(spec.frames))))
    return out


def input_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(W, H) to resize a frame to before the ``size`` x ``size`` centre crop: short side at
    ``size``, aspect kept, even (``video.short_side_size``), never below ``size``."""
    return video.short_side_size(width, height, size, at_least=True)


def centre_crop(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return frame[top:top + size, left:left + size]


class Assembler:
    """Pairs windows with their frames (uint8 [T, size, size, 3]) as frames arrive in ascending
    order, holding only the frames that pending windows still need."""

    def __init__(self, windows: list[Window], size: int):
        self.pending = list(reversed(windows))
        self.size, self.num_frames = size, windows[-1].end
        self.cache: dict[int, np.ndarray] = {}

    def push(self, index: int, image: np.ndarray) -> list[tuple[Window, np.ndarray]]:
        self.cache[index] = centre_crop(image, self.size)
        ready = []
        while self.pending and self.pending[-1].picks[-1] <= index:
            win = self.pending.pop()
            missing = [f for f in win.picks if f not in self.cache]
            if missing:
                raise FeatureInputError(f"frames {missing[:4]} of window {win.index} "
                                        f"[{win.t0:.3f}, {win.t1:.3f}) are not in the input")
            ready.append((win, np.stack([self.cache[f] for f in win.picks])))
            first_needed = self.pending[-1].picks[0] if self.pending else index + 1
            for f in [f for f in self.cache if f < first_needed]:
                del self.cache[f]
        return ready

    def finish(self) -> None:
        if self.pending:
            win = self.pending[-1]
            raise FeatureInputError(f"the input ends before window {win.index} "
                                    f"[{win.t0:.3f}, {win.t1:.3f}) (take has {self.num_frames} frames)")


def assemble(windows: list[Window], frames: Iterable[tuple[int, np.ndarray]],
             size: int) -> Iterator[tuple[Window, np.ndarray]]:
    """``Assembler`` over a whole stream of (source frame, image)."""
    assembler = Assembler(windows, size)
    for index, image in frames:
        yield from assembler.push(index, image)
    assembler.finish()


# ----------------------------------------------------------------------------- frame sources

def release_frames(release, view: rec.View, info: video.VideoInfo, needed: set[int],
                   size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Frames straight from a release video file (probed as ``info``), one decoding pass (the
    reference path)."""
    scaled = input_size(info.width, info.height, size)
    with release.open_file(view.path) as f:
        yield from video.decode(f, scaled, needed)


class ViewReader:
    """The ``needed`` frames (sorted) of one take view from the take's shard samples, fed in
    window order. Remux clips go through one ``video.ClipChain``: the packets that a window's
    clip shares with the one before (its pre-roll) are decoded once. Other members (transcoded
    clips, JPEG frames) are decoded sample by sample."""

    def __init__(self, member: str, needed: list[int], size: int):
        self.member, self.needed, self.size = member, needed, size
        self.chain: video.ClipChain | None = None
        self.last = -1          # the last frame given sample by sample; an overlapping sample does not give it twice

    def frames(self, sample: dict) -> list[tuple[int, np.ndarray]]:
        meta = sample[schema.JSON_MEMBER]
        try:
            info = meta.views[self.member]
            if meta.mode != "remux":
                frames = _sample_frames(sample, self.member, self.needed, self.last, self.size)
                self.last = frames[-1][0] if frames else self.last
                return frames
            if self.chain is None:     # it gives each frame once, in order
                self.chain = video.ClipChain(set(self.needed).__contains__, input_size(info.width, info.height, self.size))
            return list(self.chain.feed(sample[info.member], info.source_frames[0]))
        except (ContentError, KeyError, IndexError, ValueError) as e:   # a view or member missing, undecodable or short
            raise FeatureInputError(f"sample {meta.key}: {type(e).__name__}: {e}") from None

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """The frames the decoder still held after the take's last sample."""
        if self.chain is None:
            return []
        try:
            return list(self.chain.flush())
        except ContentError as e:
            raise FeatureInputError(f"the end of the take: {type(e).__name__}: {e}") from None


def _sample_frames(sample: dict, name: str, needed: list[int], after: int, size: int) -> list[tuple[int, np.ndarray]]:
    """Frames of view ``name`` that one shard sample holds: the ``needed`` ones (sorted) in its
    window and past ``after`` (frames an earlier, overlapping sample already gave)."""
    window, info = sample[schema.JSON_MEMBER].window, sample[schema.JSON_MEMBER].views[name]
    lo = bisect.bisect_left(needed, max(after + 1, window.start_frame))
    wanted = needed[lo:bisect.bisect_left(needed, window.end_frame)]
    if not wanted:
        return []
    images, _ = view_frames(sample, name, wanted, input_size(info.width, info.height, size))
    return list(zip(wanted, images))


def read_shard(url: str, storage_options: dict | None = None) -> Iterator[tuple[str, Iterator[dict]]]:
    """(take_uid, its samples as they stream by) for each take of a shard, grouped by webdataset's
    own tar reader, each sample's ``json`` read into a ``schema.SampleMeta``. The shard job
    writes a take's samples adjacent and in window order."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from engine import storage
    fs, path = storage.filesystem(url, storage_options)
    with storage.faults_named(url), fs.open(path, "rb") as stream:
        samples = ({**s, schema.JSON_MEMBER: schema.read_meta(s[schema.JSON_MEMBER])}
                   for s in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])))
        yield from itertools.groupby(samples, key=lambda s: s[schema.JSON_MEMBER].take.take_uid)
