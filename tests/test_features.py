"""The feature job: official windows, equality with features computed straight from the release,
official file names, resume after a kill, rejects, S3, and a two-node cluster."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from engine import cli
from engine.features import job, models, store
from engine.features.store import feature_name
from engine.features.windows import feature_windows, video_windows
from engine.release import Release
from engine.shards import job as shard_job
from engine.shards.plan import ShardConfig

TINY_VIDEO = models.resolve("tiny_video")


def test_windows_follow_the_official_rule():
    assert video_windows(60) == [(0, 32), (16, 48), (28, 60)]        # last window [n - 32, n)
    assert video_windows(64) == [(0, 32), (16, 48), (32, 64)]        # the stride ends at n: no extra window
    assert video_windows(32) == [(0, 32)]
    assert video_windows(20) == [(0, 20)]                            # shorter than a window: one window
    wins = feature_windows(TINY_VIDEO, 60)
    assert wins[0].picks == (0, 4, 8, 12, 16, 20, 24, 28)
    assert wins[2].picks == (28, 32, 36, 40, 44, 48, 52, 56) and (wins[2].t0, wins[2].t1) == (28 / 30, 2.0)
    image = models.resolve("tiny_image")
    assert [w.picks for w in feature_windows(image, 90, fps=1)] == [(0,), (30,), (60,)]
    assert len(feature_windows(image, 60)) == 60


@pytest.fixture(scope="module")
def shards(tiny_release, tmp_path_factory, local_ray) -> Path:
    """1 s shard windows, so the 32-frame feature window [0, 32) spans two samples."""
    out = tmp_path_factory.mktemp("feature-shards") / "shards"
    shard_job.run(str(tiny_release), str(out), ShardConfig(window=1.0, shard_mb=0.4), progress=False)
    return out


@pytest.fixture(scope="module")
def features(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "tiny_video"
    job.run(str(shards), str(out), job.FeatureConfig(model="tiny_video", batch_size=4), progress=False)
    return out


def _reference(release_root: Path, config: job.FeatureConfig, views="all") -> dict[str, np.ndarray]:
    """Features of every take view the plain way: the release's 448 video, decoded in one pass."""
    release = Release.open(str(release_root))
    embedder = job.Embedder(config.spec.to_json())
    return {feature_name(take.take_uid, view): job.features_from_release(release, take, view, config, embedder)
            for take in release.takes() for view in take.views("448") if views == "all" or view.is_ego}


def _load_all(out: Path) -> dict[str, torch.Tensor]:
    return {p.stem: torch.load(p, weights_only=True) for p in out.glob("*.pt")}


def test_features_from_shards_equal_features_from_the_release(tiny_release, features):
    expected = _reference(tiny_release, job.FeatureConfig(model="tiny_video"))
    got = _load_all(features)
    assert sorted(got) == sorted(expected) and len(got) == 3 * 5
    for name, tensor in got.items():
        assert re.fullmatch(r"[0-9a-f-]{36}_(aria01_rgb|cam0[1-4]_0)", name), name
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 240)   # 60 frames: 3 windows
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=0, atol=1e-5)

    table = pq.read_table(str(features / "parquet"))
    assert table.num_rows == 15 * 3
    for row in table.to_pylist():
        name = f"{row['take_uid']}_{row['cam_id']}_{row['stream_id']}"
        np.testing.assert_allclose(row["vector"], got[name][row["window"]].numpy(), rtol=0, atol=0)
        assert (row["t0"], row["t1"]) == [(0.0, 32 / 30), (16 / 30, 48 / 30), (28 / 30, 2.0)][row["window"]]

    record = json.loads((features / "stage.json").read_text())
    stage = record["result"]
    assert record["status"] == "done" and record["kind"] == "features"
    assert stage["model"]["name"] == "tiny_video" and stage["weights_sha256"] == "random-init-seed-0"
    assert (stage["window"], stage["stride"], stage["dim"], stage["take_views"], stage["rejects"]) == (32, 16, 240, 15, 0)


