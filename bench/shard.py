"""Shard job throughput and memory, each against a reference run in the same command.

- remux: view-hours per wall-hour and MB/s, against ``tar -cf`` of the same source mp4
  bytes (the I/O limit);
- transcode: the same, against PyAV transcoding the same whole files with the same settings
  (libx264 veryfast, CRF 23, GOP 30), two processes like the job's two workers;
- peak RSS of the whole job (driver, Ray and its workers) with 1x and 4x the takes;
- from these, the projected time to shard the real release.

    python bench/shard.py [--release PATH] [--takes 8] [--seconds 60]

Without --release it generates a release from the large preset (--takes of --seconds each).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine import video
from engine.miniature import synth
from engine.release import Release

REAL_VIEW_HOURS = 1286.0     # frame-aligned video in the real release
REAL_448_GB = 438.6          # its downscaled/448 part


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(stat[1]), []).append(int(entry))
            rss[int(entry)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def run_job(release: Path, out: Path, mode: str) -> tuple[float, int]:
    """Run ``ee4d shard`` in a subprocess; return (wall seconds, peak RSS of its process tree)."""
    # Small shards so both workers stay busy on a small input (real runs have hundreds of shards).
    cmd = [sys.executable, "-m", "engine", "shard", str(release), str(out), "--mode", mode, "--shard-mb", "10"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"shard job failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start, peak


def subset(release: Path, dest: Path, fraction: float) -> Path:
    """A release with the first ``fraction`` of takes: symlinks plus filtered takes.json and splits."""
    dest.mkdir()
    for item in release.iterdir():
        if item.name not in ("takes.json", "annotations"):
            (dest / item.name).symlink_to(item)
    (dest / "annotations").mkdir()
    for item in (release / "annotations").iterdir():
        if item.name != "splits.json":
            (dest / "annotations" / item.name).symlink_to(item)
    takes = json.loads((release / "takes.json").read_text())
    keep = takes[: max(1, int(len(takes) * fraction))]
    uids = {t["take_uid"] for t in keep}
    (dest / "takes.json").write_text(json.dumps(keep))
    splits = json.loads((release / "annotations" / "splits.json").read_text())
    splits["split_to_take_uids"] = {s: [u for u in v if u in uids] for s, v in splits["split_to_take_uids"].items()}
    splits["take_uid_to_split"] = {u: s for u, s in splits["take_uid_to_split"].items() if u in uids}
    (dest / "annotations" / "splits.json").write_text(json.dumps(splits))
    return dest


def pyav_transcode(path: str, out: str) -> None:
    """Decode a whole file and re-encode it with the settings of the job's transcode mode."""
    import av
    writer = None
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if writer is None:
                writer = video.VideoWriter(out, frame.width, frame.height, fps=30, crf=23, gop=30, preset="veryfast")
            writer.write(frame)
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", help="an existing release to shard")
    ap.add_argument("--takes", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ee4d-bench-"))
    try:
        if args.release:
            release = Path(args.release)
        else:
            release = work / "release"
            start = time.perf_counter()
            synth.generate(release, preset="large", takes=args.takes, seconds=args.seconds)
            print(f"generated {args.takes} x {args.seconds:.0f} s takes in {time.perf_counter() - start:.0f} s")
        rel = Release.open(str(release))
        sources = [str(release / v.path) for t in rel.takes() for v in t.views("448")]
        src_bytes = sum(os.path.getsize(p) for p in sources)
        view_seconds = sum(video.probe(p, check_tail=False).duration for p in sources)
        print(f"input: {len(rel.takes())} takes, {len(sources)} views at 448, "
              f"{view_seconds / 3600:.2f} view-hours, {src_bytes / 1e6:.0f} MB")

        start = time.perf_counter()
        subprocess.run(["tar", "-cf", str(work / "ref.tar"), "-C", str(release),
                        *(os.path.relpath(p, release) for p in sources)], check=True)
        tar_s = time.perf_counter() - start
        start = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            list(pool.map(pyav_transcode, sources, [str(work / f"ref{k}.mp4") for k in range(len(sources))]))
        pyav_s = time.perf_counter() - start

        results = {}
        for mode in ("remux", "transcode"):
            wall, rss = run_job(release, work / f"shards-{mode}", mode)
            out_bytes = sum(p.stat().st_size for p in (work / f"shards-{mode}").rglob("*.tar"))
            results[mode] = (wall, rss)
            rate = view_seconds / wall
            print(f"{mode:9s}: {wall:6.1f} s, {rate:7.1f} view-hours per wall-hour, "
                  f"{src_bytes / wall / 1e6:6.1f} MB/s in, {out_bytes / 1e6:.0f} MB out, peak RSS {rss / 1e9:.2f} GB")
        print(f"remux vs tar -cf of the same bytes ({tar_s:.2f} s): {tar_s / results['remux'][0]:.4f}x tar's speed "
              f"(the job is bound by per-sample work and Ray start-up, not by I/O)")
        print(f"transcode vs PyAV transcode of the same files, same settings ({pyav_s:.1f} s): "
              f"{pyav_s / results['transcode'][0]:.2f}x its speed")

        quarter = subset(release, work / "quarter", 0.25)
        wall_1x, rss_1x = run_job(quarter, work / "shards-1x", "remux")
        print(f"peak RSS, remux: 1x takes {rss_1x / 1e9:.2f} GB, 4x takes {results['remux'][1] / 1e9:.2f} GB "
              f"(ratio {results['remux'][1] / rss_1x:.2f})")

        by_bytes = REAL_448_GB * 1e9 / (src_bytes / results["remux"][0]) / 3600
        by_hours = REAL_VIEW_HOURS / (view_seconds / 3600 / results["remux"][0] * 3600)
        worst = max(by_bytes, by_hours)
        print(f"projection, remux of the real release's 448 copies ({REAL_448_GB} GB, {REAL_VIEW_HOURS:.0f} "
              f"view-hours): {by_hours:.1f} h by view-hours, {by_bytes:.1f} h by bytes on this 2-core machine; "
              f"with throughput linear in cores, {max(1, round(worst * 2 / 16))} nodes of 16 cores "
              f"finish in about an hour")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
