"""The shard job: alignment in every mode, readers, faults, crash and resume, S3, two nodes."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
import webdataset as wds
import wids

from engine import video
from engine.errors import ContentError
from engine.miniature.stamp import read_stamp
from engine.release import Release
from engine.shards import clip_dataset, decode_sample, dense, job, ray_dataset
from engine.shards.dataset import decode_view
from engine.shards.plan import ShardConfig, ShardSpec, window_frames

FPS = 30


def _samples(paths):
    return list(wds.WebDataset(sorted(paths), shardshuffle=False, empty_check=False))


def _write(release_root: Path, out: Path, config: ShardConfig, takes: int = 2) -> list[dict]:
    """Write one shard of the first takes of the train split, without Ray."""
    uids = Release.open(str(release_root)).splits().split_to_take_uids["train"][:takes]
    job.write_shard(ShardSpec("train", 0, tuple(uids)), str(release_root), str(out), config)
    return _samples([str(out / "train" / "train-000000.tar")])


def _ffprobe_frames(data: bytes, tmp_path: Path) -> int:
    """Frames FFmpeg's own command-line tool decodes from a clip (another FFmpeg build than PyAV's)."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("resolution", ["full", "448"])
@pytest.mark.parametrize("mode", ["remux", "transcode", "frames"])
def test_every_clip_decodes_to_exactly_its_window(default_release, tmp_path, mode, resolution):
    assert shutil.which("ffprobe"), "ffprobe (Debian's ffmpeg) is needed: ./dev test installs it"
    config = ShardConfig(mode=mode, resolution=resolution, window=1.5, stride=1.0)
    samples = _write(default_release, tmp_path, config, takes=1)
    assert len(samples) == 4   # a 4 s take: windows [0,1.5) [1,2.5) [2,3.5) [3,4), the last one short
    rng = np.random.default_rng(0)
    for sample in samples:
        meta = json.loads(sample["json"])
        f0, f1 = meta["window"]["start_frame"], meta["window"]["end_frame"]
        for name, info in meta["views"].items():
            # Any reader: every frame of the member, in order, is the window's next source frame.
            if mode == "frames":
                stamps = [read_stamp(video.decode_jpeg(sample[m])) for m in info["members"]]
            else:
                decoded = list(video.decode(io.BytesIO(sample[info["member"]])))
                stamps = [read_stamp(image) for _, image in decoded]
                # Timestamps too: clip frame k is shown at k/30 s, as its frame rate says.
                assert [index for index, _ in decoded] == list(range(f1 - f0))
                assert _ffprobe_frames(sample[info["member"]], tmp_path) == f1 - f0
            assert stamps == info["source_frames"] == list(range(f0, f1))
            # Our reader at any time shows the source frame on screen at that time.
            times = np.sort(rng.uniform(meta["window"]["t0"], meta["window"]["t1"], 5))
            frames, source = decode_view(sample, name, times)
            assert [read_stamp(f) for f in frames] == [int(np.floor(t * FPS + 1e-6)) for t in times] == source
            short = min(info["width"], info["height"])
            assert short == 448 if resolution == "448" else short > 448


@pytest.mark.parametrize("mode", ["transcode", "frames"])
def test_lower_fps_and_size_report_the_frame_they_show(default_release, tmp_path, mode):
    config = ShardConfig(mode=mode, window=2.0, short_side=224, fps=5)
    for sample in _write(default_release, tmp_path, config, takes=1):
        meta = json.loads(sample["json"])
        times = np.arange(meta["window"]["t0"], meta["window"]["t1"], 0.07)
        for name in meta["views"]:
            frames, source = decode_view(sample, name, times)
            assert min(frames.shape[1:3]) == 224
            assert [read_stamp(f) for f in frames] == source
            assert all(-1e-6 <= t - s / FPS < 1 / 5 + 1e-6 for t, s in zip(times, source))


