"""The feature job: shards in, one feature tensor per take and view out, on any Ray cluster.

Pipeline (Ray Data, streaming):
  shards --flat_map on CPU tasks--> windows of frames (uint8, cropped to the model's input)
         --map_batches on an actor pool (GPU when the cluster has one, CPU otherwise)--> vectors
         --> writer actors (worker processes on the driver's node; a take view always to the same one)
             gather each take view's windows and write its files when complete, many at once.
  The driver process only sees rejects and, at the end, what each writer wrote: no feature bytes.

Outputs under OUT (the official layout is OUT = <release>/features/<model>; engine.features.store
owns the per take view files, their names, writing and reading):
  <take_uid>_<cam_id>_<stream_id>.pt    float32 [num_windows, dim]; written last for its take view,
                                        so it marks that take view finished
  parquet/<same stem>.parquet           take_uid, cam_id, stream_id, window, t0, t1, vector
  rejects.json                          take views (or shards) that produced nothing, and why
  stage.json                            the stage record (engine.stage): claimed first, marked done last,
                                        its result holds the model, weights sha256, windows and counts

A rerun skips take views whose .pt exists and shards whose take views are all done.
"""
from __future__ import annotations

import dataclasses
import functools
import tarfile
import time
import zlib
from collections.abc import Iterator

import numpy as np

from engine import errors, storage, video
from engine import params as P
from engine import stage as stages
from engine.errors import ContentError
from engine.features import models, store
from engine.features.models import ModelSpec
from engine.features.windows import (
    Assembler,
    FeatureInputError,
    ViewReader,
    assemble,
    feature_windows,
    read_shard,
    release_frames,
)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SPLITS = ("train", "val", "test")
WRITE_THREADS = 8
# The model name that means "the encoder this graph's pretrain stage trains".
GRAPH_PRETRAINED = "pretrained"


