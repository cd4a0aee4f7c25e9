"""Clips streamed from the shards into training: a sample index, a seeded order per epoch, and
decoding on Ray Data's CPU tasks.

Each sample is fetched with one range read: the shard manifest says where its members lie in
its tar (``offset``, ``size``), so the order can be shuffled over the whole split every epoch
(shards and samples at once) without reading a shard front to back, and a read stays as large
as a sample (MBs). The order is a pure function of (seed, epoch): epoch e is a permutation of
the split's samples, padded by wrapping to a multiple of the worker count, and worker r takes
positions r, r + W, r + 2W, ... So every sample is seen once per epoch across workers (a
padded few twice), each worker's stream is the same on every run, and a resumed run starts
each worker's stream at the row it had reached.

A row of the training stream is one moment of one take: an ego clip and an exo clip of the
same source frames (``clip_frames`` frames, ``frame_stride`` apart, placed at a random time in
the sample's window), the exo camera drawn at random among the sample's, each view cropped on
its own. Randomness is drawn from (seed, epoch, sample), so it changes every epoch and repeats
on every run. Evaluation rows are one view of one sample, the clip centred in the window.
"""
from __future__ import annotations

import dataclasses
import io
import math
import tarfile

import numpy as np

from engine import stage as stages
from engine import storage, video
from engine.errors import ContentError, StorageFault
from engine.shards import schema
from engine.shards.dataset import view_frames

CROPS = ("random", "centre", "pad")


class SampleError(ContentError):
    """A sample that cannot be read or decoded; the message names it, its shard and the reason."""


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What a decoded clip looks like: ``frames`` frames ``stride`` source frames apart, each
    ``size`` x ``size``. Crops: ``random`` (short side resized to 8/7 of ``size``, a random
    square of ``size``), ``centre`` (short side to ``size``, the centre square) or ``pad`` (the
    whole frame, long side to ``size``, padded with black at the bottom and right)."""
    frames: int = 8
    stride: int = 4
    size: int = 64
    crop: str = "random"
    exo_views: tuple[str, ...] | None = None    # exo cameras to pair with (None: every one)

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.frames < 1 or self.stride < 1 or self.size < 8:
            raise ValueError("clip frames and stride must be >= 1 and size >= 8")

    @property
    def span(self) -> int:
        """Source frames from the clip's first frame to its last, inclusive."""
        return (self.frames - 1) * self.stride + 1


@dataclasses.dataclass(frozen=True)
class SampleRef:
    key: str
    take_uid: str
    url: str            # the shard
    offset: int         # where the sample's first member header starts in the tar
    size: int           # bytes of its members, headers and padding included
    views: tuple[str, ...]


def sample_index(shards_url: str, split: str, storage_options: dict | None = None) -> list[SampleRef]:
    """The samples of a split, in manifest order, from a shard stage's ``manifest.parquet``."""
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(shards_url, storage_options)
    with fs.open(storage.join(root, "manifest.parquet"), "rb") as f:
        table = pq.read_table(f).to_pylist()
    if table and "offset" not in table[0]:
        raise ValueError(f"{shards_url}: the manifest has no sample offsets (written by an older engine); "
                         "write the shards again")
    base = shards_url.rstrip("/")
    return [SampleRef(r["key"], r["take_uid"], f"{base}/{split}/{r['shard']}.tar", r["offset"], r["size"],
                      tuple(r["views"]))
            for r in table if r["split"] == split]


def rows_per_epoch(samples: int, workers: int) -> int:
    """Rows each worker reads per epoch."""
    return math.ceil(samples / workers)


def epoch_order(samples: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(samples)


def row_sample(row: int, samples: int, workers: int, rank: int, seed: int,
               orders: dict | None = None) -> tuple[int, int]:
    """(epoch, sample index) of worker ``rank``'s ``row``-th row; ``orders`` keeps the current
    epoch's permutation between calls."""
    epoch, k = divmod(row, rows_per_epoch(samples, workers))
    orders = {} if orders is None else orders
    if epoch not in orders:
        orders.clear()
        orders[epoch] = epoch_order(samples, epoch, seed)
    return epoch, int(orders[epoch][(k * workers + rank) % samples])


# ----------------------------------------------------------------------------- one sample

def read_sample(ref: SampleRef, storage_options: dict | None = None) -> dict[str, bytes]:
    """The sample's members ``{"json": ..., "ego.mp4": ..., ...}`` from one range read."""
    fs, path = storage.filesystem(ref.url, storage_options)
    with storage.faults_named(f"{ref.url} bytes {ref.offset}-{ref.offset + ref.size}"):
        data = fs.cat_file(path, start=ref.offset, end=ref.offset + ref.size)
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            if key != ref.key:
                raise ValueError(f"{ref.url} at byte {ref.offset}: member {info.name} is not of sample "
                                 f"{ref.key}; the manifest does not match the shard")
            members[member] = tar.extractfile(info).read()
    return members


def _decode_size(width: int, height: int, spec: ClipSpec) -> tuple[int, int]:
    if spec.crop == "pad":
        scale = spec.size / max(width, height)
        return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))
    short = spec.size * 8 // 7 if spec.crop == "random" else spec.size
    return video.short_side_size(width, height, short, at_least=True)