def test_sample_carries_annotations_and_sensors(default_release, tmp_path):
    samples = _write(default_release, tmp_path, ShardConfig(window=2.0), takes=4)
    release = Release.open(str(default_release))
    seen, families = set(), set()
    for sample in samples:
        clip = decode_sample(sample, num_frames=2)
        meta, ann = clip["json"], clip["json"]["annotations"]
        t0, t1 = meta["window"]["t0"], meta["window"]["t1"]
        f0, f1 = meta["window"]["start_frame"], meta["window"]["end_frame"]
        assert sorted(clip["frames"]) == ["cam01", "cam02", "cam03", "cam04", "ego"]
        # The audio member is the source's AAC packets; it decodes to the window's samples (the
        # source's last partial AAC frame aside).
        assert meta["sensors"]["audio"]["codec"] == "aac"
        assert (t1 - t0) * 48000 - 1024 <= clip["audio"].shape[1] <= (t1 - t0) * 48000
        trajectory = clip["trajectory"]
        assert list(trajectory) == meta["sensors"]["trajectory"]["columns"]
        assert trajectory["tracking_timestamp_us"].dtype == np.int64
        # The device clock is not the take's (minutes apart here); timesync.csv maps one to the other.
        seconds = trajectory["take_time_s"]
        assert len(seconds) and (seconds >= t0).all() and (seconds < t1).all()
        assert (trajectory["tracking_timestamp_us"] / 1e6 > t1 + 60).all()
        assert abs(len(seconds) - 100 * (t1 - t0)) <= 1                    # 100 Hz, every sample kept once
        # Each trajectory sample lands on its frame: the device position there is the Aria camera's
        # centre in that frame's camera pose.
        poses = dense.ego_extrinsics(clip["arrays"]["camera_pose"], meta["arrays"]["camera_pose"])
        compared = 0
        for k, t in enumerate(seconds):
            frame = int(np.floor(t * 30 + 1e-4))
            if frame in poses:
                R, translation = poses[frame][:, :3].astype(np.float64), poses[frame][:, 3].astype(np.float64)
                position = [trajectory[f"t{axis}_world_device"][k] for axis in "xyz"]
                np.testing.assert_allclose(position, -R.T @ translation, atol=2e-3)
                compared += 1
        assert compared >= len(seconds) // 2
        assert ann["proficiency_demonstrator"]["proficiency_score"]
        for seg in ann["keystep_segments"]:
            assert seg["start_time"] < t1 and seg["end_time"] > t0 and seg["label_id"] is not None
        for family, arrays in clip["arrays"].items():
            assert ((arrays["frames"] >= f0) & (arrays["frames"] < f1)).all(), family
        families |= set(clip["arrays"])
        _arrays_equal_the_release(release, meta, clip["arrays"])
        seen |= {k for k, v in ann.items() if v}
        uid = meta["take"]["take_uid"]
        assert meta["take"]["scenario"] == release.take(uid).scenario
    assert {"keystep", "keystep_segments", "procedure_understanding", "proficiency_demonstrator",
            "proficiency_demonstration", "atomic_descriptions", "expert_commentary"} <= seen
    assert {"ego_pose_body_annotation", "ego_pose_hand_automatic", "camera_pose", "relations"} <= families


def _arrays_equal_the_release(release: Release, meta: dict, arrays: dict) -> None:
    """The sample's dense arrays hold the release's values for its window: keypoints within
    float32 rounding (relative 2^-24), masks exactly."""
    uid, split = meta["take"]["take_uid"], meta["take"]["split"]
    f0, f1 = meta["window"]["start_frame"], meta["window"]["end_frame"]
    family = "ego_pose_body_annotation"
    if family in arrays:
        raw = release.read_json(f"annotations/ego_pose/{split}/body/annotation/{uid}.json")
        expected = {int(f): e[0]["annotation3D"] for f, e in raw.items() if f0 <= int(f) < f1}
        got = dense.pose_frames(arrays[family], meta["arrays"][family])
        assert sorted(got) == sorted(expected)
        for frame, joints in expected.items():
            assert sorted(got[frame]["annotation3D"]) == sorted(joints)
            for joint, p in joints.items():
                for axis in "xyz":
                    assert got[frame]["annotation3D"][joint][axis] == pytest.approx(p[axis], rel=2 ** -23, abs=1e-7)
    if "relations" in arrays:
        masks = release.relations(split)[uid].object_masks
        checked = 0
        for obj, views in masks.items():
            for view, frames in views.items():
                for frame, encoded in frames.items():
                    if f0 <= frame < f1:
                        assert np.array_equal(dense.mask(arrays["relations"], meta["arrays"]["relations"], obj, view, frame),
                                              encoded.decode())
                        checked += 1
        assert checked == len(arrays["relations"]["frames"])


def _packet_bytes(path: Path) -> int:
    import av
    with av.open(str(path)) as container:
        return sum(p.size for p in container.demux(container.streams.audio[0]) if p.size)


