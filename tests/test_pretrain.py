"""Pretraining on clips streamed from the shards: the order, the loader, the loop, the outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from engine import stage as stages
from engine.miniature import synth
from engine.miniature.stamp import read_stamp
from engine.pretrain import data, loop
from engine.pretrain.stage import PretrainConfig, run
from engine.shards import job as shard_job
from engine.shards.plan import ShardConfig


def test_every_sample_is_seen_once_per_epoch_across_workers():
    samples, workers, seed = 11, 3, 7
    per = data.rows_per_epoch(samples, workers)
    for epoch in range(3):
        seen = [data.row_sample(epoch * per + k, samples, workers, rank, seed)
                for rank in range(workers) for k in range(per)]
        assert {e for e, _ in seen} == {epoch}
        counts = np.bincount([s for _, s in seen], minlength=samples)
        # 12 rows for 11 samples: every sample once, one of them twice (the padding).
        assert counts.min() == 1 and counts.sum() == per * workers and (counts == 2).sum() == per * workers - samples
    first = [data.row_sample(k, samples, workers, 0, seed)[1] for k in range(per)]
    second = [data.row_sample(per + k, samples, workers, 0, seed)[1] for k in range(per)]
    assert first != second                                               # reshuffled every epoch
    assert first == [data.row_sample(k, samples, workers, 0, seed)[1] for k in range(per)]   # and repeatable


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [loop.lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.001


def test_retrieval_scores_a_perfect_and_a_useless_embedding_against_chance():
    rng = np.random.default_rng(0)
    moments, cams = 12, 3
    takes = [f"take{i // 4}" for i in range(moments)]        # 3 takes of 4 moments
    z_moment = rng.normal(size=(moments, 16))
    z_moment /= np.linalg.norm(z_moment, axis=1, keepdims=True)
    sample = np.concatenate([np.arange(moments), np.repeat(np.arange(moments), cams)])
    is_ego = np.concatenate([np.ones(moments), np.zeros(moments * cams)])
    perfect = loop.retrieval({"z": z_moment[sample], "sample": sample, "is_ego": is_ego}, takes)
    assert perfect["top1"] == 1.0 and perfect["top1_same_take"] == 1.0
    assert perfect["chance_top1"] == pytest.approx(cams / (moments * cams))
    assert perfect["chance_top1_same_take"] == pytest.approx(1 / 4)
    assert perfect["queries"] == moments and perfect["gallery"] == moments * cams
    useless = loop.retrieval({"z": np.ones((len(sample), 16)), "sample": sample, "is_ego": is_ego}, takes)
    assert useless["top1"] <= 1 / moments + 1e-9   # ties rank in gallery order: only moment 0's query hits


def test_fsdp_shards_the_encoder_blocks_and_can_evaluate_before_it_trains(tmp_path):
    """One process (world 1): the sharding policy, the 0-d temperature kept whole, evaluation
    through the root's forward before any training step (FSDP picks its root at the first
    forward), the same numbers and state-dict names as the plain network."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    config = PretrainConfig()
    plain, _ = loop.build_net(config, config.model_spec())
    net, _ = loop.build_net(config, config.model_spec())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loop.shard(net, init_device_mesh("cpu", (1,)))
        assert [name for name, m in net.named_modules() if isinstance(m, FSDPModule)] == [
            "", "encoder.net.0", "encoder.net.2", "encoder.net.4", "encoder.net.8"]
        assert isinstance(net.heads.ego[0].weight, DTensor) and not isinstance(net.heads.logit_scale, DTensor)
        assert [len(g["params"]) for g in loop.param_groups(net)] == [len(list(net.parameters())) - 1, 1]
        clips = torch.randint(0, 256, (4, 8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        is_ego = torch.tensor([True, False, True, False])
        with torch.no_grad():
            assert torch.equal(net(clips, is_ego=is_ego), plain(clips, is_ego=is_ego))
        loss = net(clips[:2], clips[2:])
        loss.backward()
        assert torch.equal(loss, plain(clips[:2], clips[2:]))
        weights = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        assert weights.keys() == plain.state_dict().keys()
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in weights.items())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def stamp_shards(tiny_release, tmp_path_factory, local_ray) -> Path:
    """Remux shards of the tiny release (3 takes of 2 s, 448), 1 s windows."""
    out = tmp_path_factory.mktemp("stamp_shards")
    shard_job.run(str(tiny_release), str(out), ShardConfig(window=1.0, shard_mb=2), progress=False)
    return out


def test_one_range_read_gives_the_sample_webdataset_reads(stamp_shards):
    index = data.sample_index(str(stamp_shards), "train")
    assert index
    by_key = {}
    for tar in sorted((stamp_shards / "train").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            by_key[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    assert len(by_key) == len(index)
    for ref in index:
        assert data.read_sample(ref) == by_key[ref.key]


def test_streamed_batches_keep_ego_and_exo_on_the_same_frame(stamp_shards, local_ray):
    """Every row of every batch: the frame stamps drawn into the ego and exo pixels agree with
    each other and with the frame columns (crop "pad" keeps the whole frame, stamp included)."""
    index = data.sample_index(str(stamp_shards), "train")
    spec = data.ClipSpec(frames=4, stride=3, size=448, crop="pad")
    per = data.rows_per_epoch(len(index), 1)
    stream = data.train_stream(index, spec, workers=1, rank=0, seed=3, start=0, rows=2 * per)
    rows = 0
    for batch in stream.iter_torch_batches(batch_size=4):
        for b in range(len(batch["sample"])):
            assert batch["ego_frames"][b].tolist() == batch["exo_frames"][b].tolist()
            exo_rows = 448 * 448 // 796    # the exo frame's height once its long side is 448
            for t, frame in enumerate(batch["ego_frames"][b].tolist()):
                assert read_stamp(batch["ego"][b, t].numpy()) == frame
                assert read_stamp(batch["exo"][b, t, :exo_rows].numpy()) == frame
            rows += 1
    assert rows == 2 * per


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def train_shards(tmp_path_factory, local_ray) -> Path:
    """60 takes of 2 s (36 train, 12 val), one sample per take: the val retrieval then asks
    which take an ego clip shows, and 12 queries against 48 exo clips keep top-1 well apart
    from chance. The shards are cut for training: re-encoded at a 96-pixel short side with a
    keyframe every 8 frames, so a random clip decodes few frames."""
    root = tmp_path_factory.mktemp("pretrain_release")
    synth.generate(root / "release", preset="tiny", takes=60, seconds=2.0, seed=8)
    out = root / "shards"
    shard_job.run(str(root / "release"), str(out), ShardConfig(window=2.0, mode="transcode", short_side=96, gop=8,
                                                                shard_mb=4), progress=False)
    return out


@pytest.fixture(scope="module")
def pretrained(train_shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrained") / "run"
    result = run(str(train_shards), str(out), PretrainConfig(epochs=30, batch_size=16, lr=3e-3), progress=False)
    return out, result


def test_pretraining_learns_cross_view_retrieval(pretrained):
    """Measured here (seeds 0 and 1): val top-1 0.67 and 0.58 against a chance of 0.083 (12 ego
    queries, 48 exo clips), top-5 1.0 and 0.83 (chance 0.37); the random-init encoder 0 and 0.08."""
    out, result = pretrained
    after, before = result["retrieval"], result["retrieval_random_init"]
    assert after["queries"] == 12 and after["gallery"] == 48
    assert after["top1"] >= 3 * after["chance_top1"] - 1e-9, (after, before)    # 3 of 12 is 3x chance
    assert after["top1"] > before["top1"] and after["top5"] > before["top5"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, result["steps"] + 1)) and result["resumed_from"] == []
    assert np.mean([h["loss"] for h in history[-10:]]) < 0.8 * np.mean([h["loss"] for h in history[:10]])
    assert all(0 <= h["data_wait"] <= 1 and h["clips_per_s"] > 0 and h["lr"] > 0 for h in history)
    assert json.loads((out / "stage.json").read_text())["status"] == "done"


def test_a_run_killed_after_its_first_checkpoint_resumes_from_it(train_shards, tmp_path):
    out = tmp_path / "run"
    flags = ["--steps", "24", "--batch-size", "8", "--checkpoint-every", "4", "--no-evaluate"]
    driver = subprocess.Popen([sys.executable, "-m", "engine", "pretrain", str(train_shards), str(out), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress = out / loop.PROGRESS
    deadline = time.time() + 240
    # Kill once Ray Train's controller has recorded the checkpoint progress.json names, so that
    # the test knows which checkpoint the rerun restores.
    snapshot = out / "ray" / "run" / "checkpoint_manager_snapshot.json"

    def recorded() -> int:
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    while not (progress.exists() and recorded() >= json.loads(progress.read_text())["step"]) \
            and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)   # the driver and the Ray processes it started
    driver.wait()
    assert progress.exists() and not (out / "result.json").exists()
    checkpointed = recorded()
    # The state a kill in that moment leaves: progress.json one checkpoint ahead of the one Ray
    # Train's snapshot names (and restores). The rerun must take it in its stride.
    progress.write_text(json.dumps({"step": checkpointed + 4, "previous": checkpointed}))

    result = run(str(train_shards), str(out), PretrainConfig(steps=24, batch_size=8, checkpoint_every=4,
                                                                   evaluate=False), progress=False)
    # Checkpoints come every 4 steps and at epoch ends (36 samples, 8 a step: step 5 ends epoch 1).
    assert 0 < checkpointed < 24 and result["resumed_from"] == [checkpointed]
    assert result["steps"] == 24
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_two_workers_on_two_nodes_leave_an_encoder_the_feature_job_runs(train_shards, tmp_path):
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from engine.features import job as feature_job
    from engine.features.store import feature_name
    from engine.features.windows import video_windows
    from engine.release import Release

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    out = tmp_path / "run"
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        result = run(str(train_shards), str(out), PretrainConfig(steps=6, batch_size=8, workers=2,
                                                                      evaluate=False), progress=False)
        # As a graph runs it: features of model "pretrained" read the pretrain stage's output.
        features = stages.run_one("features", feature_job.FeatureConfig(model="pretrained", splits=("val",)),
                                  {"shard": str(train_shards), "pretrain": str(out)}, str(tmp_path / "features"),
                                  progress=False)["result"]
        feature_job.run(str(train_shards), str(tmp_path / "random_init"),
                        feature_job.FeatureConfig(model="tiny_video", splits=("val",)), progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result["workers"] == 2 and result["steps"] == 6
    spec = json.loads((out / "encoder.json").read_text())
    assert spec["model"] == "tiny_video" and spec["dim"] == 240
    assert features["model"]["name"] == f"pretrained:{out}" and features["rejects"] == 0
    release = Release.open(json.loads((train_shards / "stage.json").read_text())["inputs"]["release"]["url"])
    val = set(release.splits().split_to_take_uids["val"])
    names = set()
    for take in release.takes():
        if take.take_uid in val:
            for view in take.views("448"):
                name = feature_name(take.take_uid, view)
                tensor = torch.load(tmp_path / "features" / f"{name}.pt", weights_only=True)
                frames = round(take.duration_sec * 30)
                assert tensor.shape == (len(video_windows(frames)), 240) and torch.isfinite(tensor).all()
                random_init = torch.load(tmp_path / "random_init" / f"{name}.pt", weights_only=True)
                assert not torch.allclose(tensor, random_init)     # the trained weights are the ones used
                names.add(name)
    assert {p.stem for p in (tmp_path / "features").glob("*.pt")} == names


def test_fsdp_trains_as_ddp_does_and_a_run_resumes_across_the_modes(train_shards, tmp_path):
    """Two workers, two micro-batches a step, fp32 on CPU (gloo): FSDP for 4 steps against DDP
    for 2 steps then FSDP resuming that checkpoint to step 4, from the same data and initial
    weights. Measured here: losses and encoder weights bitwise equal (two ranks: a sum of two
    halves has one order), the random-init retrieval too (every rank evaluating under FSDP,
    rank 0 alone under DDP)."""
    import ray
    import torch

    from engine.features import models

    settings = dict(batch_size=8, workers=2, accumulate=2, checkpoint_every=2, lr=3e-3)
    ray.shutdown()
    ray.init(num_cpus=4, log_to_driver=False, include_dashboard=False)   # 1 CPU each worker, 2 decode
    try:
        fsdp = loop.pretrain(str(train_shards), str(tmp_path / "fsdp"),
                             PretrainConfig(steps=4, warmup=0.5, parallel="fsdp", **settings), progress=False)
        # 2 steps, all warm-up: the learning rate it leaves for step 3 is the 4-step runs' one.
        ddp = loop.pretrain(str(train_shards), str(tmp_path / "mixed"),
                            PretrainConfig(steps=2, warmup=1.0, parallel="ddp", **settings), progress=False)
        mixed = loop.pretrain(str(train_shards), str(tmp_path / "mixed"),
                              PretrainConfig(steps=4, warmup=0.5, parallel="fsdp", evaluate=False, **settings),
                              progress=False)
    finally:
        ray.shutdown()

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert fsdp["steps"] == 4 and ddp["steps"] == 2 and mixed["steps"] == 4 and mixed["resumed_from"] == [2]
    np.testing.assert_allclose(losses("fsdp"), losses("mixed"), rtol=0, atol=1e-6)
    assert fsdp["retrieval_random_init"] == ddp["retrieval_random_init"]
    assert fsdp["retrieval"]["queries"] == 12 and fsdp["retrieval"]["gallery"] == 48
    spec = models.resolve(f"pretrained:{tmp_path / 'fsdp'}")
    encoder = models.build(spec)                    # the FSDP run's encoder, as a feature model
    assert encoder(torch.zeros(1, 3, 8, 64, 64)).shape == (1, 240)
    other = torch.load(tmp_path / "mixed" / "encoder.pt", weights_only=True)
    assert max((encoder.state_dict()[k] - v).abs().max().item() for k, v in other.items()) <= 1e-6
    initial = models.build(models.resolve("tiny_video")).state_dict()
    assert not all(torch.equal(encoder.state_dict()[k], v) for k, v in initial.items())


def test_checkpoints_and_metrics_on_s3_read_back_identically(train_shards, s3_endpoint, tmp_path):
    import io

    import s3fs
    import torch

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("pretrain")
    result = run(str(train_shards), "s3://pretrain/run", PretrainConfig(steps=4, batch_size=8, checkpoint_every=2,
                                                                        evaluate=False),
                 storage_options=options, progress=False)
    assert result["steps"] == 4
    checkpoints = sorted(fs.glob("pretrain/run/ray/run/checkpoint_*/state.pt"))
    assert len(checkpoints) == 2          # steps 2 and 4 (two kept)
    state = torch.load(io.BytesIO(fs.cat_file(checkpoints[-1])), weights_only=False)
    assert state["step"] == 4 and state["rows"] == 4 * 8
    metrics = [json.loads(line) for line in fs.cat_file("pretrain/run/metrics.jsonl").decode().splitlines()]
    assert metrics == state["history"]
    encoder = torch.load(io.BytesIO(fs.cat_file("pretrain/run/encoder.pt")), weights_only=True)
    for name, tensor in encoder.items():
        assert torch.equal(tensor, state["model"][f"encoder.{name}"])


def test_a_pretrained_run_is_a_feature_model_and_a_missing_one_is_named(pretrained, tmp_path):
    import torch

    from engine.features import models

    out, _ = pretrained
    spec = models.resolve(f"pretrained:{out}")
    assert (spec.kind, spec.frames, spec.size) == ("video", 8, 64) and spec.weights == f"{out}/encoder.pt"
    encoder = models.build(spec)
    saved = torch.load(out / "encoder.pt", weights_only=True)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in saved.items())
    assert models.weights_digest(spec) != models.weights_digest(models.resolve("tiny_video"))
    # A run continued from it trains the same architecture.
    assert PretrainConfig(model=f"pretrained:{out}").model_spec().weights == f"{out}/encoder.pt"
    with pytest.raises(models.ModelError, match="no encoder.json there"):
        models.resolve(f"pretrained:{tmp_path}")


def test_a_sample_that_does_not_decode_is_named_with_its_shard(stamp_shards, tmp_path):
    import shutil

    broken = tmp_path / "shards"
    shutil.copytree(stamp_shards, broken)
    ref = data.sample_index(str(broken), "train")[0]
    members = data.read_sample(ref)
    start = (broken / "train" / Path(ref.url).name).read_bytes().index(members["ego.mp4"][:64], ref.offset)
    with open(broken / "train" / Path(ref.url).name, "r+b") as f:    # the ego clip's bytes, zeroed
        f.seek(start)
        f.write(bytes(len(members["ego.mp4"])))
    spec = data.ClipSpec(frames=2, stride=1, size=32)
    with pytest.raises(data.SampleError, match=f"sample {ref.key} of take {ref.take_uid} .*{Path(ref.url).name}"):
        data.load(ref, lambda m: data.decode_pair(m, spec, 0, 0, 0), None)