def test_files_are_written_by_writer_actors_off_the_driver(features, tmp_path):
    """Writer actors, not the driver, gather each take view and write its files; a writer counts a
    window given twice (a retried batch) once and reports a take view that never completed."""
    writers = json.loads((features / "stage.json").read_text())["result"]["writers"]
    assert len(writers) == 1 and writers[0]["take_views"] == 15 and writers[0]["pid"] != os.getpid()

    clean = _load_all(features)
    name = sorted(clean)[0]
    rows = pq.read_table(str(features / "parquet" / f"{name}.parquet")).to_pandas()

    def batch(rows):
        return {"name": np.array([name] * len(rows)), "num_windows": np.full(len(rows), 3),
                **{k: rows[k].to_numpy() for k in store.TakeViewWriter.COLUMNS},
                "vector": np.stack(rows["vector"].to_numpy()).astype(np.float32)}

    writer = store.TakeViewWriter(str(tmp_path / "w"), threads=2)
    writer.add(batch(rows.iloc[[2, 0]]))
    writer.add(batch(rows.iloc[[0]]))                       # again: still 2 of 3 windows
    assert writer.finish()["partial"] == {name: 2} and not (tmp_path / "w").exists()
    writer = store.TakeViewWriter(str(tmp_path / "w"), threads=2)
    writer.add(batch(rows.iloc[[2, 0]]))
    writer.add(batch(rows.iloc[[1, 1]]))
    writer.add(batch(rows.iloc[[0]]))                       # after it was written: ignored
    report = writer.finish()
    assert report["written"] == {name: [3, 240]} and report["partial"] == {} and report["pid"] == os.getpid()
    assert torch.equal(torch.load(tmp_path / "w" / f"{name}.pt", weights_only=True), clean[name])


def test_image_model_gives_one_feature_per_frame_at_the_chosen_rate(tiny_release, shards, tmp_path):
    config = job.FeatureConfig(model="tiny_image", fps=5, views="ego")
    job.run(str(shards), str(tmp_path / "img"), config, progress=False)
    got = _load_all(tmp_path / "img")
    expected = _reference(tiny_release, config, views="ego")
    assert sorted(got) == sorted(expected) and len(got) == 3
    for name, tensor in got.items():
        assert tuple(tensor.shape) == (10, 192)    # 2 s at 5 per second
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- models