@dataclasses.dataclass(frozen=True)
class FeatureConfig(P.Params):
    model: str = P.setting("tiny_video", "tiny_video, tiny_image, torchscript:PATH, export:PATH, torchvision:NAME, "
                                         "timm:NAME, package.module:factory, pretrained:RUN, or in a graph "
                                         "pretrained (the encoder of the graph's pretrain stage)")
    # The weights' sha256, not their path, is what the fingerprint covers (``identity``).
    weights: str | None = P.setting(None, "weights (a state_dict): a path or an fsspec URL such as s3://..., read "
                                          "by the node that runs the model; nothing is downloaded from a hub",
                                    fingerprint=False)
    weights_sha256: str | None = P.setting(None, "expected sha256 of the weights (or of the model file): every "
                                                 "reader checks it; needed when the driver cannot read them",
                                           fingerprint=False)
    input: str | None = P.setting(None, "model input kind (built-ins know theirs)", choices=("video", "image"))
    frames: int | None = P.setting(None, "video models: frames fed per window (default 32; tiny_video 8)")
    size: int | None = P.setting(None, "input side in pixels (default 224; built-ins 64)")
    window: int = P.setting(32, "window in frames at 30 fps (official: 32)")
    stride: int = P.setting(16, "stride in frames (official: 16)")
    fps: float | None = P.setting(None, "image models: features per second (default: every frame)")
    views: str = P.setting("all", "views to embed", choices=("ego", "all"))
    splits: tuple[str, ...] | None = P.setting(None, "splits to embed (default: every split in the shards)",
                                               choices=SPLITS)
    batch_size: int = P.setting(16, "windows per model call", fingerprint=False)
    precision: str = P.setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=PRECISIONS)
    use_gpu: bool | None = P.setting(None, "run the model on GPUs (default: when the cluster has GPUs as the stage "
                                           "starts; say true on a cluster whose GPU nodes scale up from zero)",
                                     fingerprint=False)
    gpus_per_actor: float = P.setting(1.0, "fractions pack several actors per GPU", fingerprint=False)
    actors: int | None = P.setting(None, "model actors, at most (default: one per GPU share, or 1 without GPUs)",
                                   fingerprint=False)
    cpus_per_actor: float | None = P.setting(
        None, "without GPUs: CPUs each model actor reserves, and its torch threads (whole ones, at least 1). "
              "Default: 0 on a one-node cluster (the actor shares the decode tasks' cores, which a model "
              "waiting for frames need not hold), 1 with more nodes (a head node kept free of work with "
              "--num-cpus 0 then never gets one)", fingerprint=False)
    writers: int = P.setting(1, "writer processes (on the driver's node) that gather take views and write their "
                                f"files, {WRITE_THREADS} at once each", fingerprint=False)

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1 or self.stride < 1 or self.batch_size < 1 or self.writers < 1:
            raise ValueError("window, stride, batch size and writers must be positive")
        if not 0 < self.gpus_per_actor <= 8:
            raise ValueError(f"gpus per actor must be in (0, 8], got {self.gpus_per_actor}")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 0:
            raise ValueError(f"cpus per actor must not be negative, got {self.cpus_per_actor}")

    @functools.cached_property
    def spec(self) -> ModelSpec:
        """The model, resolved once: an unknown name or a missing weights file fails here."""
        return models.resolve(self.model, self.weights, kind=self.input, frames=self.frames, size=self.size,
                              sha256=self.weights_sha256)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the weights (or model file) the run uses, checked where this machine can read them."""
        return models.weights_digest(self.spec)

    def identity(self) -> dict:
        """What fixes the numbers in the output: the resolved model and its weights' digest,
        windows, precision, views, splits (not where the weights are, batch size or actor counts).
        The graph's pretrained encoder is fixed by the pretrain stage's fingerprint, an input."""
        if self.model == GRAPH_PRETRAINED:
            return super().identity()
        spec = {k: v for k, v in self.spec.to_json().items() if k not in ("weights", "sha256")}
        return {**super().identity(), "spec": spec, "weights_sha256": self.digest}


# ----------------------------------------------------------------------------- CPU stage

def shard_windows(item: dict, model: dict, window: int, stride: int, fps: float | None, views: str,
                  storage_options: dict | None = None) -> Iterator[dict]:
    """Rows of one shard: one per feature window (frames and where it sits), plus one row with
    ``error`` set for each take view (or the whole shard) whose data is bad. Any other error
    (the shard unreachable, a broken worker) propagates: Ray retries the task, and if it keeps
    failing the stage fails without committing. Plain Python."""
    spec = ModelSpec(**model)
    skip = set(item["skip"])
    blank = np.zeros((spec.frames, spec.size, spec.size, 3), np.uint8)
    base = {"split": item["split"], "shard": item["shard"]}

    def error_row(state, take_uid, member, e):
        detail = str(e) if isinstance(e, FeatureInputError) else f"{type(e).__name__}: {e}"
        return dict(base, name=state.name, take_uid=take_uid, cam_id=state.cam_id, stream_id=state.stream_id,
                    window=-1, num_windows=0, t0=0.0, t1=0.0, frames=blank,
                    error=f"take {take_uid} view {member}: {detail}")

    try:
        for take_uid, samples in read_shard(item["url"], storage_options):
            # All views of a take advance together, one sample at a time: memory holds one
            # sample and the frames that open windows still need, however long the take.
            views_of_take = None
            for sample in samples:
                meta = sample["json"]
                if views_of_take is None:
                    wins = feature_windows(spec, meta.take.num_frames, window, stride, fps)
                    needed = sorted({f for w in wins for f in w.picks})
                    views_of_take = {}
                    for member, info in sorted(meta.views.items()):
                        name = store.feature_name(take_uid, info)
                        if (views == "all" or info.is_ego) and name not in skip:
                            parsed = store.parse_name(name)
                            views_of_take[member] = _ViewState(name, parsed.cam_id, parsed.stream_id,
                                                               Assembler(wins, spec.size),
                                                               ViewReader(member, needed, spec.size))
                for member, state in views_of_take.items():
                    if state.failed:
                        continue
                    try:
                        yield from state.rows(take_uid, state.reader.frames(sample), base, len(wins))
                    except ContentError as e:   # one bad take view must not cost the others
                        state.failed = True
                        yield error_row(state, take_uid, member, e)
            for member, state in (views_of_take or {}).items():
                if not state.failed:
                    try:
                        yield from state.rows(take_uid, state.reader.finish(), base, len(wins))
                        state.assembler.finish()
                    except ContentError as e:
                        yield error_row(state, take_uid, member, e)
    except (ContentError, tarfile.TarError) as e:   # a shard that is not a readable tar: name it, keep going
        yield dict(base, name=f"shard:{item['shard']}", take_uid="", cam_id="", stream_id="", window=-1,
                   num_windows=0, t0=0.0, t1=0.0, frames=blank,
                   error=f"shard {item['url']}: {type(e).__name__}: {e}")


@dataclasses.dataclass
class _ViewState:
    name: str
    cam_id: str
    stream_id: str
    assembler: Assembler
    reader: ViewReader
    failed: bool = False

    def rows(self, take_uid: str, frames: list[tuple[int, np.ndarray]], base: dict, num_windows: int) -> Iterator[dict]:
        """A row per window that ``frames`` complete."""
        for index, image in frames:
            for win, clip in self.assembler.push(index, image):
                yield dict(base, name=self.name, take_uid=take_uid, cam_id=self.cam_id, stream_id=self.stream_id,
                           window=win.index, num_windows=num_windows, t0=win.t0, t1=win.t1, frames=clip, error="")


# ----------------------------------------------------------------------------- model stage

class Embedder:
    """The model stage: uint8 windows in, float32 vectors out. Ray Data runs one per actor;
    tests and benchmarks call it directly. Given ``writers`` (``store.TakeViewWriter`` actors),
    it hands each window's vector to its take view's writer and passes on only the error rows."""

    def __init__(self, model: dict, precision: str = "auto", device: str | None = None, threads: int | None = None,
                 writers: list | None = None):
        import torch

        self.torch = torch
        self.writers = writers
        if threads:
            torch.set_num_threads(threads)
        self.spec = ModelSpec(**model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "bf16" if self.cuda else "fp32"
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.model = models.build(self.spec).to(self.device)
        shape = (1, 3, 1, 1, 1) if self.spec.kind == "video" else (1, 3, 1, 1)
        self.mean = torch.tensor(self.spec.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(self.spec.std, device=self.device).view(shape) * 255
        self.dim = self.embed(np.zeros((1, self.spec.frames, self.spec.size, self.spec.size, 3), np.uint8)).shape[1]

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, T, S, S, 3] -> float32 [B, dim]. Frames cross to the GPU as uint8 (4x fewer
        bytes than float), from pinned memory, and are normalized there."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(frames))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 4, 1, 2, 3).float()             # [B, 3, T, S, S]
        if self.spec.kind == "image":
            x = x[:, :, 0]
        x = (x - self.mean) / self.std
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                                     enabled=self.autocast is not None):
            y = self.model(x)
        return y.float().flatten(1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        vectors = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            vectors[ok] = self.embed(batch["frames"][ok])
        out = {k: v for k, v in batch.items() if k != "frames"}
        out["vector"] = vectors
        if not self.writers:
            return out
        import ray

        # A stable hash (str's is salted per process): every actor sends a take view to the same writer.
        which = np.array([zlib.crc32(name.encode()) % len(self.writers) for name in out["name"]])
        # Waiting for the writers' receipts means a batch that returns has been handed over.
        ray.get([writer.add.remote({k: v[ok & (which == i)] for k, v in out.items()})
                 for i, writer in enumerate(self.writers) if (ok & (which == i)).any()])
        return {k: v[~ok] for k, v in out.items() if k != "vector"}


# ----------------------------------------------------------------------------- reference path

def features_from_release(release, take, view, config: FeatureConfig, embedder: Embedder) -> np.ndarray:
    """The same features computed the plain way: decode the release's video file in one pass,
    run the model in batches, in this process. The job's output must equal this."""
    with release.open_file(view.path) as f:
        info = video.probe(f, check_tail=False)
    wins = feature_windows(config.spec, info.frames, config.window, config.stride, config.fps)
    frames = release_frames(release, view, info, {f for w in wins for f in w.picks}, config.spec.size)
    clips, out = [], []
    for _, clip in assemble(wins, frames, config.spec.size):
        clips.append(clip)
        if len(clips) == config.batch_size:
            out.append(embedder.embed(np.stack(clips)))
            clips = []
    if clips:
        out.append(embedder.embed(np.stack(clips)))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- driver

