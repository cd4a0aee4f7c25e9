"""Training throughput: the Ray Train loop against a plain single-process torch loop, same run.

Both train the same head on the same examples (keystep recognition on a feature stage, the
train set tiled --tile times so an epoch lasts long enough to time) with the same global batch,
optimizer and epochs. Samples/s is per epoch, timed inside the loop (Ray start-up and worker
launch excluded, reported apart as wall time); medians over epochs.

    python bench/train.py FEATURES [--task keystep_recognition] [--tile 100] [--epochs 5] [--workers 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray
import torch

from engine.features.store import FeatureStore
from engine.release import Release
from engine.tasks import TASKS, TrainConfig
from engine.tasks.base import Examples, example_scale
from engine.train.loop import fit, train_epoch


def plain_loop(task, train: Examples, classes: int, config: TrainConfig) -> list[float]:
    """The same epoch function as the Ray Train loop, in this process, without Ray Train."""
    torch.manual_seed(config.seed)
    model = task.head(example_scale(train), classes, config.hidden, config.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    rates = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        seen, _ = train_epoch(model, optimizer, task.loss(), x, y, config.batch_size, seed=epoch)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("features")
    parser.add_argument("--task", default="keystep_recognition")
    parser.add_argument("--tile", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    args = parser.parse_args()

    task = TASKS[args.task]()
    features = FeatureStore(args.features)
    release = Release.open(features.release_url())
    base = task.examples(release, features, "train", train=True)
    train = Examples(np.tile(base.x, (args.tile, 1)), np.tile(base.y, args.tile), base.meta * args.tile)
    val = task.examples(release, features, "val", train=False)
    classes = task.outputs(release)
    config = TrainConfig(epochs=args.epochs, patience=args.epochs, workers=args.workers, batch_size=args.batch_size,
                         cpus_per_worker=args.cpus_per_worker)

    # Same conditions for the plain loop: Ray's processes already up, the threads one Train
    # worker gets.
    ray.init(log_to_driver=False, configure_logging=False)
    torch.set_num_threads(args.cpus_per_worker)
    plain = plain_loop(task, train, classes, config)
    started = time.perf_counter()
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        state = fit(task, train, val, task.truth(release, "val"), classes, out, config)
    wall = time.perf_counter() - started
    ray_rates = [row["samples_per_s"] for row in state["history"]]
    # Epoch 0 pays the dataset's first read in both loops' terms differently: report medians.
    print(f"{args.task}: {len(train)} train examples ({args.tile}x tiled), {features.dim}-d, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.workers} Ray Train worker(s) of {args.cpus_per_worker} CPU(s)")
    print(f"  plain torch loop  {statistics.median(plain):10.0f} samples/s (median over epochs)")
    print(f"  Ray Train loop    {statistics.median(ray_rates):10.0f} samples/s (median over epochs; "
          f"fit() wall {wall:.1f} s incl. start-up)")
    print(f"  Ray Train / plain: {statistics.median(ray_rates) / statistics.median(plain):.2f}x")


if __name__ == "__main__":
    main()