def test_annotations_sensors_and_audio_are_stored_compactly(tiny_release, tmp_path):
    """Every take of a release sharded with the default window: the members that are not video
    (JSON, sensor and annotation arrays) take at most half the bytes of the release's annotation and
    sensor files, and the audio at most 1.1x the AAC it is copied from."""
    import tarfile

    release = Release.open(str(tiny_release))
    for split, uids in release.splits().split_to_take_uids.items():
        if uids:
            job.write_shard(ShardSpec(split, 0, tuple(uids)), str(tiny_release), str(tmp_path), ShardConfig())
    sizes = {"mp4": 0, "m4a": 0, "other": 0}
    for tar in tmp_path.rglob("*.tar"):
        with tarfile.open(tar) as archive:
            for member in archive:
                kind = member.name.rsplit(".", 1)[1]
                sizes[kind if kind in sizes else "other"] += member.size
    takes = release.takes()
    annotations = sum(f.stat().st_size for f in (tiny_release / "annotations").rglob("*") if f.is_file())
    sensors = sum(f.stat().st_size for take in takes for folder in ("trajectory", "eye_gaze")
                  for f in (tiny_release / take.root_dir / folder).glob("*.csv"))
    aac = sum(_packet_bytes(tiny_release / view.path) for take in takes for view in take.views("448") if view.is_ego)
    print(f"non-media {sizes['other'] / (annotations + sensors):.3f}x the annotation and sensor files, "
          f"audio {sizes['m4a'] / aac:.3f}x its AAC")
    assert sizes["other"] <= 0.5 * (annotations + sensors)
    assert aac < sizes["m4a"] <= 1.1 * aac


def test_windows_follow_the_take():
    assert window_frames(120, 1.5, 1.0) == [(0, 45), (30, 75), (60, 105), (90, 120)]
    assert window_frames(100, 8.0, None) == [(0, 100)]
    assert window_frames(480, 8.0, None) == [(0, 240), (240, 480)]


def _manifest(out) -> dict[str, str]:
    table = pq.read_table(str(out / "manifest.parquet")).to_pylist()
    return {r["key"]: r["sha256"] for r in table}


def test_job_output_is_read_by_webdataset_wids_and_ray(tiny_release, tmp_path, local_ray):
    out = tmp_path / "shards"
    stage = job.run(str(tiny_release), str(out), ShardConfig(window=1.0, shard_mb=0.3), progress=False)
    manifest = _manifest(out)
    assert stage["samples"] == len(manifest) == 3 * 2 and stage["rejects"] == 0
    tars = glob.glob(str(out / "*" / "*.tar"))
    assert {s["__key__"] for s in _samples(tars)} == set(manifest)
    for split in stage["shards"]:
        index = json.loads((out / split / "index.json").read_text())
        dataset = wids.ShardListDataset(str(out / split / "index.json"), transformations=[])
        assert len(dataset) == sum(s["nsamples"] for s in index["shardlist"])
        for i in range(len(dataset)):
            clip = decode_sample(dataset[i], num_frames=2)
            assert clip["key"] in manifest and clip["frames"]["ego"].shape == (2, 448, 448, 3)
    rows = ray_dataset(tars, views=["ego", "cam03"], num_frames=3).take_all()
    assert sorted(r["key"] for r in rows) == sorted(manifest)
    for r in rows:
        assert [read_stamp(f) for f in r["frames_cam03"]] == [int(np.floor(t * FPS + 1e-6)) for t in r["times"]]
    loader = torch.utils.data.DataLoader(clip_dataset(tars, views=["ego"], num_frames=2), batch_size=None,
                                         num_workers=2)
    assert sorted(c["key"] for c in loader) == sorted(manifest)
    # Nothing changed: a rerun writes nothing new.
    before = {p: os.stat(p).st_mtime_ns for p in tars}
    job.run(str(tiny_release), str(out), ShardConfig(window=1.0, shard_mb=0.3), progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in tars} == before
    with pytest.raises(ValueError, match="another configuration"):
        job.run(str(tiny_release), str(out), ShardConfig(window=2.0, shard_mb=0.3), progress=False)


