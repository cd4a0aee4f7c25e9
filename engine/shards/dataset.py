"""Reading shards back: decoded, time-aligned clips from a sample, for torch and for Ray Data.

A sample arrives as webdataset gives it: ``{"__key__": ..., "json": bytes, "ego.mp4": bytes, ...}``
(its layout: ``engine.shards.schema``). ``decode_sample`` turns it into frames at the requested
times, for every view, decoding only what those times need.
"""
from __future__ import annotations

import bisect
import io
import json
from collections.abc import Iterable, Sequence

import numpy as np

from engine import video
from engine.shards import dense, schema


def sample_times(meta: schema.SampleMeta | dict | bytes, num_frames: int | None = None,
                 fps: float | None = None) -> np.ndarray:
    """Times (seconds, take timeline) to decode: ``num_frames`` spread over the window, every
    ``1/fps`` seconds from its start, or every source frame."""
    meta = schema.read_meta(meta)
    t0, t1 = meta.window.t0, meta.window.t1
    if num_frames:
        return t0 + (np.arange(num_frames) + 0.5) * (t1 - t0) / num_frames
    step = 1.0 / (fps or meta.take.fps)
    return np.arange(t0, t1 - 1e-9, step)


def decode_view(sample: dict, name: str, times: Sequence[float],
                size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Frames of view ``name`` at ``times`` (uint8 [T, H, W, 3]) and the source frame of each."""
    fps = _meta(sample).take.fps
    images, shown = view_frames(sample, name, [video.source_frame(t, fps) for t in times], size)
    return np.stack(images), shown


def view_frames(sample: dict, name: str, wanted: Sequence[int],
                size: tuple[int, int] | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Frames of view ``name`` showing source frames ``wanted``, and the source frame each shows.

    Video members show exactly the wanted frame; members kept at a lower rate (transcode or
    frames mode with --fps) show the latest kept frame at or before it.
    """
    info = _meta(sample).views[name]
    source = info.source_frames
    picks = []
    for frame in wanted:
        k = bisect.bisect_right(source, frame) - 1
        if k < 0:
            raise ValueError(f"source frame {frame} is before the first frame of view {name}")
        picks.append(k)
    if info.members is not None:
        images = [video.decode_jpeg(sample[info.members[k]], size) for k in picks]
    else:
        decoded = video.decode_at(sample[info.member], picks, size)
        images = [decoded[k] for k in picks]
    return images, [source[k] for k in picks]


def _meta(sample: dict) -> schema.SampleMeta:
    return schema.read_meta(sample[schema.JSON_MEMBER])


def decode_sample(sample: dict, views: Iterable[str] | None = None, num_frames: int | None = None,
                  fps: float | None = None, size: tuple[int, int] | None = None) -> dict:
    """Decoded clip: {"key", "json" (the sample's meta as a JSON object), "times",
    "frames": {view: uint8 [T,H,W,3]}, "source_frames": {view: [int]}, "arrays": {family:
    {name: array}} (the dense annotations), and when present "trajectory" and "gaze" ({column: array})
    and "audio" (float32 [channels, samples] of the window)}."""
    # wids keeps the dot (".ego.mp4") and hands members over as streams.
    sample = {k.lstrip("."): v.getvalue() if isinstance(v, io.BytesIO) else v for k, v in sample.items()}
    meta = sample[schema.JSON_MEMBER] = _meta(sample)    # parsed once for every view
    times = sample_times(meta, num_frames, fps)
    out = {"key": meta.key, "json": meta.to_json(), "times": times, "frames": {}, "source_frames": {}}
    for name in views or sorted(meta.views):
        out["frames"][name], out["source_frames"][name] = decode_view(sample, name, times, size)
    for sensor, info in meta.sensors.items():
        if isinstance(info, schema.AudioSensor):
            out[sensor] = read_audio(sample[info.member], info)
        else:
            out[sensor] = dense.load_npz(sample[info.member])
    out["arrays"] = dense.read_window(sample, meta.arrays)   # each array checked against its description
    return out


def read_audio(data: bytes, info: schema.AudioSensor) -> np.ndarray:
    """The window's audio, float32 [channels, samples], from the sample's audio member."""
    audio, _ = video.decode_audio(io.BytesIO(data), 0.0, info.samples / info.rate)
    return audio


def _register_fsspec_schemes() -> None:
    """Let webdataset open s3:// (and any fsspec URL) shards."""
    import importlib

    from engine import storage
    gopen = importlib.import_module("webdataset.gopen")   # the package re-exports a function of that name

    def open_fsspec(url, mode="rb", bufsize=8192, **kw):
        fs, path = storage.filesystem(url)
        return fs.open(path, mode)

    for scheme in ("s3", "gs", "az"):
        gopen.gopen_schemes.setdefault(scheme, open_fsspec)


def clip_dataset(urls: str | list[str], views: Iterable[str] | None = None, num_frames: int | None = 8,
                 fps: float | None = None, size: tuple[int, int] | None = None, shuffle: int = 0):
    """A torch IterableDataset of decoded clips, split across nodes and DataLoader workers."""
    import torch
    import webdataset as wds

    _register_fsspec_schemes()
    views = list(views) if views else None

    def to_torch(sample):
        clip = decode_sample(sample, views, num_frames, fps, size)
        clip["frames"] = {k: torch.from_numpy(v) for k, v in clip["frames"].items()}
        return clip

    ds = wds.WebDataset(urls, shardshuffle=bool(shuffle), nodesplitter=wds.split_by_node, empty_check=False)
    if shuffle:
        ds = ds.shuffle(shuffle)
    return ds.map(to_torch)


def ray_dataset(paths: str | list[str], views: Iterable[str] | None = None, num_frames: int | None = 8,
                fps: float | None = None, size: tuple[int, int] | None = None, filesystem=None):
    """A Ray Dataset of decoded clips: ``read_webdataset`` plus a decode map, one row per clip."""
    import ray.data

    views = list(views) if views else None

    def decode_row(row):
        sample = {k: v for k, v in row.items() if not k.startswith("__")}
        clip = decode_sample(sample, views, num_frames, fps, size)
        flat = {"key": clip["key"], "json": json.dumps(clip["json"]), "times": clip["times"]}
        for name, frames in clip["frames"].items():
            flat[f"frames_{name}"] = frames
        return flat

    ds = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None)   # raw bytes per member
    return ds.map(decode_row)
