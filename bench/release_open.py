"""Opening and listing a 5,000-take release: the reader is lazy.

Builds a synthetic takes.json of N takes (copies of a miniature take with new uids and
names) beside a miniature release's annotations, then times ``Release.open`` + ``takes()``
+ every take's ``views()``, and counts the files read. Reference in the same run: a bare
``json.load`` of the same takes.json.

    python bench/release_open.py [--takes 5000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from engine.miniature import synth
from engine.release import Release


def build(root: Path, n: int) -> None:
    synth.generate(root, preset="tiny", takes=2, seconds=1.0, seed=0)
    template = json.loads((root / "takes.json").read_text())[0]
    takes = []
    for i in range(n):
        t = json.loads(json.dumps(template))
        t["take_uid"] = str(uuid.UUID(int=i + 1, version=4))
        t["take_name"] = f"synthetic_take_{i:05d}_1"
        t["root_dir"] = f"takes/{t['take_name']}"
        takes.append(t)
    (root / "takes.json").write_text(json.dumps(takes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--takes", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "release"
        build(root, args.takes)
        size_mb = (root / "takes.json").stat().st_size / 1e6
        times, refs = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with open(root / "takes.json") as f:
                json.load(f)
            refs.append(time.perf_counter() - start)

            opened = []
            start = time.perf_counter()
            release = Release.open(str(root))
            real_open = release.fs.open
            # fsspec shares one filesystem instance per protocol: count on it, then restore.
            release.fs.open = lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k)
            try:
                views = sum(len(t.views()) for t in release.takes())
            finally:
                del release.fs.open
            times.append(time.perf_counter() - start)
        print(f"{args.takes} takes ({size_mb:.1f} MB takes.json), {views} views listed, "
              f"files read: {sorted({Path(p).name for p in opened})}")
        print(f"open + list: median {statistics.median(times) * 1e3:.0f} ms; bare json.load "
              f"{statistics.median(refs) * 1e3:.0f} ms; ratio {statistics.median(times) / statistics.median(refs):.2f}x")
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