def _shard_items(fs, shards: str, shards_url: str, stage: dict, splits, views: str, done: set[str]) -> tuple[list[dict], int]:
    """One work item per shard that still has take views to do; and how many shards are done."""
    import pyarrow.parquet as pq

    table = pq.read_table(fs.open(storage.join(shards, "manifest.parquet"), "rb"),
                          columns=["take_uid", "shard", "views"]).to_pylist()
    per_shard: dict[str, dict[str, int]] = {}
    for row in table:
        wanted = len(row["views"]) if views == "all" else int("ego" in row["views"])
        per_shard.setdefault(row["shard"], {})[row["take_uid"]] = wanted
    done_by_take = store.by_take(done)
    items, finished = [], 0
    for split, names in sorted(stage["shards"].items()):
        if splits and split not in splits:
            continue
        for shard in names:
            takes = per_shard.get(shard, {})
            if takes and all(len(done_by_take.get(uid, [])) >= k for uid, k in takes.items()):
                finished += 1
                continue
            skip = sorted(n for uid in takes for n in done_by_take.get(uid, []))
            items.append({"url": storage.join(shards_url, split, f"{shard}.tar"), "split": split, "shard": shard,
                          "skip": skip})
    return items, finished


def run(shards_url: str, out_url: str, config: FeatureConfig, storage_options: dict | None = None,
        address: str | None = None, progress: bool = True) -> dict:
    """Run the feature stage on its own (Ray, local by default); return its result."""
    record = stages.run_one("features", config, {"shard": shards_url}, out_url, storage_options=storage_options,
                            address=address, progress=progress)
    return record["result"]