def test_bad_takes_go_to_rejects_and_the_rest_is_sharded(faults_release, tmp_path, local_ray):
    out = tmp_path / "shards"
    job.run(str(faults_release), str(out), ShardConfig(window=1.0, resolution="full", shard_mb=0.2),
            progress=False)
    rejects = {r["take_uid"]: r["reason"] for r in json.loads((out / "rejects.json").read_text())}
    takes = Release.open(str(faults_release)).takes()
    truncated, missing, short = (takes[i].take_uid for i in range(3))
    assert set(rejects) == {truncated, missing, short}
    assert "cam02" in rejects[truncated]
    assert "cam03" in rejects[missing] and "not found" in rejects[missing]
    assert "frame count" in rejects[short]
    sharded = {r["take_uid"] for r in pq.read_table(str(out / "manifest.parquet")).to_pylist()}
    assert sharded == {t.take_uid for t in takes[3:]}


def test_drift_trim_cuts_every_view_to_the_common_frames_and_says_so(faults_release, tmp_path, local_ray):
    out = tmp_path / "shards"
    job.run(str(faults_release), str(out), ShardConfig(window=1.0, resolution="full", shard_mb=0.2, drift="trim"),
            progress=False)
    takes = Release.open(str(faults_release)).takes()
    short = takes[2]                      # its cam01 lacks the last 7 frames of the other views
    rejects = {r["take_uid"] for r in json.loads((out / "rejects.json").read_text())}
    assert rejects == {takes[0].take_uid, takes[1].take_uid}         # broken files are still rejected
    [problem] = [p for p in json.loads((out / "problems.json").read_text()) if short.take_name in p["reason"]]
    assert problem["file"].endswith("cam01.mp4") and "trimmed to" in problem["reason"]
    samples = [s for s in _samples(glob.glob(str(out / "*" / "*.tar")))
               if json.loads(s["json"])["take"]["take_uid"] == short.take_uid]
    metas = sorted((json.loads(s["json"]) for s in samples), key=lambda m: m["window"]["start_frame"])
    with open(faults_release / short.views("full")[0].path, "rb") as f:
        full = video.probe(f).frames
    assert metas and all(m["take"]["num_frames"] == full - 7 for m in metas)
    assert metas[0]["take"]["drift_frames"] == {name: 7 for name in metas[0]["views"] if name != "cam01"}
    assert metas[-1]["window"]["end_frame"] == full - 7
    last = next(s for s in samples if json.loads(s["json"])["key"] == metas[-1]["key"])
    for name, view in metas[-1]["views"].items():             # every view decodes to the trimmed window
        assert view["source_frames"][-1] == full - 8
        assert len(list(video.decode(io.BytesIO(last[view["member"]])))) == len(view["source_frames"]), name
    # The other takes carry no drift.
    assert all(json.loads(s["json"])["take"]["drift_frames"] == {} for s in _samples(glob.glob(str(out / "*" / "*.tar")))
               if json.loads(s["json"])["take"]["take_uid"] != short.take_uid)


def test_s3_output_equals_local_output(tiny_release, tmp_path, s3_endpoint, local_ray):
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("shards")
    config = ShardConfig(window=1.0, shard_mb=0.3)
    job.run(str(tiny_release), str(tmp_path / "local"), config, progress=False)
    job.run(str(tiny_release), "s3://shards/run", config, storage_options=options, progress=False)
    local = sorted(glob.glob(str(tmp_path / "local" / "*" / "*.tar")))
    assert local and sorted(fs.glob("shards/run/*/*.tar")) == \
        sorted(f"shards/run/{Path(p).parent.name}/{Path(p).name}" for p in local)
    for path in local:
        assert fs.cat_file(f"shards/run/{Path(path).parent.name}/{Path(path).name}") == Path(path).read_bytes()
    remote_manifest = pq.read_table(fs.open("shards/run/manifest.parquet")).to_pylist()
    assert {r["key"]: r["sha256"] for r in remote_manifest} == _manifest(tmp_path / "local")
    urls = [f"s3://{p}" for p in sorted(fs.glob("shards/run/*/*.tar"))]   # endpoint from AWS_ENDPOINT_URL
    assert sorted(c["key"] for c in clip_dataset(urls, views=["ego"], num_frames=1)) == sorted(_manifest(tmp_path / "local"))
    assert not [p for p in fs.find("shards/run") if p.endswith(".partial")]


