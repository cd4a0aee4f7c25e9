"""Feature files: the one owner of their names, of writing them and of reading them back.

A feature stage's output folder OUT (the official layout is OUT = <release>/features/<model>):
  <name>.pt                 float32 [num_windows, dim]; written last for its take view, so it
                            marks that take view finished
  parquet/<name>.parquet    take_uid, cam_id, stream_id, window, t0, t1, vector (one row a window)

``<name>`` is the official file stem ``<take_uid>_<cam_id>_<stream_id>``: stream ``rgb`` for
the Aria (ego) camera, the release's stream id (``0``) for GoPros, so ``<uid>_aria01_rgb`` and
``<uid>_cam01_0``. A name is read from the right (cam and stream ids hold no ``_``), so a
take_uid may hold one.

Names are plain strings everywhere (``FeatureName`` is their parsed form); the feature job
writes with ``TakeViewWriter`` (which calls ``write_take_view``) and lists with ``finished``;
training reads with ``FeatureStore``. Nothing here imports torch until a tensor is written or loaded.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import io
import os
import posixpath
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from engine import stage as stages
from engine import storage

if TYPE_CHECKING:
    import fsspec

    from engine.release.records import View

EGO_STREAM = "rgb"          # the stream id of the Aria camera in feature names
PARQUET_DIR = "parquet"


# ----------------------------------------------------------------------------- names

class FeatureName(NamedTuple):
    """A parsed feature name; ``str()`` gives the name back."""
    take_uid: str
    cam_id: str
    stream_id: str

    def __str__(self) -> str:
        return f"{self.take_uid}_{self.cam_id}_{self.stream_id}"

    @property
    def is_ego(self) -> bool:
        return self.stream_id == EGO_STREAM

    @property
    def view(self) -> str:
        """``<cam_id>_<stream_id>``: ``aria01_rgb``, ``cam01_0``."""
        return f"{self.cam_id}_{self.stream_id}"


def _view_ids(view: View | dict) -> tuple[str, str]:
    """(cam_id, stream_id) of a release ``View`` or of a shard's view record (a dict with
    ``cam_id``, ``stream_id`` and ``is_ego``) as feature names spell them."""
    if isinstance(view, dict):
        cam_id, stream_id, ego = view["cam_id"], view["stream_id"], view["is_ego"]
    else:
        cam_id, stream_id, ego = view.cam_id, view.stream_id, view.is_ego
    return cam_id, EGO_STREAM if ego else stream_id


def feature_name(take_uid: str, view: View | dict) -> str:
    """The name of a take view's features: ``<take_uid>_aria01_rgb``, ``<take_uid>_cam01_0``."""
    return str(make_name(take_uid, *_view_ids(view)))


def view_name(view: View | dict) -> str:
    """``<cam_id>_<stream_id>`` of a view as feature names spell it: ``aria01_rgb``, ``cam01_0``."""
    return FeatureName("", *_view_ids(view)).view


def make_name(take_uid: str, cam_id: str, stream_id: str) -> FeatureName:
    """A name from its parts; refuses parts that would not read back (an id with ``_`` or
    ``/``, an empty part)."""
    for what, part in (("take_uid", take_uid), ("cam_id", cam_id), ("stream_id", stream_id)):
        if not part or "/" in part or (what != "take_uid" and "_" in part):
            raise ValueError(f"{what} {part!r} cannot be part of a feature file name")
    return FeatureName(take_uid, cam_id, stream_id)


def parse_name(name: str) -> FeatureName:
    """``<take_uid>_<cam_id>_<stream_id>`` into its parts (the take_uid may hold ``_``)."""
    parts = name.rsplit("_", 2)
    if len(parts) != 3 or not all(parts) or "/" in name:
        raise ValueError(f"{name!r} is not a feature name (<take_uid>_<cam_id>_<stream_id>)")
    return FeatureName(*parts)


def is_ego(name: str) -> bool:
    """Whether a feature name is the Aria (ego) camera's."""
    return parse_name(name).is_ego


