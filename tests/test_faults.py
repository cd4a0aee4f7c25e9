"""Object storage that fails the way real storage does, through a fault-injecting proxy in front
of moto's S3 server (tests/faulty_s3.py): passing faults are retried and leave no trace in the
outputs; a fault that does not pass fails the stage, names the object, commits nothing, and a
rerun completes it."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import s3fs
from conftest import _free_port, moto_server
from faulty_s3 import FaultyS3

from engine.errors import StorageFault, passing_fault, storage_fault
from engine.miniature import synth
from engine.video import VideoError

REPO = Path(__file__).resolve().parents[1]
# Files whose bytes hold times, hosts or Ray's own bookkeeping; their content is compared below.
VOLATILE = ("stage.json", ".stats.json", "metrics.jsonl", "result.json", "/ray/")


def stages(endpoint: str, prefix: str, release: str, env: dict | None = None, steps=("shard", "features", "train")):
    """Shard, features and keystep training on S3 through ``endpoint``, by the CLI as users run
    it; the last command's process."""
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, **(env or {})}
    commands = {"shard": ["shard", release, f"{prefix}/shards", "--window", "2", "--shard-mb", "0.3"],
                "features": ["features", f"{prefix}/shards", f"{prefix}/features"],
                "train": ["train", "keystep_recognition", f"{prefix}/features", f"{prefix}/keystep", "--epochs", "3"]}
    for step in steps:
        proc = subprocess.run([sys.executable, "-m", "engine", *commands[step]], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return proc
    return proc


def contents(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    """Every output object under ``prefix`` by its relative name, except Ray Train's own folder."""
    fs.invalidate_cache()
    return {p[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix) if "/ray/" not in p}


def comparable(files: dict[str, bytes]) -> dict:
    """What must not change between runs: every byte of the data files; of the records, what they
    say about the data (not times, hosts or nodes)."""
    out = {}
    for name, data in files.items():
        if not name.endswith(VOLATILE):
            out[name] = data
        elif name.endswith(".stats.json"):
            stats = json.loads(data)
            out[name] = {k: stats[k] for k in ("samples", "bytes", "takes", "failures", "problems", "rows")}
        elif name.endswith("result.json") and "/keystep/" in name:
            out[name] = json.loads(data)["val"]
    return out


@pytest.fixture(scope="module")
def local_release(tmp_path_factory) -> Path:
    """A small procedural release (keystep labels in train and val)."""
    root = tmp_path_factory.mktemp("faults") / "release"
    synth.generate(root, preset="tiny", takes=6, seconds=4.0, seed=5, scenarios=["Cooking", "Health"])
    return root


@pytest.fixture(scope="module")
def release_on_s3(local_release, s3_endpoint):
    """The release in a bucket of its own."""
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put(str(local_release), f"{bucket}/release", recursive=True)
    return fs, bucket


@pytest.fixture(scope="module")
def clean_run(release_on_s3, s3_endpoint):
    fs, bucket = release_on_s3
    proc = stages(s3_endpoint, f"s3://{bucket}/clean", f"s3://{bucket}/release")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return contents(fs, f"{bucket}/clean")


def test_passing_faults_are_retried_and_the_outputs_equal_a_clean_run(release_on_s3, clean_run, s3_endpoint):
    fs, bucket = release_on_s3
    with FaultyS3(s3_endpoint, seed=0, reset=0.05, slow_down=0.05) as proxy:
        proc = stages(proxy.url, f"s3://{bucket}/faulty", f"s3://{bucket}/release")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Faults of both kinds hit reads and writes (and a GET cut off in the middle of its body).
    assert proxy.injected["reset"] >= 10 and proxy.injected["slow_down"] >= 10, proxy.injected
    faulty = contents(fs, f"{bucket}/faulty")
    assert sorted(faulty) == sorted(clean_run)
    assert comparable(faulty) == comparable(clean_run)
    assert any(name.endswith(".tar") for name in faulty) and any(name.endswith(".pt") for name in faulty)
    for name in ("/shards/rejects.json", "/features/rejects.json"):
        assert json.loads(faulty[name]) == []


def test_a_fault_that_does_not_pass_fails_the_stage_naming_the_object_and_a_rerun_completes_it(
        release_on_s3, clean_run, s3_endpoint):
    fs, bucket = release_on_s3
    take = sorted(fs.ls(f"{bucket}/release/takes"))[2].rsplit("/", 1)[1]
    video = f"{bucket}/release/takes/{take}/frame_aligned_videos/downscaled/448/cam02.mp4"
    # Every read of one video answers 503 (its size, read while planning, still answers).
    # Fewer client attempts keep the test short; the give-up path is the same.
    with FaultyS3(s3_endpoint, fail=f"GET /{video}$") as proxy:
        failed = stages(proxy.url, f"s3://{bucket}/broken", f"s3://{bucket}/release", env={"AWS_MAX_ATTEMPTS": "2"},
                        steps=("shard",))
    assert proxy.failed_paths == {f"/{video}"}
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"ee4d shard: s3://{video}: storage kept failing (OSError: [Errno {errno.EBUSY}]" in failed.stderr
    assert "nothing was committed" in failed.stderr
    # Nothing committed: the stage record is a claim, not a done record; no manifest; no take rejected.
    record = json.loads(fs.cat_file(f"{bucket}/broken/shards/stage.json"))
    assert record["status"] == "running"
    assert not fs.exists(f"{bucket}/broken/shards/manifest.parquet")
    assert not fs.exists(f"{bucket}/broken/shards/rejects.json")

    rerun = stages(s3_endpoint, f"s3://{bucket}/broken", f"s3://{bucket}/release", steps=("shard",))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    planned, done, todo = map(int, re.search(r"(\d+) shards planned, (\d+) already done, (\d+) to write",
                                             rerun.stdout + rerun.stderr).groups())
    assert done > 0 and todo > 0 and done + todo == planned      # the shards that were finished are kept
    shards = {k: v for k, v in comparable(contents(fs, f"{bucket}/broken")).items() if k.startswith("/shards/")}
    assert shards == {k: v for k, v in comparable(clean_run).items() if k.startswith("/shards/")}


def test_which_errors_are_passing_storage_faults():
    busy = OSError(errno.EBUSY, "Please reduce your request rate.")     # s3fs's 503 SlowDown
    assert passing_fault(busy) is busy
    assert passing_fault(ConnectionResetError()) is not None
    assert passing_fault(TimeoutError()) is not None
    assert passing_fault(FileNotFoundError(errno.ENOENT, "no such key")) is None
    assert passing_fault(VideoError("truncated")) is None
    assert passing_fault(ValueError("bad json")) is None
    try:                                          # found under another error that it caused
        try:
            raise busy
        except OSError as e:
            raise RuntimeError("decode failed") from e
    except RuntimeError as e:
        assert passing_fault(e) is busy
    # Ray Data gives the driver a task's error as text: the fault is found in it.
    fault = StorageFault.at("s3://b/k.mp4", busy)
    wrapped = RuntimeError(f"UDF failed\nTraceback ...\nengine.errors.StorageFault: {fault}\n\nmore")
    assert str(storage_fault(wrapped)) == str(fault)
    assert storage_fault(RuntimeError("UDF failed: ValueError")) is None


def _whole_tar(data: bytes) -> bool:
    """Whether ``data`` is a complete tar: every member's bytes present, then the end-of-archive blocks."""
    if len(data) % 512 or len(data) < 1024 or data[-1024:].strip(b"\0"):
        return False
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return all(len(tar.extractfile(m).read()) == m.size for m in tar.getmembers() if m.isfile())


def test_a_store_restarted_without_its_data_mid_job_shows_no_partial_shard_and_a_rerun_completes(
        local_release, clean_run):
    """moto keeps objects in memory: stopped and started again in the middle of a shard job, it
    comes back empty, like a store that lost what it held. Every shard listed at any moment
    reads whole; the job notices at commit that shards it wrote are gone and commits nothing;
    the same command then completes it, equal to a clean run. The job reaches the store through
    a proxy that holds the upload of every train shard but the first until the store is back,
    so the restart falls in the middle of the job however fast the job runs."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = moto_server(port)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    fs.mkdir("restart")
    cmd = [sys.executable, "-m", "engine", "shard", str(local_release), "s3://restart/shards", "--window", "2",
           "--shard-mb", "0.3"]
    with FaultyS3(endpoint, hold=r"^PUT /restart/shards/train/train-0*[1-9][0-9]*\.tar$") as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        read_whole, restarted = set(), False
        try:
            while job.poll() is None:
                try:
                    fs.invalidate_cache()
                    for path in fs.find("restart/shards"):
                        if path.endswith(".tar") and path not in read_whole:
                            assert _whole_tar(fs.cat_file(path)), f"{path} is listed but not whole"
                            read_whole.add(path)
                except (OSError, FileNotFoundError):
                    pass                         # the store is down, or an object went with it
                if read_whole and not restarted:
                    server.kill()
                    server.wait()
                    server = moto_server(port)
                    fs.mkdir("restart")
                    restarted = True
                    proxy.released.set()
                time.sleep(0.05)
            _, err = job.communicate()
            # Usually it fails at commit, naming a shard that is gone; a write caught in the moment
            # the bucket was missing fails it sooner. Either way nothing is committed.
            assert restarted and job.returncode != 0, err[-3000:]
            print("first run:", next(line for line in reversed(err.splitlines()) if line.startswith("ee4d shard:")
                                     or "Error" in line))
            fs.invalidate_cache()
            assert not fs.exists("restart/shards/manifest.parquet")
            rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            shards = {k: v for k, v in comparable(contents(fs, "restart")).items() if k.startswith("/shards/")}
        finally:
            proxy.released.set()
            server.terminate()
            server.wait(timeout=10)
    assert shards == {k: v for k, v in comparable(clean_run).items() if k.startswith("/shards/")}