def test_two_node_cluster_shares_the_work(tiny_release, tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        stage = job.run(str(tiny_release), str(tmp_path / "shards"), ShardConfig(window=0.5, shard_mb=1e-06),
                        progress=False)
        assert len(stage["nodes"]) == 2, stage["nodes"]
        assert stage["samples"] == 3 * 4
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_worker_node_lost_mid_job_leaves_the_shards_of_a_clean_run(default_release, tmp_path):
    """The worker node's raylet is killed while shards are being written: Ray Data runs the lost
    tasks again on the head node, or the stage fails without committing and the same command
    finishes it; either way the shards equal a clean run's."""
    from ray.cluster_utils import Cluster

    config = ShardConfig(window=1.0, shard_mb=0.4)
    out = tmp_path / "shards"
    at_kill = []
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)

    def kill_the_worker_node_once_shards_appear():
        deadline = time.time() + 300
        while not glob.glob(str(out / "*" / "*.stats.json")) and time.time() < deadline:
            time.sleep(0.02)
        at_kill.append(len(glob.glob(str(out / "*" / "*.stats.json"))))
        cluster.remove_node(worker, allow_graceful=False)      # kills its raylet and its workers

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        job.run(str(default_release), str(tmp_path / "clean"), config, progress=False)
        killer = threading.Thread(target=kill_the_worker_node_once_shards_appear)
        killer.start()
        try:
            stage = job.run(str(default_release), str(out), config, progress=False)
            outcome = "finished on the surviving node"
        except Exception as e:          # the stage failed: nothing committed, the rerun finishes it
            assert json.loads((out / "stage.json").read_text())["status"] == "running"
            outcome = f"failed ({type(e).__name__}), rerun"
            killer.join()
            stage = job.run(str(default_release), str(out), config, progress=False)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    shards = sum(map(len, stage["shards"].values()))
    print(f"worker node killed with {at_kill[0]} of {shards} shards written: {outcome}")
    assert 0 < at_kill[0] < shards
    assert _manifest(out) == _manifest(tmp_path / "clean")
    assert json.loads((out / "stage.json").read_text())["status"] == "done"
    assert not [p for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]


# ----------------------------------------------------------------------------- crash and resume

def _run_cli(release, out, shard_mb="0.4", **popen):
    cmd = [sys.executable, "-m", "engine", "shard", str(release), str(out), "--window", "1", "--shard-mb", shard_mb]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)


def _kill_one_shard_worker(stop: threading.Event, killed: list) -> None:
    """Find a Ray worker while it writes a shard (its process title names the task) and kill -9 it."""
    while not stop.is_set() and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "_RayShardWriter" in title:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.05)


def test_a_shard_counts_its_dead_workers_by_take_and_not_its_errors(tiny_release, tmp_path):
    """The record a dead attempt leaves says where it died: the next attempt of the same run
    counts a death there, and a take with WORKER_DEATHS deaths is left out, named, the others
    written. A record of another run, or of this very process (an error whose clean-up failed),
    counts nothing. Without Ray: write_shard is what a retried task runs."""
    uids = Release.open(str(tiny_release)).splits().split_to_take_uids["train"]
    assert len(uids) >= 2
    spec = ShardSpec("train", 0, tuple(uids))
    record = tmp_path / "train" / "train-000000.progress.json"
    record.parent.mkdir()

    def attempt(run: str, left_by: dict) -> tuple[list, list]:
        record.write_text(json.dumps({"job": "run-1", "at": uids[0], "deaths": {uids[0]: job.WORKER_DEATHS - 1},
                                      **left_by}))
        stats = job.write_shard(spec, str(tiny_release), str(tmp_path), ShardConfig(), job=run)
        assert not record.exists()
        return [f["take_uid"] for f in stats["failures"]], stats["takes"]

    host = socket.gethostname()
    dead = {"host": host, "pid": 2 ** 22 + 1}            # above Linux's pid limit: no live process
    failures, written = attempt("run-1", dead)
    assert failures == [uids[0]] and written == sorted(uids[1:])
    assert attempt("run-2", dead) == ([], sorted(uids))
    assert attempt("run-1", {"host": host, "pid": os.getpid()}) == ([], sorted(uids))