def test_model_registry_builds_files_and_factories_without_a_network(tmp_path, monkeypatch):
    reference = job.Embedder(TINY_VIDEO.to_json())
    clip = np.random.default_rng(0).integers(0, 255, (2, 8, 64, 64, 3), dtype=np.uint8)
    expected = reference.embed(clip)

    scripted = tmp_path / "tiny.ts"
    torch.jit.script(models.build(TINY_VIDEO)).save(str(scripted))
    exported = tmp_path / "tiny.pt2"
    program = torch.export.export(models.build(TINY_VIDEO), (torch.zeros(2, 3, 8, 64, 64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(exported))
    weights = tmp_path / "weights.pt"
    torch.save(models.build(TINY_VIDEO).state_dict(), weights)
    (tmp_path / "my_encoders.py").write_text(
        "from engine.features.tiny import tiny\n\ndef video_encoder():\n    return tiny('video')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    for name, w in ((f"torchscript:{scripted}", None), (f"export:{exported}", None),
                    ("my_encoders:video_encoder", str(weights))):
        spec = models.resolve(name, w, frames=8, size=64)
        np.testing.assert_allclose(job.Embedder(spec.to_json()).embed(clip), expected, rtol=0, atol=1e-5)
    assert models.weights_digest(models.resolve(f"torchscript:{scripted}", frames=8, size=64)) != \
        models.weights_digest(models.resolve("my_encoders:video_encoder", str(weights)))

    with pytest.raises(models.ModelError, match="weights file not found: .*missing.pt"):
        models.resolve("tiny_video", str(tmp_path / "missing.pt"))
    with pytest.raises(models.ModelError, match="unknown model"):
        models.resolve("omnivore")
    with pytest.raises(models.ModelError, match="has no callable"):
        models.resolve("my_encoders:nothing_here")
    with pytest.raises(models.ModelError, match="give --weights|not installed"):
        models.resolve("timm:vit_base_patch16_224")


def test_cli_refuses_a_missing_weights_file_before_any_work(shards, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["features", str(shards), str(out), "--model", "tiny_video", "--weights", "nope.pt"]) == 2
    assert "weights file not found: nope.pt" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- failures and resume

def _break_one_view(shards: Path, out: Path) -> str:
    """A copy of the shards where one take's ego media in its second sample is garbage."""
    shutil.copytree(shards, out)
    tar_path = sorted(out.glob("train/*.tar"))[0]
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            members.append((info, tar.extractfile(info).read()))
    keys = sorted({info.name.split(".", 1)[0] for info, _ in members})
    victim = keys[1]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{victim}.ego.mp4":
                data = b"\0" * 64 + data[-64:]
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return victim.rsplit("_", 1)[0]


def test_a_shard_that_is_not_a_tar_is_rejected_and_one_that_cannot_be_read_fails_the_task(shards, tmp_path):
    """Bad data rejects what it touches; a missing file is no content error: it propagates, so
    the stage fails (and a rerun completes it) instead of committing without that shard."""
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    item = {"url": str(garbage), "split": "train", "shard": "train-000009", "skip": []}
    rows = list(job.shard_windows(item, TINY_VIDEO.to_json(), 32, 16, None, "all"))
    assert len(rows) == 1 and rows[0]["name"] == "shard:train-000009" and str(garbage) in rows[0]["error"]
    with pytest.raises(FileNotFoundError):
        list(job.shard_windows(dict(item, url=str(tmp_path / "absent.tar")), TINY_VIDEO.to_json(), 32, 16, None,
                               "all"))


def test_undecodable_media_rejects_that_take_view_and_the_rest_finish(shards, features, tmp_path):
    broken = tmp_path / "shards"
    take_uid = _break_one_view(shards, broken)
    out = tmp_path / "out"
    stage = job.run(str(broken), str(out), job.FeatureConfig(model="tiny_video", batch_size=4), progress=False)
    rejects = json.loads((out / "rejects.json").read_text())
    assert [r["name"] for r in rejects] == [f"{take_uid}_aria01_rgb"]
    assert take_uid in rejects[0]["reason"] and "ego" in rejects[0]["reason"]
    assert stage["take_views"] == 14 and stage["rejects"] == 1
    assert not (out / f"{take_uid}_aria01_rgb.pt").exists()
    clean = _load_all(features)
    for name, tensor in _load_all(out).items():   # batches differ from the clean run's: float tolerance
        np.testing.assert_allclose(tensor.numpy(), clean[name].numpy(), rtol=0, atol=1e-5)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session and wait until none runs: Ray's workers (the feature
    writers among them) have process groups of their own, so killing the driver's group alone
    could leave a writer finishing a file after the test has looked."""
    def running() -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()   # state ppid pgrp session ...
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids

    deadline = time.time() + 30
    while (pids := running()) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not running()


def test_rerun_after_a_killed_driver_skips_finished_outputs(shards, features, tmp_path):
    # One take per shard: take views finish shard by shard, so a kill at the first .pt usually
    # lands mid-job. Ray Data may hand the driver several shards' outputs at once, so a kill that
    # came too late is tried again in a fresh folder.
    assert len(json.loads((shards / "stage.json").read_text())["result"]["shards"]["train"]) == 3
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        cmd = [sys.executable, "-m", "engine", "features", str(shards), str(out), "--model", "tiny_video",
               "--batch-size", "1"]
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while not list(out.glob("*.pt")) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.02)
        _kill_session(driver.pid)   # the driver and the Ray processes it started
        driver.wait()
        finished = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.pt")}
        if 0 < len(finished) < 15:
            break
    assert 0 < len(finished) < 15 and json.loads((out / "stage.json").read_text())["status"] == "running"

    stage = job.run(str(shards), str(out), job.FeatureConfig(model="tiny_video", batch_size=4), progress=False)
    assert stage["written_this_run"] == 15 - len(finished) and stage["take_views"] == 15
    assert {p.stem: p.stat().st_mtime_ns for p in out.glob("*.pt") if p.stem in finished} == finished
    clean = _load_all(features)
    got = _load_all(out)
    assert sorted(got) == sorted(clean)
    for name in got:
        np.testing.assert_allclose(got[name].numpy(), clean[name].numpy(), rtol=0, atol=1e-5)
    assert pq.read_table(str(out / "parquet")).num_rows == 15 * 3
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- S3 and two nodes

def test_s3_shards_in_s3_features_out(shards, features, s3_endpoint, local_ray):
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("feat")
    fs.put(str(shards), "feat/shards", recursive=True)
    job.run("s3://feat/shards", "s3://feat/tiny_video", job.FeatureConfig(model="tiny_video"), storage_options=options,
            progress=False)
    for name, tensor in _load_all(features).items():
        remote = torch.load(io.BytesIO(fs.cat_file(f"feat/tiny_video/{name}.pt")), weights_only=True)
        np.testing.assert_allclose(remote.numpy(), tensor.numpy(), rtol=0, atol=1e-5)
    assert json.loads(fs.cat_file("feat/tiny_video/stage.json"))["result"]["take_views"] == 15


def test_weights_by_url_are_read_on_the_model_actor_and_checked_by_sha256(shards, features, s3_endpoint, tmp_path):
    """Weights on the S3 server, never on this machine's disk: the actor reads them by URL; a
    wrong sha256 or a missing object stops the command before any work."""
    import s3fs

    model = models.build(TINY_VIDEO)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)                    # weights that give other features than the default
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    fs.mkdir("models")
    fs.pipe_file("models/tiny.pt", buf.getvalue())
    sha = hashlib.sha256(buf.getvalue()).hexdigest()

    def features_cli(out, *flags):
        return subprocess.run([sys.executable, "-m", "engine", "features", str(shards), str(out), "--model",
                               "tiny_video", *flags], capture_output=True, text=True, env=dict(os.environ))

    wrong = features_cli(tmp_path / "wrong", "--weights", "s3://models/tiny.pt", "--weights-sha256", "0" * 64)
    assert wrong.returncode == 2 and f"s3://models/tiny.pt: sha256 is {sha}, expected {'0' * 64}" in wrong.stderr
    missing = features_cli(tmp_path / "missing", "--weights", "s3://models/absent.pt")
    assert missing.returncode == 2 and "weights file not found: s3://models/absent.pt" in missing.stderr
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "missing").exists()

    ok = features_cli(tmp_path / "s3", "--weights", "s3://models/tiny.pt", "--weights-sha256", sha)
    assert ok.returncode == 0, ok.stderr[-3000:]
    got, default = _load_all(tmp_path / "s3"), _load_all(features)
    assert sorted(got) == sorted(default)
    expected_model = job.Embedder(models.ModelSpec("tiny_video", "video", 8, 64).to_json())
    expected_model.model.load_state_dict(model.state_dict())
    release = Release.open(json.loads((shards / "stage.json").read_text())["inputs"]["release"]["url"])
    take = release.takes()[0]
    view = take.views("448")[0]
    expected = job.features_from_release(release, take, view, job.FeatureConfig(model="tiny_video"), expected_model)
    np.testing.assert_allclose(got[feature_name(take.take_uid, view)].numpy(), expected, rtol=0, atol=1e-5)
    assert not np.allclose(got[feature_name(take.take_uid, view)].numpy(), default[feature_name(take.take_uid, view)].numpy())
    assert json.loads((tmp_path / "s3" / "stage.json").read_text())["result"]["weights_sha256"] == sha


@pytest.mark.parametrize("gpu_node", [False, True], ids=["cpu-nodes", "gpu-node"])
def test_two_node_cluster(shards, features, tmp_path, gpu_node):
    """One CPU per node: the model actor holds one node's CPU, so decoding runs on the other.
    With a node that declares a GPU (no real one is needed) and ``use_gpu``, the actors ask for
    GPU shares: only that node can hold them, and the job finishes only if it placed them there."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1 if gpu_node else 0)
    config = job.FeatureConfig(model="tiny_video", use_gpu=True, gpus_per_actor=0.5) if gpu_node else \
        job.FeatureConfig(model="tiny_video")
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        head = ray.get_runtime_context().get_node_id()
        stage = job.run(str(shards), str(tmp_path / "out"), config, progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    clean = _load_all(features)
    got = _load_all(tmp_path / "out")
    assert sorted(got) == sorted(clean)
    for name in got:
        np.testing.assert_allclose(got[name].numpy(), clean[name].numpy(), rtol=0, atol=1e-5)
    # Windows embedded on either node went to the writer, a worker process on the driver's node.
    assert [(w["node"], w["take_views"]) for w in stage["writers"]] == [(head, 15)] and stage["writers"][0]["pid"] != os.getpid()


def test_a_worker_node_lost_mid_stage_leaves_features_equal_to_a_clean_run(shards, features, tmp_path):
    """The worker node's raylet is killed while take views are being embedded. Ray Data retries
    the lost tasks and restarts the lost actors on the head node, or the stage fails without
    committing and the same command finishes it; either way the outputs equal a clean run."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    out = tmp_path / "out"
    config = job.FeatureConfig(model="tiny_video", batch_size=1)
    at_kill = []

    def kill_the_worker_node_once_outputs_appear():
        deadline = time.time() + 180
        while not list(out.glob("*.pt")) and time.time() < deadline:
            time.sleep(0.02)
        at_kill.append(len(list(out.glob("*.pt"))))
        cluster.remove_node(worker, allow_graceful=False)      # kills its raylet and its workers

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        killer = threading.Thread(target=kill_the_worker_node_once_outputs_appear)
        killer.start()
        try:
            job.run(str(shards), str(out), config, progress=False)
            outcome = "finished on the surviving node"
        except Exception as e:          # the stage failed: nothing committed, the rerun finishes it
            assert json.loads((out / "stage.json").read_text())["status"] == "running"
            outcome = f"failed ({type(e).__name__}), rerun"
            killer.join()
            job.run(str(shards), str(out), config, progress=False)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"worker node killed with {at_kill[0]} of 15 take views written: {outcome}")
    assert 0 < at_kill[0] < 15
    clean, got = _load_all(features), _load_all(out)
    assert sorted(got) == sorted(clean)
    for name in got:
        np.testing.assert_allclose(got[name].numpy(), clean[name].numpy(), rtol=0, atol=1e-5)
    assert json.loads((out / "stage.json").read_text())["status"] == "done"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