def _run(config: FeatureConfig, inputs: dict, out_url: str, ctx: stages.Context) -> dict:
    import ray

    log, storage_options, shards_url = ctx.log, ctx.storage_options, inputs["shard"]
    if config.model == GRAPH_PRETRAINED:
        config = dataclasses.replace(config, model=f"pretrained:{inputs['pretrain']}")
    started = time.time()
    fs, shards = storage.filesystem(shards_url, storage_options)
    shard_stage = stages.finished(shards_url, "shard", storage_options)["result"]
    out_fs, out = storage.filesystem(out_url, storage_options)
    store.remove_temporaries(out_fs, out)   # of a killed run: never counted as done
    done = store.finished(out_fs, out)
    items, finished = _shard_items(fs, shards, shards_url, shard_stage, config.splits, config.views, done)
    log(f"features: {finished + len(items)} shards, {finished} already done, {len(items)} to read; "
        f"{len(done)} take views already written")
    rejects, written, windows, dim, writers_used = [], 0, 0, None, []
    if items:
        import ray.data
        data_context = ray.data.DataContext.get_current()
        data_context.enable_progress_bars = ctx.progress
        errors.retry_storage_faults(data_context)
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
        if use_gpu:
            # An autoscaling cluster may have no GPU node yet: the actors' requests bring them up.
            actors = config.actors or max(1, int(gpus / config.gpus_per_actor))
            resources = {"num_gpus": config.gpus_per_actor, "num_cpus": 1}
            threads = None
        else:
            # A reserved CPU is one no decode task gets, even while the actor waits for frames:
            # on 2 cores, one decode task instead of two (bench/features.py).
            cpus = config.cpus_per_actor
            if cpus is None:
                nodes = [n for n in ray.nodes() if n["Alive"]]
                cpus = 0.0 if len(nodes) == 1 and nodes[0]["Resources"].get("CPU", 0) > 0 else 1.0
            actors = config.actors or 1
            resources = {"num_cpus": cpus}
            threads = max(1, int(cpus))
        log(f"  model stage: {actors} {'GPU' if use_gpu else 'CPU'} actor(s), {resources}")
        # Writers hold take views in progress, so they live on the driver's node: losing a worker node
        # then costs only Ray Data's retries, as before. No CPU of their own: they mostly wait on storage.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        writer = ray.remote(num_cpus=0, scheduling_strategy=here)(store.TakeViewWriter)
        writers = [writer.remote(out_url, storage_options, WRITE_THREADS) for _ in range(config.writers)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(shard_windows, num_cpus=1, fn_kwargs={
            "model": config.spec.to_json(), "window": config.window, "stride": config.stride,
            "fps": config.fps, "views": config.views, "storage_options": storage_options})
        ds = ds.map_batches(Embedder, batch_size=config.batch_size, batch_format="numpy",
                            # GPU pools grow from one actor as demand (and the cluster's GPU nodes) allow.
                            compute=ray.data.ActorPoolStrategy(min_size=1 if use_gpu else actors, max_size=actors),
                            fn_constructor_kwargs={"model": config.spec.to_json(), "precision": config.precision,
                                                   "threads": threads, "writers": writers}, **resources)
        failed: set[str] = set()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):   # error rows only
                for j in range(len(batch["name"])):
                    name = str(batch["name"][j])
                    if name in failed:
                        continue
                    failed.add(name)
                    rejects.append({"name": name, "take_uid": str(batch["take_uid"][j]) or None,
                                    "split": str(batch["split"][j]), "shard": str(batch["shard"][j]),
                                    "reason": str(batch["error"][j])})
                    log(f"  rejected {name}: {batch['error'][j]}")
            reports = ray.get([w.finish.remote() for w in writers])
        finally:
            for w in writers:
                ray.kill(w)
        for report in reports:
            for n, d in report["written"].values():
                written, windows, dim = written + 1, windows + n, d
            writers_used.append({"node": report["node"], "pid": report["pid"], "take_views": len(report["written"])})
            for name, n in report["partial"].items():   # cannot happen unless a stage dropped rows; never hide it
                if name not in failed:
                    parsed = store.parse_name(name)
                    rejects.append({"name": name, "take_uid": parsed.take_uid, "split": None, "shard": None,
                                    "reason": f"only {n} windows arrived"})
    all_done = store.finished(out_fs, out)
    storage.write_json_atomic(out_fs, storage.join(out, "rejects.json"), rejects)
    return {
        "model": config.spec.to_json(), "weights_sha256": config.digest, "window": config.window,
        "stride": config.stride, "fps": config.fps, "fps_source": 30.0, "views": config.views,
        "precision": config.precision,
        "dim": dim if dim is not None else store.dim_of(out_fs, out, all_done),
        "take_views": len(all_done), "written_this_run": written, "windows_this_run": windows,
        "rejects": len(rejects), "wall_seconds": round(time.time() - started, 3),
        "writers": writers_used,   # where this run's files were written: node, process, take views
    }