def test_a_take_that_fails_after_its_first_sample_leaves_no_byte_in_the_shard(tiny_release, tmp_path, monkeypatch):
    """A take whose second sample cannot be made is cut out of the shard it had begun to fill:
    the tar is byte for byte the one written without that take. Without Ray."""
    uids = Release.open(str(tiny_release)).splits().split_to_take_uids["train"]
    assert len(uids) >= 2
    bad = uids[0]                 # the first take: the others are written after it is cut out
    real = job.build_samples

    def failing_on_the_second_sample(release, src, config):
        for n, sample in enumerate(real(release, src, config)):
            if src.take.take_uid == bad and n == 1:
                raise ContentError(f"take {src.take.take_name}: a packet does not demux")
            yield sample

    monkeypatch.setattr(job, "build_samples", failing_on_the_second_sample)
    stats = job.write_shard(ShardSpec("train", 0, tuple(uids)), str(tiny_release), str(tmp_path / "cut"), ShardConfig(window=1.0))
    assert [f["take_uid"] for f in stats["failures"]] == [bad]
    assert "does not demux" in stats["failures"][0]["reason"]
    monkeypatch.undo()
    clean = job.write_shard(ShardSpec("train", 0, tuple(uids[1:])), str(tiny_release), str(tmp_path / "clean"),
                            ShardConfig(window=1.0))
    tar = (tmp_path / "cut" / "train" / "train-000000.tar").read_bytes()
    assert tar == (tmp_path / "clean" / "train" / "train-000000.tar").read_bytes()
    assert [(r["key"], r["offset"], r["size"]) for r in stats["rows"]] == \
        [(r["key"], r["offset"], r["size"]) for r in clean["rows"]]


