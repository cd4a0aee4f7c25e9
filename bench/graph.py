"""The graph against the same stages run one command at a time, on the same release.

Reference: `ee4d validate`, `ee4d shard`, `ee4d features` and `ee4d train` for each benchmark,
each a separate process (each starts its own local Ray), as a user would chain them by hand.
Graph: `ee4d run` of jobs/demo.yaml with the same parameters on the same release, into a
fresh folder; then the same command again, where every stage is reused. Wall times, medians
over --repeat rounds, and the ratios.

    python bench/graph.py [--release DIR] [--repeat 3] [--epochs 4]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = tuple(yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())["tasks"])   # the demo's benchmarks


def ee4d(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def by_hand(release: Path, out: Path, epochs: int) -> float:
    seconds = ee4d("validate", str(release), "--resolution", "448", "--json", str(out / "validate.json"))
    seconds += ee4d("shard", str(release), str(out / "shards"), "--shard-mb", "5")
    seconds += ee4d("features", str(out / "shards"), str(out / "features"), "--model", "tiny_video")
    for task in TASKS:
        seconds += ee4d("train", task, str(out / "features"), str(out / task), "--epochs", str(epochs))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", help="a release (default: the tiny preset, 10 takes of 4 s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        release = Path(args.release) if args.release else Path(tmp) / "release"
        if not args.release:
            ee4d("synth", str(release), "--preset", "tiny", "--takes", "10", "--seconds", "4")
        sets = [f"release.url={release}", "release.synth=null", "report=false"] + [
            f"tasks.{t}.epochs={args.epochs}" for t in TASKS]
        flags = [a for s in sets for a in ("--set", s)]
        hand, graph, rerun = [], [], []
        for i in range(args.repeat):
            hand.append(by_hand(release, Path(tmp) / f"hand{i}", args.epochs))
            graph.append(ee4d("run", "jobs/demo.yaml", "--out", str(Path(tmp) / f"graph{i}"), *flags))
            rerun.append(ee4d("run", "jobs/demo.yaml", "--out", str(Path(tmp) / f"graph{i}"), *flags))
            print(f"round {i}: by hand {hand[-1]:.1f} s, graph {graph[-1]:.1f} s, rerun {rerun[-1]:.1f} s")
    h, g, r = statistics.median(hand), statistics.median(graph), statistics.median(rerun)
    print(f"median wall: stage commands by hand {h:.1f} s, graph {g:.1f} s ({g / h:.2f}x), "
          f"rerun with every stage reused {r:.1f} s ({r / h:.3f}x)")


if __name__ == "__main__":
    main()