def by_take(names: Iterable[str]) -> dict[str, list[str]]:
    """Names grouped by take_uid, in the order given."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(parse_name(name).take_uid, []).append(name)
    return out


# ----------------------------------------------------------------------------- files

def _tensor_path(out: str, name: str) -> str:
    return storage.join(out, f"{name}.pt")


def _parquet_path(out: str, name: str) -> str:
    return storage.join(out, PARQUET_DIR, f"{name}.parquet")


def finished(fs: fsspec.AbstractFileSystem, out: str) -> set[str]:
    """Names of the take views finished under ``out``: those whose .pt exists (a .pt that is
    not named like a feature file is not one)."""
    fs.invalidate_cache(out)   # writers are other processes: a listing cached here (s3fs) may be stale
    names = set()
    for path in fs.glob(_tensor_path(out, "*")):
        name = posixpath.basename(path)[:-len(".pt")]
        try:
            parse_name(name)
        except ValueError:
            continue
        names.add(name)
    return names


def remove_temporaries(fs: fsspec.AbstractFileSystem, out: str) -> None:
    """Delete the temporaries a killed writer left (local storage only; never counted as done)."""
    if storage.is_local(fs):
        for stale in fs.glob(storage.join(out, "*.tmp-*")) + fs.glob(storage.join(out, PARQUET_DIR, "*.tmp-*")):
            fs.rm(stale)


def write_take_view(fs: fsspec.AbstractFileSystem, out: str, name: str, rows: list[dict]) -> None:
    """One take view's files from its window rows (``take_uid``, ``cam_id``, ``stream_id``,
    ``window``, ``t0``, ``t1``, ``vector``; any order): parquet first, then the .pt, each
    written atomically, since the .pt is what says the take view is finished."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    rows = sorted(rows, key=lambda r: r["window"])
    vectors = np.stack([r["vector"] for r in rows]).astype(np.float32)
    table = pa.table({
        "take_uid": [r["take_uid"] for r in rows], "cam_id": [r["cam_id"] for r in rows],
        "stream_id": [r["stream_id"] for r in rows], "window": [r["window"] for r in rows],
        "t0": [r["t0"] for r in rows], "t1": [r["t1"] for r in rows],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(fs, _parquet_path(out, name), buf.getvalue())
    buf = io.BytesIO()
    torch.save(torch.from_numpy(vectors), buf)
    storage.write_bytes_atomic(fs, _tensor_path(out, name), buf.getvalue())


class TakeViewWriter:
    """Gathers window rows as they come (columns as ``write_take_view`` takes them, plus ``name``
    and ``num_windows``, in any order and any batches) and writes each take view's files once its
    last window is in, on a pool of threads: object stores take many PUTs at once. The feature
    job runs a few of these as Ray actors, so the writes happen off the driver, in parallel.

    A window given twice (a retried batch) counts once; take views that never complete (a
    rejected one's) are only reported by ``finish``."""

    COLUMNS = ("take_uid", "cam_id", "stream_id", "window", "t0", "t1")

    def __init__(self, out_url: str, storage_options: dict | None = None, threads: int = 8):
        import pyarrow.parquet  # noqa: F401 - imported (a second or two) while the pipeline starts, not at the first write
        import torch  # noqa: F401
        self.fs, self.out = storage.filesystem(out_url, storage_options)
        self.pool = cf.ThreadPoolExecutor(threads)
        self.limit = 4 * threads                      # writes queued at most; more waits (backpressure)
        self.partial: dict[str, dict[int, dict]] = {}
        self.written: dict[str, tuple[int, int]] = {}  # name -> (windows, dim)
        self.futures: set[cf.Future] = set()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Window rows as columns (``vector`` float32 [rows, dim]); returns when every complete
        take view among them is queued; raises the error of any write that failed."""
        columns = {k: batch[k].tolist() for k in ("name", "num_windows", *self.COLUMNS)}
        for j, name in enumerate(columns["name"]):
            if name in self.written:
                continue
            rows = self.partial.setdefault(name, {})
            rows[columns["window"][j]] = dict({k: columns[k][j] for k in self.COLUMNS}, vector=batch["vector"][j])
            if len(rows) == columns["num_windows"][j]:
                del self.partial[name]
                self.written[name] = (len(rows), len(batch["vector"][j]))
                self.futures.add(self.pool.submit(write_take_view, self.fs, self.out, name, list(rows.values())))
        self._settle(self.limit)

    def _settle(self, limit: int) -> None:
        while len(self.futures) > limit:
            finished, self.futures = cf.wait(self.futures, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                f.result()
        for f in [f for f in self.futures if f.done()]:
            self.futures.discard(f)
            f.result()

    def finish(self) -> dict:
        """Wait for every write (raising the first error); what was written, where, and what never
        completed: ``written`` name -> [windows, dim], ``partial`` name -> windows in, ``pid``, ``node``."""
        self._settle(0)
        self.pool.shutdown()
        import ray
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"written": {k: list(v) for k, v in self.written.items()},
                "partial": {k: len(v) for k, v in self.partial.items()}, "pid": os.getpid(), "node": node}


def _read_tensor(fs: fsspec.AbstractFileSystem, out: str, name: str) -> Any:
    import torch
    with fs.open(_tensor_path(out, name), "rb") as f:
        return torch.load(f, weights_only=True)


def dim_of(fs: fsspec.AbstractFileSystem, out: str, names: Iterable[str]) -> int | None:
    """The feature dimension, from the first of ``names`` (sorted); None when there are none."""
    names = sorted(names)
    return int(_read_tensor(fs, out, names[0]).shape[1]) if names else None


def load_tensor(out_url: str, name: str, storage_options: dict | None = None) -> Any:
    """One take view's features as a torch tensor [num_windows, dim]."""
    fs, out = storage.filesystem(out_url, storage_options)
    return _read_tensor(fs, out, name)


# ----------------------------------------------------------------------------- reading a stage

class FeatureStore:
    """A finished feature stage's output: per take view, window times and vectors."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url, storage_options
        self.fs, self.path = storage.filesystem(url, storage_options)
        self.stage = stages.finished(url, "features", storage_options)["result"]
        self.dim = int(self.stage["dim"])
        self.names = sorted(finished(self.fs, self.path))
        self._by_take = by_take(self.names)

    def views(self, take_uid: str) -> tuple[str | None, list[str]]:
        """(ego feature name or None, exo feature names) of a take."""
        names = self._by_take.get(take_uid, [])
        ego = [n for n in names if is_ego(n)]
        return (ego[0] if ego else None), [n for n in names if not is_ego(n)]

    @functools.lru_cache(maxsize=4096)   # noqa: B019 - a store lives as long as the run that reads it
    def load(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t0 [W], t1 [W], vectors float32 [W, D]) of one take view."""
        import pyarrow.parquet as pq
        with self.fs.open(_parquet_path(self.path, name), "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
        order = np.argsort(table.column("window").to_numpy())
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        return table.column("t0").to_numpy()[order], table.column("t1").to_numpy()[order], vectors[order]

    def release_url(self) -> str:
        """The release these features come from: features -> shards -> release, by their records."""
        return stages.upstream(self.url, "release", self.storage_options)