def _kill_the_worker_on_take(out: Path, take_uid: str, stop: threading.Event, kills: list) -> None:
    """Kill -9 the shard worker each time its progress record says it works on ``take_uid``, until
    the record shows the run gave up on it: a take that crashes its worker every time."""
    while not stop.is_set():
        for path in out.glob("*/*.progress.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record["at"] == take_uid and record["pid"] not in kills:
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                    kills.append(record["pid"])
                except ProcessLookupError:
                    pass
        time.sleep(0.02)


def test_killed_worker_then_killed_driver_resume_to_identical_shards(default_release, tmp_path):
    clean = _run_cli(default_release, tmp_path / "clean")
    assert clean.wait(timeout=300) == 0
    expected = _manifest(tmp_path / "clean")
    assert len(expected) == 10 * 4

    # A take that kills its worker every time is rejected after WORKER_DEATHS deaths, naming
    # them; the takes before and after it in its shard (larger shards here: samples keep their
    # keys and bytes), and every other shard, are written.
    specs = job.plan(Release.open(str(default_release)), ShardConfig(window=1.0, shard_mb=4)).specs
    victim = next(s.take_uids[1] for s in specs if len(s.take_uids) >= 3)
    stop, kills = threading.Event(), []
    out = tmp_path / "take_killed"
    watcher = threading.Thread(target=_kill_the_worker_on_take, args=(out, victim, stop, kills), daemon=True)
    watcher.start()
    run = _run_cli(default_release, out, shard_mb="4")
    try:
        assert run.wait(timeout=300) == 0
    finally:
        stop.set()
        run.kill()
    watcher.join()
    # A kill that lands just after the worker moved on costs the next take one death: more kills.
    assert len(kills) >= job.WORKER_DEATHS
    before = {r["take_uid"] for r in json.loads((tmp_path / "clean" / "rejects.json").read_text())}
    rejects = {r["take_uid"]: r["reason"] for r in json.loads((out / "rejects.json").read_text())}
    assert set(rejects) == before | {victim}
    assert f"died {job.WORKER_DEATHS} times" in rejects[victim]
    rows = pq.read_table(str(tmp_path / "clean" / "manifest.parquet")).to_pylist()
    assert _manifest(out) == {r["key"]: r["sha256"] for r in rows if r["take_uid"] != victim}

    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_one_shard_worker, args=(stop, killed))
    watcher.start()
    run = _run_cli(default_release, tmp_path / "worker_killed")
    assert run.wait(timeout=300) == 0
    stop.set()
    watcher.join()
    assert killed, "no shard worker was seen running"
    assert _manifest(tmp_path / "worker_killed") == expected

    out = tmp_path / "driver_killed"
    driver = _run_cli(default_release, out, start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(str(out / "*" / "*.stats.json")) and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = glob.glob(str(out / "*" / "*.stats.json"))
    assert done and json.loads((out / "stage.json").read_text())["status"] == "running"   # claimed, not done
    try:
        os.killpg(driver.pid, signal.SIGKILL)   # Ray processes the dead driver left behind
    except ProcessLookupError:
        pass
    rerun = _run_cli(default_release, out)
    assert rerun.wait(timeout=300) == 0
    assert _manifest(out) == expected
    for run_dir in ("clean", "take_killed", "worker_killed", "driver_killed"):
        leftovers = [p for p in (tmp_path / run_dir).rglob("*")
                     if ".partial" in p.name or ".tmp-" in p.name or p.name.endswith(".progress.json")]
        assert leftovers == []


def test_a_transcoded_window_is_the_same_bytes_every_time(default_release):
    take = Release.open(str(default_release)).takes()[0]
    path = str(default_release / take.views("448")[1].path)
    assert len({video.transcode(path, 0, 90, gop=30).data for _ in range(5)}) == 1


def test_a_few_frames_decode_a_few_gops_not_the_window(default_release, monkeypatch):
    """decode_at seeks to the keyframe before each wanted frame when that skips decoding."""
    take = Release.open(str(default_release)).takes()[0]
    clip = video.transcode(str(default_release / take.views("448")[1].path), 0, 120, gop=30)
    decoded = []
    real = video.frame_index
    monkeypatch.setattr(video, "frame_index", lambda frame, stream: decoded.append(1) or real(frame, stream))
    frames = video.decode_at(clip.data, [3, 100])
    assert [read_stamp(frames[k]) for k in (3, 100)] == [3, 100]
    assert len(decoded) <= 4 + 11 + 8   # frames 0-3, 90-100, plus decoder look-ahead; not 101


def test_frames_left_undecoded_change_none_of_the_frames_decoded(default_release):
    """Frames no caller wants, and a clip's pre-roll, are not decoded where no frame refers to
    them (B-frames): every frame that is decoded is the same image a full decode gives."""
    import av

    take = Release.open(str(default_release)).takes()[0]
    path = str(default_release / take.views("448")[1].path)
    with av.open(path) as container:
        stream = container.streams.video[0]
        everything = {video.frame_index(f, stream): (f.to_ndarray(format="rgb24"), f.pict_type)
                      for f in container.decode(stream)}
    assert sum(kind == av.video.frame.PictureType.B for _, kind in everything.values()) > len(everything) / 3

    def same(decoded: dict, expected: list[int], shift: int = 0):
        assert sorted(decoded) == expected
        assert all(np.array_equal(image, everything[k + shift][0]) for k, image in decoded.items())

    picks = sorted(set(range(0, len(everything), 3)) | {len(everything) - 1})
    same(dict(video.decode(path, indices=set(picks))), picks)
    with open(path, "rb") as f:
        same(video.decode_at(f.read(), picks[::4]), picks[::4])
    clip = next(video.cut_windows(path, [(61, 95)]))[0]     # 61 frames of pre-roll
    same(dict(video.decode(io.BytesIO(clip.data))), list(range(34)), shift=61)


def test_a_views_clips_decoded_as_one_stream_give_its_frames_feeding_each_packet_once(default_release, tmp_path):
    """The feature job decodes a take view's remux clips through one ClipChain: the pre-roll a
    clip shares with the clip before is not decoded again, and every frame is the one a plain
    decode of the source gives. Back to back windows, windows with gaps (past a keyframe, a fresh
    decoder starts at the next clip's keyframe and its pre-roll stays hidden) and overlapping ones;
    a source with one keyframe and one with a keyframe every 30 frames."""
    import av

    take = Release.open(str(default_release)).takes()[0]
    one_gop = default_release / take.views("448")[1].path
    short_gops = tmp_path / "gop30.mp4"
    short_gops.write_bytes(video.transcode(str(one_gop), 0, 120, gop=30).data)
    for path in (str(one_gop), str(short_gops)):
        with av.open(path) as container:
            stream = container.streams.video[0]
            everything = {video.frame_index(f, stream): f.to_ndarray(format="rgb24") for f in container.decode(stream)}
        n = len(everything)
        for windows, wanted in (([(s, min(s + 30, n)) for s in range(0, n, 30)], set(range(n))),
                                ([(0, 20), (50, 70), (100, n)], set(range(n))),
                                ([(0, 60), (40, 90), (85, n)], {5, 41, 59, 60, 89, n - 1})):
            clips = [clip for clip, _ in video.cut_windows(path, windows)]
            chain = video.ClipChain(wanted.__contains__)
            frames = [f for (start, _), clip in zip(windows, clips) for f in chain.feed(clip.data, start)]
            frames += chain.flush()
            keys = [k for k, _ in frames]
            assert keys == sorted(set(keys)) and set(keys) <= wanted        # in order, each once, only wanted ones
            assert {f for start, end in windows for f in range(start, end)} & wanted <= set(keys)
            assert all(np.array_equal(image, everything[k]) and read_stamp(image) == k for k, image in frames)
            if path == str(short_gops) and windows[1] == (50, 70):   # restarted at keyframe 30: 30-49 stay hidden
                assert not set(keys) & set(range(30, 50))
            if windows[0] == (0, 30):            # back to back: the source's packets, once each
                held = 0
                for clip in clips:
                    with av.open(io.BytesIO(clip.data)) as container:
                        held += sum(1 for p in container.demux(video=0) if p.size)
                assert chain.fed == n <= held
                assert path == str(short_gops) or n < held      # one GOP: every window after the first has a pre-roll


def test_a_truncated_annotation_file_costs_only_its_annotations(damaged, tmp_path, local_ray):
    splits = Release.open(str(damaged)).splits().split_to_take_uids
    split = next(s for s in ("train", "val", "test") if splits.get(s) and
                 (damaged / "annotations" / f"relations_{s}.json").exists())
    config = ShardConfig(splits=(split,), window=1.0, shard_mb=0.3)
    job.run(str(damaged), str(tmp_path / "clean"), config, progress=False)
    # The same URL again, broken now: Ray's worker processes outlive a job, and the next one
    # must not shard what they read before.
    broken = damaged / "annotations" / f"relations_{split}.json"
    broken.write_bytes(broken.read_bytes()[:100])
    result = job.run(str(damaged), str(tmp_path / "damaged"), config, progress=False)
    assert result["rejects"] == 0 and result["annotation_problems"] == 1
    [problem] = json.loads((tmp_path / "damaged" / "problems.json").read_text())
    assert problem["file"] == f"annotations/relations_{split}.json" and "malformed JSON at line" in problem["reason"]
    clean = {s["__key__"]: s for s in _samples(sorted(glob.glob(str(tmp_path / "clean" / split / "*.tar"))))}
    got = {s["__key__"]: s for s in _samples(sorted(glob.glob(str(tmp_path / "damaged" / split / "*.tar"))))}
    assert sorted(got) == sorted(clean) and {json.loads(s["json"])["take"]["take_uid"] for s in got.values()} == \
        set(splits[split])
    lost = 0
    for key, sample in got.items():
        expected = {k: v for k, v in clean[key].items() if k != "relations.npz"}
        lost += "relations.npz" in clean[key]
        assert sorted(sample) == sorted(expected)
        for member in expected:
            if not member.startswith("__") and member != "json":
                assert sample[member] == expected[member], (key, member)     # video, audio, sensors, poses
        meta, clean_meta = json.loads(sample["json"]), json.loads(expected["json"])
        assert meta["annotations"] == clean_meta["annotations"]
        assert "relations" not in meta["arrays"] and meta["views"] == clean_meta["views"]
    assert lost > 0          # the relations arrays are what the truncated file took away


def test_without_its_timesync_a_take_keeps_its_video_and_loses_only_its_sensors(damaged, tmp_path, local_ray):
    """Trajectory and gaze are stamped with the device clock; without timesync.csv there is no
    way onto the take's clock, so they are left out (not sliced wrongly) and the file is named."""
    release = Release.open(str(damaged))
    take = release.takes()[0]
    capture = take.raw["capture"]["capture_name"]
    (damaged / "captures" / capture / "timesync.csv").unlink()
    result = job.run(str(damaged), str(tmp_path / "shards"), ShardConfig(window=1.0, shard_mb=0.3), progress=False)
    assert result["rejects"] == 0
    problems = json.loads((tmp_path / "shards" / "problems.json").read_text())
    assert problems == [{"file": f"captures/{capture}/timesync.csv",
                         "reason": f"captures/{capture}/timesync.csv: not found; trajectory and eye gaze left out"}]
    samples = _samples(sorted(glob.glob(str(tmp_path / "shards" / "*" / "*.tar"))))
    for sample in samples:
        mine = json.loads(sample["json"])["take"]["take_uid"] == take.take_uid
        assert ("trajectory.npz" in sample) != mine and ("gaze.npz" in sample) != mine
        assert "ego.mp4" in sample
    assert any(json.loads(s["json"])["take"]["take_uid"] == take.take_uid for s in samples)