def _rejects(record: dict) -> list[tuple[str, str]]:
    fs, path = storage.filesystem(record["output"])
    return [(r.get("take_uid") or r.get("name"), r.get("reason"))
            for r in storage.read_json(fs, storage.join(path, "rejects.json"))]


def _summary(record: dict) -> str:
    r = record["result"]
    return (f"{r['take_views']} take views of {r['dim']}-d features ({r['written_this_run']} written now), "
            f"{r['rejects']} rejected (see rejects.json) -> {record['output']}")


def _resources(config: FeatureConfig) -> str:
    cpus = ("0 CPUs reserved each on one node, 1 on more" if config.cpus_per_actor is None
            else f"{config.cpus_per_actor:g} CPU reserved each")
    return (f"Ray Data: decode tasks, 1 CPU each; model actors: {config.actors or 'one per GPU share'}, "
            f"{config.gpus_per_actor:g} GPU each (without GPUs: {config.actors or 1}, {cpus})")


KIND = stages.register(stages.StageKind(
    name="features", params=FeatureConfig, run=_run, inputs=("shard",), needs_ray=True, rejects=_rejects,
    check=lambda config: config.model == GRAPH_PRETRAINED or config.digest, resources=_resources,
    inputs_for=lambda config: ("pretrain",) if config.model == GRAPH_PRETRAINED else (),
    help="one feature tensor per take and view, in the official layout (GPU actor pools when present)",
    command=stages.Command("features", "compute features from shards (Ray Data; GPU actors when present)",
                           summary=_summary)))
