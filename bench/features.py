"""Feature job throughput against a naive loop on the same data, in the same command.

- pipeline: ``engine.features.job.run`` on a local Ray (decode tasks + model actor pool), from
  remux shards, windows per second of wall time (Ray already started);
- naive: one process, one take view after another: PyAV decodes the release's 448 file, the
  same model embeds the same windows in the same batch size (``job.features_from_release``);
- decode only: the pipeline's CPU stage (``job.shard_windows``) over every shard, no model;
- release decode: the same windows decoded straight from the release's files, no model;
- model only: the model stage (``job.Embedder``) on random uint8 windows of the same shape.

Each is run --repeats times; medians are printed with the pipeline/naive ratio.

    python bench/features.py [--release PATH] [--model tiny_video] [--repeats 3] [--out URL]
                             [--cpus-per-actor N] [--shard-window 16]

Without --release it generates the default preset (10 takes x 4 s, 5 views) in a temp dir. The
pipeline writes under --out (default: the temp dir); an s3:// URL (AWS_* settings from the
environment) puts object-store PUTs into its time, as on a real cluster.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from engine import storage, video
from engine.features import job
from engine.features.windows import assemble, feature_windows, release_frames
from engine.miniature import synth
from engine.release import Release
from engine.shards import job as shard_job
from engine.shards.plan import ShardConfig


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", type=Path)
    parser.add_argument("--model", default="tiny_video")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus-per-actor", type=float, default=job.FeatureConfig.cpus_per_actor,
                        help="CPUs the CPU model actor reserves (default: the stage's)")
    parser.add_argument("--shard-window", type=float, default=ShardConfig.window,
                        help="the shards' window in seconds: windows after a take's first start past a keyframe, "
                             "so their clips carry a pre-roll")
    parser.add_argument("--out", help="where the pipeline writes its features (a folder or s3://bucket/prefix)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    release_root = args.release
    if release_root is None:
        release_root = work / "release"
        synth.generate(release_root, preset="default", seed=0)
    ray.init(log_to_driver=False, configure_logging=False)
    shards = work / "shards"
    # 2 MB shards: several decode tasks, as a real release's hundreds of shards give.
    shard_job.run(str(release_root), str(shards), ShardConfig(shard_mb=2, window=args.shard_window), progress=False)
    config = job.FeatureConfig(model=args.model, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor)
    spec = config.spec
    release = Release.open(str(release_root))
    views = [(take, view) for take in release.takes() for view in take.views("448")]

    def pipeline() -> int:
        out = storage.join(args.out or str(work), f"out-{time.monotonic_ns()}")
        stage = job.run(str(shards), out, config, progress=False)
        fs, path = storage.filesystem(out)
        fs.rm(path, recursive=True)
        return stage["windows_this_run"]

    def naive() -> int:
        embedder = job.Embedder(spec.to_json())
        return sum(len(job.features_from_release(release, take, view, config, embedder)) for take, view in views)

    def decode_only() -> int:
        items, _ = job._shard_items(*_stage(shards), config.splits, config.views, set())
        return sum(1 for item in items for row in job.shard_windows(item, spec.to_json(), config.window,
                                                                     config.stride, config.fps, config.views)
                   if not row["error"])

    def release_decode_only() -> int:
        # The same windows decoded straight from the release's files, one pass per file, no model.
        count = 0
        for _, view in views:
            with release.open_file(view.path) as f:
                info = video.probe(f, check_tail=False)
            wins = feature_windows(spec, info.frames, config.window, config.stride, config.fps)
            frames = release_frames(release, view, info, {f for w in wins for f in w.picks}, spec.size)
            count += sum(1 for _ in assemble(wins, frames, spec.size))
        return count

    def model_only() -> int:
        embedder = job.Embedder(spec.to_json())
        batch = np.random.default_rng(0).integers(0, 255, (args.batch_size, spec.frames, spec.size, spec.size, 3),
                                                  dtype=np.uint8)
        rounds = 40
        for _ in range(rounds):
            embedder.embed(batch)
        return rounds * args.batch_size

    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in (("pipeline", pipeline), ("naive", naive), ("decode only", decode_only),
                         ("release decode", release_decode_only), ("model only", model_only)):
            seconds, n = timed(fn)
            results.setdefault(name, []).append(n / seconds)
            print(f"  {name}: {n} windows in {seconds:.2f} s", flush=True)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"\n{args.model}, batch {args.batch_size}, {len(views)} take views, {cpus} CPUs, "
          f"median of {args.repeats}:")
    for name, rates in results.items():
        print(f"  {name:14s} {statistics.median(rates):8.1f} windows/s")
    ratio = statistics.median(results["pipeline"]) / statistics.median(results["naive"])
    print(f"  pipeline / naive: {ratio:.2f}x")
    decode = statistics.median(results["decode only"]) / statistics.median(results["release decode"])
    print(f"  decoding from shards / from the release: {decode:.2f}x")
    ray.shutdown()
    shutil.rmtree(work)


def _stage(shards: Path):
    from engine import stage, storage
    fs, path = storage.filesystem(str(shards))
    return fs, path, str(shards), stage.finished(str(shards), "shard")["result"]


if __name__ == "__main__":
    main()
