"""Shard job throughput, bytes and memory, each against a reference in the same command.

- remux throughput, view-hours per wall-hour: steady state (Ray already up, as on a cluster;
  median of --repeats runs; also for the same takes without the per-frame annotation files,
  near the real release's proportions), end to end against that running Ray (``ee4d shard
  --address`` in a fresh process, as a job submitted to a cluster: process start, connection,
  planning, Ray Data's start-up and the commit included) and end to end with a local Ray
  started and stopped by the command, against ``tar -cf`` of the same source bytes (the I/O limit);
- bytes of the output by kind against what they come from: clips against the sources' video
  packets (the remux pre-roll), audio against the ego sources' AAC packets, everything else
  (JSON, sensor and annotation arrays) against the release's annotation and sensor files;
- clip bytes against source video bytes for several window lengths (the pre-roll trade-off);
- peak RSS of the whole job (driver, Ray and its workers) with 1x and 4x the takes;
- with --transcode, transcode mode against PyAV transcoding the same whole files;
- from these, a projection for the real release (time and shard size).

    python bench/shard.py [--release PATH] [--takes 12] [--seconds 40] [--repeats 3] [--transcode]

Without --release it generates a release from the large preset (--takes of --seconds each).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
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
REAL_ANNOTATIONS_GB = 10.5   # its annotations


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


def run_job(release: Path, out: Path, mode: str, address: str | None = None) -> tuple[float, int]:
    """Run ``ee4d shard`` in a subprocess, on a Ray of its own unless ``address`` names one; return (wall
    seconds, peak RSS of its process tree: with an address, the driver's alone)."""
    # Small shards so both workers stay busy on a small input (real runs have hundreds of shards).
    cmd = [sys.executable, "-m", "engine", "shard", str(release), str(out), "--mode", mode, "--shard-mb", "10"]
    cmd += ["--address", address] if address else []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"shard job failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start, peak


def subset(release: Path, dest: Path, fraction: float, dense: bool = True) -> Path:
    """A release with the first ``fraction`` of takes: symlinks plus filtered takes.json and splits.
    Without ``dense``, the per-frame annotation files (ego_pose, relations) are left out."""
    dest.mkdir()
    for item in release.iterdir():
        if item.name not in ("takes.json", "annotations"):
            (dest / item.name).symlink_to(item)
    (dest / "annotations").mkdir()
    for item in (release / "annotations").iterdir():
        if item.name != "splits.json" and (dense or not (item.name == "ego_pose" or item.name.startswith("relations"))):
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


def packet_bytes(path: str, kind: str) -> int:
    """Bytes of a file's video or audio packets (0 when it has no such stream)."""
    import av
    with av.open(path) as container:
        streams = container.streams.video if kind == "video" else container.streams.audio
        return sum(p.size for p in container.demux(streams[0]) if p.size) if streams else 0


def output_bytes(out: Path) -> dict[str, int]:
    """Bytes of the shards' members by kind: video clips, audio, and the rest (JSON, arrays)."""
    import tarfile
    sizes = {"video": 0, "audio": 0, "other": 0}
    for tar in out.rglob("*.tar"):
        with tarfile.open(tar) as archive:
            for member in archive:
                kind = "video" if member.name.endswith(".mp4") else "audio" if member.name.endswith(".m4a") else "other"
                sizes[kind] += member.size
    return sizes


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release", help="an existing release to shard")
    ap.add_argument("--takes", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transcode", action="store_true", help="also measure transcode mode")
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
        takes = rel.takes()
        sources = [str(release / v.path) for t in takes for v in t.views("448")]
        egos = [str(release / v.path) for t in takes for v in t.views("448") if v.is_ego]
        src_bytes = sum(os.path.getsize(p) for p in sources)
        view_hours = sum(video.probe(p, check_tail=False).duration for p in sources) / 3600
        print(f"input: {len(takes)} takes, {len(sources)} views at 448, {view_hours:.2f} view-hours, {src_bytes / 1e6:.0f} MB")

        tar_runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(["tar", "-cf", str(work / "ref.tar"), "-C", str(release),
                            *(os.path.relpath(p, release) for p in sources)], check=True)
            tar_runs.append(time.perf_counter() - start)
        tar_s = median(tar_runs)

        # Steady state: Ray up once, the stage run again and again into fresh folders.
        import ray

        from engine.shards import job
        from engine.shards.plan import ShardConfig
        address = ray.init(num_cpus=os.cpu_count(), log_to_driver=False, configure_logging=False).address_info["address"]
        # The miniature's annotations are 2.3x its 448 video, the real release's 2.4%: the same
        # takes without the per-frame annotation files (ego_pose, relations) come close to the
        # real proportions. Run alternately, each into fresh folders.
        light = subset(release, work / "light", 1.0, dense=False)
        steady, steady_light = [], []
        for k in range(args.repeats):
            for source, times, name in ((release, steady, "steady"), (light, steady_light, "light")):
                start = time.perf_counter()
                job.run(str(source), str(work / f"{name}{k}"), ShardConfig(shard_mb=10), progress=False)
                times.append(time.perf_counter() - start)
        # The whole command against this running Ray, as a job on a cluster runs.
        submitted, submitted_light = [], []
        for k in range(args.repeats):
            for source, times, name in ((release, submitted, "job"), (light, submitted_light, "job-light")):
                times.append(run_job(source, work / f"{name}{k}", "remux", address)[0])
        ray.shutdown()
        steady_s, light_s = median(steady), median(steady_light)
        print(f"remux, Ray up:  {steady_s:6.1f} s (median of {args.repeats}), {view_hours / (steady_s / 3600):7.0f} "
              f"view-hours per wall-hour; {tar_s / steady_s:.3f}x the speed of tar -cf of the same bytes ({tar_s:.2f} s)")
        print(f"remux, Ray up, without the ego_pose and relations files (near the real release's proportions): "
              f"{light_s:6.1f} s, {view_hours / (light_s / 3600):7.0f} view-hours per wall-hour")
        for label, times in (("", submitted), (", without the ego_pose and relations files", submitted_light)):
            print(f"remux, ee4d shard --address (Ray up, everything else included){label}: {median(times):6.1f} s, "
                  f"{view_hours / (median(times) / 3600):7.0f} view-hours per wall-hour")

        ends, rss_4x = [], 0
        for k in range(args.repeats):
            wall, rss = run_job(release, work / f"e2e{k}", "remux")
            ends.append(wall)
            rss_4x = max(rss_4x, rss)
        end_s = median(ends)
        print(f"remux, ee4d shard end to end: {end_s:6.1f} s (median), {view_hours / (end_s / 3600):7.0f} view-hours per "
              f"wall-hour, a local Ray started and stopped by the command")

        sizes = output_bytes(work / "steady0")
        video_src = sum(packet_bytes(p, "video") for p in sources)
        audio_src = sum(packet_bytes(p, "audio") for p in egos)
        ann_src = sum(f.stat().st_size for f in (release / "annotations").rglob("*") if f.is_file())
        sensor_src = sum(f.stat().st_size for t in takes for folder in ("trajectory", "eye_gaze")
                         for f in (release / t.root_dir / folder).glob("*.csv"))
        print(f"bytes: clips {sizes['video'] / 1e6:.1f} MB = {sizes['video'] / video_src:.2f}x the sources' video packets; "
              f"audio {sizes['audio'] / 1e6:.2f} MB = {sizes['audio'] / max(1, audio_src):.2f}x the ego AAC packets; "
              f"JSON and arrays {sizes['other'] / 1e6:.2f} MB = {sizes['other'] / (ann_src + sensor_src):.2f}x the "
              f"release's annotation and sensor files ({(ann_src + sensor_src) / 1e6:.1f} MB); "
              f"all {sum(sizes.values()) / src_bytes:.2f}x the 448 sources")

        # Pre-roll by window length. A short take's windows start at few points of the GOP (8 s
        # windows and 250-frame GOPs: 10 frames before the next keyframe, then 20, ...), so windows
        # start at every second here, full ones only: their starts fall evenly over the GOP, as the
        # windows of long takes do. Clip bytes against the same frames' share of the source's bytes.
        print("pre-roll: clip bytes / the window's share of the source video bytes (remux, windows at every phase):")
        preroll = {}
        for seconds in (4, 8, 16, 32):
            clip_bytes, window_bytes = 0, 0.0
            for path in sources:
                n = video.probe(path, check_tail=False).frames
                length = seconds * 30
                windows = [(s, s + length) for s in range(0, n - length + 1, 30)]
                clip_bytes += sum(len(clip.data) for clip, _ in video.cut_windows(path, windows))
                window_bytes += packet_bytes(path, "video") * length / n * len(windows)
            preroll[seconds] = clip_bytes / window_bytes
            print(f"  {seconds:2d} s windows: {preroll[seconds]:.2f}x")
        # Throughput of cutting alone: back-to-back 8 s windows, one forward pass per view.
        start = time.perf_counter()
        for path in sources:
            n = video.probe(path, check_tail=False).frames
            for _ in video.cut_windows(path, [(s, min(s + 240, n)) for s in range(0, n, 240)]):
                pass
        cut_s = time.perf_counter() - start

        # The job's two parts on one core: cutting clips, and reading a take's annotations (JSON
        # parsed, dense ones turned into arrays). The miniature's annotations are 2.3x its 448
        # video; the real release's 2.4% (10.5 of 438.6 GB): the projection weighs each by its bytes.
        from engine.shards.sample import TakeSource
        splits = rel.splits().take_uid_to_split
        start = time.perf_counter()
        for take in takes:
            TakeSource.load(rel, take, splits[take.take_uid], ShardConfig())
        annotation_s = time.perf_counter() - start
        remux_rate = view_hours / (cut_s / 3600)
        annotation_rate = ann_src / 1e9 / (annotation_s / 3600)
        print(f"one core: cutting 8 s clips {remux_rate:.0f} view-hours per hour; reading annotations "
              f"{annotation_rate:.1f} GB of annotation files per hour ({annotation_s:.1f} s for {ann_src / 1e6:.0f} MB)")

        if args.transcode:
            start = time.perf_counter()
            with concurrent.futures.ProcessPoolExecutor(2) as pool:
                list(pool.map(pyav_transcode, sources, [str(work / f"ref{k}.mp4") for k in range(len(sources))]))
            pyav_s = time.perf_counter() - start
            wall, _ = run_job(release, work / "shards-transcode", "transcode")
            print(f"transcode: {wall:.1f} s, {pyav_s / wall:.2f}x the speed of PyAV transcoding the same files "
                  f"({pyav_s:.1f} s)")

        quarter = subset(release, work / "quarter", 0.25)
        _, rss_1x = run_job(quarter, work / "shards-1x", "remux")
        print(f"peak RSS, remux: 1x takes {rss_1x / 1e9:.2f} GB, 4x takes {rss_4x / 1e9:.2f} GB (ratio {rss_4x / rss_1x:.2f})")

        core_hours = REAL_VIEW_HOURS / remux_rate + REAL_ANNOTATIONS_GB / annotation_rate
        other = sizes["other"] / (ann_src + sensor_src)
        size = REAL_448_GB * preroll[8] + REAL_ANNOTATIONS_GB * other
        print(f"projection, real release at 448 ({REAL_448_GB} GB, {REAL_VIEW_HOURS:.0f} view-hours, "
              f"{REAL_ANNOTATIONS_GB} GB of annotations): {core_hours:.1f} core-hours of remux and annotation work "
              f"({REAL_VIEW_HOURS / core_hours:.0f} view-hours per core-hour), about {max(1, round(core_hours / 16))} "
              f"nodes of 16 cores for an hour; shards {size:.0f} GB with 8 s windows "
              f"({size / (REAL_448_GB + REAL_ANNOTATIONS_GB):.2f}x the source), "
              f"{REAL_448_GB * preroll[16] + REAL_ANNOTATIONS_GB * other:.0f} GB with 16 s windows "
              f"({(REAL_448_GB * preroll[16] + REAL_ANNOTATIONS_GB * other) / (REAL_448_GB + REAL_ANNOTATIONS_GB):.2f}x), "
              f"if its GOP is like these sources' (250 frames)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