def _crop(images: list[np.ndarray], spec: ClipSpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, size, size, 3] from the decoded frames of one view, one crop for all of them."""
    clip = np.stack(images)
    s, (h, w) = spec.size, clip.shape[1:3]
    if spec.crop == "pad":
        out = np.zeros((len(clip), s, s, 3), np.uint8)
        out[:, :min(h, s), :min(w, s)] = clip[:, :s, :s]
        return out
    if spec.crop == "random":
        top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    else:
        top, left = (h - s) // 2, (w - s) // 2
    return clip[:, top:top + s, left:left + s]


def clip_frames(window: schema.Window, spec: ClipSpec, rng: np.random.Generator | None) -> np.ndarray:
    """The source frames of a clip in the window: at a random start (``rng``) or centred. A
    window shorter than the clip's span gives its frames spread evenly (some repeated)."""
    start, end = window.start_frame, window.end_frame
    room = end - start - spec.span
    if room < 0:
        return start + (np.arange(spec.frames) * (end - start)) // spec.frames
    first = start + (int(rng.integers(0, room + 1)) if rng is not None else room // 2)
    return first + np.arange(spec.frames) * spec.stride


def decode_view(sample: dict[str, bytes], meta: schema.SampleMeta, name: str, frames: np.ndarray,
                spec: ClipSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [T, size, size, 3], the source frame each shows) for view ``name``."""
    info = meta.views[name]
    images, shown = view_frames(sample, name, [int(f) for f in frames], _decode_size(info.width, info.height, spec))
    return _crop(images, spec, rng), np.asarray(shown, np.int64)


def exo_views(meta: schema.SampleMeta, spec: ClipSpec) -> list[str]:
    names = sorted(n for n, v in meta.views.items() if not v.is_ego)
    return [n for n in names if n in spec.exo_views] if spec.exo_views else names


def decode_pair(sample: dict[str, bytes], spec: ClipSpec, seed: int, epoch: int, index: int) -> dict:
    """One training row: an ego and an exo clip of the same moment (see the module's text)."""
    meta = schema.read_meta(sample[schema.JSON_MEMBER])
    rng = np.random.default_rng([seed, epoch, index])
    choices = exo_views(meta, spec)
    if "ego" not in meta.views or not choices:
        raise ValueError(f"sample {meta.key}: needs the ego view and an exo view"
                         f"{' of ' + ', '.join(spec.exo_views) if spec.exo_views else ''}; it has "
                         f"{', '.join(sorted(meta.views))}")
    exo = choices[int(rng.integers(len(choices)))]
    frames = clip_frames(meta.window, spec, rng)
    ego_clip, ego_frames = decode_view(sample, meta, "ego", frames, spec, rng)
    exo_clip, exo_frames = decode_view(sample, meta, exo, frames, spec, rng)
    return {"ego": ego_clip, "exo": exo_clip, "ego_frames": ego_frames, "exo_frames": exo_frames,
            "sample": np.int64(index), "epoch": np.int64(epoch)}


def frames_by_take(shards_url: str, split: str, wanted: dict[str, set[tuple[str, int]]], size: int | None = None,
                   storage_options: dict | None = None) -> dict[tuple[str, str, int], np.ndarray]:
    """Single frames from the shards, for models trained on frames (correspondence, translation):
    ``wanted`` is {take uid: {(release view key, source frame)}}; returns {(take uid, view key,
    frame): uint8 [size, size, 3] (or the view's own size)}. Each sample of a wanted take is
    read once and each of its views decoded only at the wanted frames in its window, samples on
    a few threads (reads and decoding release the GIL). A frame no sample holds is left out, for
    the caller to name."""
    from concurrent.futures import ThreadPoolExecutor

    def sample_frames(ref: SampleRef) -> dict[tuple[str, str, int], np.ndarray]:
        pairs, found = wanted[ref.take_uid], {}
        sample = load(ref, lambda members: members, storage_options)
        meta = schema.read_meta(sample[schema.JSON_MEMBER])
        for name, view in sorted(meta.views.items()):
            frames = sorted(f for key, f in pairs if key == view.key
                            and meta.window.start_frame <= f < meta.window.end_frame)
            if not frames:
                continue
            images, shown = view_frames(sample, name, frames, (size, size) if size else None)
            if shown != frames:
                raise ValueError(f"{ref.url}: sample {ref.key} keeps view {name} at a lower rate: frame "
                                 f"{next(f for f, s in zip(frames, shown) if f != s)} is not in it; models trained "
                                 f"on frames need shards at the source rate")
            found.update({(ref.take_uid, view.key, f): image for f, image in zip(frames, images)})
        return found

    refs = [ref for ref in sample_index(shards_url, split, storage_options) if wanted.get(ref.take_uid)]
    out: dict[tuple[str, str, int], np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for found in pool.map(sample_frames, refs):
            # Overlapping windows hold a frame twice: the first sample's stays.
            out.update({k: v for k, v in found.items() if k not in out})
    return out


def centred_clips(sample: dict[str, bytes], spec: ClipSpec) -> list[tuple[np.ndarray, bool]]:
    """Evaluation clips: each view's clip centred in the window, and whether it is the ego view."""
    meta = schema.read_meta(sample[schema.JSON_MEMBER])
    frames = clip_frames(meta.window, spec, None)
    return [(decode_view(sample, meta, name, frames, spec, np.random.default_rng(0))[0], meta.views[name].is_ego)
            for name in sorted(meta.views)]


# ----------------------------------------------------------------------------- Ray Data

_INDEX_CACHE: dict = {}


def _index(ref) -> list[SampleRef]:
    """The sample index from the object store, fetched once per worker process."""
    import ray
    key = ref.hex()
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = ray.get(ref)
    return _INDEX_CACHE[key]


def load(ref: SampleRef, decode, storage_options: dict | None):
    """``decode(members)`` of the sample at ``ref``, any failure named by sample and shard."""
    try:
        return decode(read_sample(ref, storage_options))
    except StorageFault:
        raise
    except (ContentError, ValueError, KeyError, OSError, tarfile.TarError) as e:
        raise SampleError(f"sample {ref.key} of take {ref.take_uid} ({ref.url}, bytes {ref.offset}-"
                          f"{ref.offset + ref.size}): {type(e).__name__}: {e}") from e


def _decode_train_rows(batch: dict, index_ref, spec: ClipSpec, workers: int, rank: int, seed: int, start: int,
                       storage_options: dict | None) -> dict:
    index, orders = _index(index_ref), {}
    rows = []
    for i in batch["id"]:
        epoch, sample = row_sample(start + int(i), len(index), workers, rank, seed, orders)
        rows.append(load(index[sample], lambda members: decode_pair(members, spec, seed, epoch, sample),
                         storage_options))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _decode_eval_rows(batch: dict, index_ref, spec: ClipSpec, storage_options: dict | None) -> dict:
    index = _index(index_ref)
    clips, samples, is_ego = [], [], []
    for i in batch["sample"]:
        for clip, ego in load(index[int(i)], lambda members: centred_clips(members, spec), storage_options):
            clips.append(clip)
            samples.append(int(i))
            is_ego.append(ego)
    return {"clip": np.stack(clips), "sample": np.asarray(samples, np.int64), "is_ego": np.asarray(is_ego, np.int64)}


def train_stream(index: list[SampleRef], spec: ClipSpec, *, workers: int, rank: int, seed: int, start: int,
                 rows: int, storage_options: dict | None = None, rows_per_task: int = 4):
    """Worker ``rank``'s rows ``start`` .. ``start + rows - 1`` as a Ray Dataset decoded on CPU
    tasks (one CPU each). Keep ``preserve_order`` on in its execution options: the rows then
    arrive in order, so a run repeats and a resumed stream continues exactly."""
    import ray
    import ray.data

    # Whole blocks per decode call: with a batch size Ray Data does not fuse the map with the
    # read. Without the CPU reservation bench/pretrain.py measured 2x the pairs/s on 2 CPUs.
    stream = ray.data.range(rows, override_num_blocks=max(1, math.ceil(rows / rows_per_task))).map_batches(
        _decode_train_rows, batch_size=None, num_cpus=1,
        fn_kwargs={"index_ref": ray.put(index), "spec": spec, "workers": workers, "rank": rank, "seed": seed,
                   "start": start, "storage_options": storage_options})
    return stages.without_cpu_reservation(stream)


def eval_stream(index: list[SampleRef], spec: ClipSpec, storage_options: dict | None = None,
                rows_per_task: int = 2):
    """One row per (sample, view) of ``index``: the clip centred in the sample's window,
    ``spec``'s crop (centre for evaluation). Each sample is read once for all its views."""
    import ray
    import ray.data

    items = [{"sample": i} for i in range(len(index))]
    stream = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_task))).map_batches(
        _decode_eval_rows, batch_size=None, num_cpus=1,
        fn_kwargs={"index_ref": ray.put(index), "spec": spec, "storage_options": storage_options})
    return stages.without_cpu_reservation(stream)
