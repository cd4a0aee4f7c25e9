"""The feature job's model stage on one accelerator, without Ray: is the GPU kept busy?

Runs the job's own CPU stage (``shard_windows``, in --decoders processes) feeding the job's own
model stage (``Embedder``) in this process, and prints its windows/s against the model's pure
throughput on random input of the same shape (goal: at least 0.8x), with the GPU memory held.

    python bench/features_gpu.py SHARDS [--model tiny_video] [--size 224] [--frames 32]
                                 [--batch-size 32] [--decoders 8] [--device cuda]

SHARDS is a finished shard stage (``ee4d shard``). Needs torch, PyAV, fsspec, webdataset and
numpy; not Ray or pyarrow, so it runs on a GPU machine that only has torch.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

from engine.features import models
from engine.features.job import Embedder, shard_windows


def decode_worker(items, model, queue) -> None:
    for item in items:
        for row in shard_windows(item, model, 32, 16, None, "all"):
            if not row["error"]:
                queue.put(row["frames"])
    queue.put(None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("--model", default="tiny_video")
    parser.add_argument("--size", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decoders", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    spec = models.resolve(args.model, frames=args.frames, size=args.size)
    embedder = Embedder(spec.to_json(), precision=args.precision, device=args.device)
    tars = sorted(glob.glob(os.path.join(args.shards, "*", "*.tar")))
    items = [{"url": t, "split": os.path.basename(os.path.dirname(t)), "shard": os.path.basename(t)[:-4],
              "skip": []} for t in tars]
    shape = (args.batch_size, spec.frames, spec.size, spec.size, 3)
    pure_rates, fed_rates = [], []
    for _ in range(args.repeats):
        batch = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        embedder.embed(batch)                     # warm-up: kernels, allocator
        _sync(embedder)
        start, rounds = time.perf_counter(), 20
        for _ in range(rounds):
            embedder.embed(batch)
        _sync(embedder)
        pure_rates.append(rounds * args.batch_size / (time.perf_counter() - start))

        queue = mp.get_context("spawn").Queue(maxsize=8 * args.batch_size)
        workers = [mp.get_context("spawn").Process(target=decode_worker, args=(items[i::args.decoders],
                                                                               spec.to_json(), queue))
                   for i in range(min(args.decoders, len(items)))]
        for w in workers:
            w.start()
        pending, windows, clips, start = len(workers), 0, [], None
        while pending:
            frames = queue.get()
            if frames is None:
                pending -= 1
                continue
            start = start or time.perf_counter()   # from the first window: process start-up is not the stage's
            clips.append(frames)
            if len(clips) == args.batch_size:
                embedder.embed(np.stack(clips))
                windows, clips = windows + len(clips), []
        if clips:
            embedder.embed(np.stack(clips))
            windows += len(clips)
        _sync(embedder)
        fed_rates.append(windows / (time.perf_counter() - start))
        for w in workers:
            w.join()
    memory = None
    if embedder.cuda:
        import torch
        memory = torch.cuda.max_memory_allocated() / 2**30
    result = {"device": str(embedder.device), "model": spec.to_json(), "batch_size": args.batch_size,
              "decoders": args.decoders, "windows": windows,
              "pure_windows_per_s": round(statistics.median(pure_rates), 1),
              "fed_windows_per_s": round(statistics.median(fed_rates), 1),
              "fed_over_pure": round(statistics.median(fed_rates) / statistics.median(pure_rates), 3),
              "gpu_max_allocated_gib": memory}
    print(json.dumps(result, indent=1))


def _sync(embedder) -> None:
    if embedder.cuda:
        embedder.torch.cuda.synchronize()


if __name__ == "__main__":
    main()
