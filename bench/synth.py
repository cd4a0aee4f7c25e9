"""Miniature release generation speed: view-seconds of video written per wall second.

Reference, in the same run: encoding the same number of frames of the same sizes with the
same libx264 settings from frames already in memory (no rendering, no annotations), with
the generator's parallelism. The ratio says how close generation runs to the bare encode.

    python bench/synth.py [--takes 4] [--seconds 4] [--preset default] [--repeats 3]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time

import numpy as np

from engine.miniature import synth
from engine.video import VideoWriter


def encode_only(preset: synth.Preset, frames: int) -> float:
    sizes = [(preset.ego_size, preset.ego_size)] + [preset.exo_size] * 4
    sizes += [synth.downscaled_size(*s) for s in sizes if min(s) != synth.DOWNSCALED]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, (w, h) in enumerate(sizes):
            base = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
            with VideoWriter(f"{tmp}/{k}.mp4", w, h) as writer:
                for i in range(frames):
                    img = base.copy()
                    img[(i * 4) % (h - 40):(i * 4) % (h - 40) + 40, 50:150] = 255   # some motion
                    writer.write(img)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--takes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    preset = synth.PRESETS[args.preset]
    view_seconds = args.takes * args.seconds * 5
    rates, ratios = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            synth.generate(f"{tmp}/release", preset=args.preset, takes=args.takes, seconds=args.seconds, seed=r)
            gen = time.perf_counter() - start
        # Same parallelism as the generator: one process per take, two at a time.
        start = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(min(2, args.takes)) as pool:
            list(pool.map(encode_only, [preset] * args.takes, [int(args.seconds * synth.FPS)] * args.takes))
        ref = time.perf_counter() - start
        rates.append(view_seconds / gen)
        ratios.append(ref / gen)
        print(f"run {r}: {gen:.1f} s for {view_seconds:.0f} view-seconds -> {view_seconds / gen:.2f} view-s/s; "
              f"encode-only reference {ref:.1f} s")
    print(f"median: {statistics.median(rates):.2f} view-seconds per second "
          f"({args.preset} preset, full + 448 copies); "
          f"speed vs encode-only reference: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
