"""The miniature release: layout, frame stamps, determinism, and learnable labels."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import av
import numpy as np
import pytest

from engine.cli import main
from engine.miniature import synth
from engine.miniature.stamp import draw_stamp, read_stamp
from engine.release import Release
from engine.release.catalog import PROFICIENCY_LEVELS
from engine.video import VideoWriter, decode, probe

LAYOUT = [
    "takes.json", "captures.json", "participants.json", "physical_setting.json", "visual_objects.json",
    "metadata.json", "annotations/splits.json", "annotations/keystep_train.json", "annotations/keystep_val.json",
    "annotations/keystep_benchmark/label_mapping.csv",
    *[f"annotations/keystep_benchmark/keystep_segment_{s}.json" for s in ("train", "val", "test_unannotated")],
    *[f"annotations/procedure_understanding_{s}.json" for s in ("train", "val", "test_unannotated")],
    *[f"annotations/{b}_{s}.json" for b in ("proficiency_demonstrator", "proficiency_demonstration",
                                            "atomic_descriptions", "expert_commentary") for s in ("train", "val")],
    *[f"annotations/relations_{s}.json" for s in ("train", "val", "test")],
]


def test_layout_is_the_real_one(default_release):
    for relative in LAYOUT:
        assert (default_release / relative).is_file(), relative
    release = Release.open(str(default_release))
    for take in release.takes():
        base = default_release / take.root_dir
        for name in ("aria01_214-1.mp4", "cam01.mp4", "cam02.mp4", "cam03.mp4", "cam04.mp4"):
            assert (base / "frame_aligned_videos" / name).is_file()
            assert (base / "frame_aligned_videos/downscaled/448" / name).is_file()
        for name in ("trajectory/closed_loop_trajectory.csv", "trajectory/gopro_calibs.csv",
                     "eye_gaze/general_eye_gaze.csv", "audio/aria01.wav"):
            assert (base / name).is_file()
        split = release.splits().take_uid_to_split[take.take_uid]
        assert (default_release / f"annotations/ego_pose/{split}/camera_pose/{take.take_uid}.json").is_file()
        for part in ("body", "hand"):
            for kind in ("annotation", "automatic"):
                assert (default_release / f"annotations/ego_pose/{split}/{part}/{kind}/{take.take_uid}.json"
                        ).is_file() == (split != "test")
        assert (default_release / "captures" / take.raw["capture"]["capture_name"] / "timesync.csv").is_file()


def test_videos_are_h264_with_equal_frames_and_ego_audio(default_release):
    release = Release.open(str(default_release))
    take = release.takes()[0]
    for resolution, short in (("full", None), ("448", 448)):
        infos = {v.key: probe(str(default_release / v.path)) for v in take.views(resolution)}
        assert len({i.frames for i in infos.values()}) == 1 and infos["cam01"].frames == 120
        assert all(i.codec == "h264" and i.fps == 30 for i in infos.values())
        assert infos["aria01_214-1"].has_audio and not infos["cam01"].has_audio
        if short:
            assert all(min(i.width, i.height) == 448 for i in infos.values())
    with av.open(str(default_release / take.views()[1].path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"


@pytest.mark.parametrize("resolution", ["full", "448"])
def test_stamp_of_every_decoded_frame_is_its_index(default_release, resolution):
    release = Release.open(str(default_release))
    for take in release.takes()[:3]:
        for view in take.views(resolution):
            indices = [read_stamp(rgb) for _, rgb in decode(str(default_release / view.path))]
            assert indices == list(range(len(indices))) and len(indices) == 120, view.path


def test_stamp_roundtrip_and_rejection():
    rng = np.random.default_rng(0)
    for index in (0, 1, 12345, 2**20 - 1):
        img = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
        draw_stamp(img, index)
        assert read_stamp(img) == index
    with pytest.raises(ValueError):
        read_stamp(np.full((448, 448, 3), 128, np.uint8))
    with pytest.raises(ValueError):
        read_stamp(np.zeros((448, 448, 3), np.uint8))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    """Same seed, same release, every file byte for byte (videos included), whichever worker
    process encodes which take: with x264's macroblock-tree rate control, a take's video bytes
    depended on what its process had encoded before."""
    assert main(["synth", str(tmp_path / "a"), "--preset", "tiny", "--takes", "3", "--seconds", "1",
                 "--seed", "7"]) == 0
    synth.generate(tmp_path / "b", preset="tiny", takes=3, seconds=1.0, seed=7, workers=1)   # one process, in turn
    synth.generate(tmp_path / "c", preset="tiny", takes=2, seconds=1, seed=8)
    a = _digests(tmp_path / "a")
    assert sum(name.endswith(".mp4") for name in a) >= 3 * 6
    assert a == _digests(tmp_path / "b")
    assert a["takes.json"] != _digests(tmp_path / "c")["takes.json"]


def test_encoding_the_same_frames_again_gives_the_same_bytes():
    """The writer behind the miniature and transcoded shards, fed as the miniature feeds it
    (label images with a palette), encoding the same frames ten times in one process: with
    x264's macroblock-tree rate control the third encode already differed."""
    rng = np.random.default_rng(0)
    palette = np.zeros((256, 4), np.uint8)
    palette[:, 0], palette[:, 1:] = 255, rng.integers(0, 255, (256, 3))
    labels = [np.kron(rng.integers(0, 8, (28, 28), dtype=np.uint8), np.ones((16, 16), np.uint8)) for _ in range(60)]
    encoded = set()
    for _ in range(10):
        buf = io.BytesIO()
        with VideoWriter(buf, 448, 448) as writer:
            for label in labels:
                writer.write(av.VideoFrame.from_ndarray((label, palette), format="pal8"))
        encoded.add(hashlib.sha1(buf.getvalue()).hexdigest())
    assert len(encoded) == 1


def test_plans_have_unique_real_style_names():
    plans = synth.plan_release(200, 3.0, seed=0)
    assert len({p.take_uid for p in plans}) == 200
    assert len({p.take_name for p in plans}) > 150
    for p in plans[:20]:
        university, *_, take_idx = p.take_name.split("_")
        assert p.take_name.startswith(p.capture_name + "_") and take_idx.isdigit()


# ----------------------------------------------------------------------------- learnability

def _ego_frames(release: Release, take) -> np.ndarray:
    view = take.views("448")[0]
    with release.open_file(view.path) as f:
        return np.stack([rgb for _, rgb in decode(f, size=(160, 160))])


def _colour_histogram(frames: np.ndarray) -> np.ndarray:
    """Share of pixels in each of 64 RGB cells, counting saturated pixels only."""
    f = frames.astype(np.float32) / 255
    top, low = f.max(-1), f.min(-1)
    keep = ((top - low) / (top + 1e-6) > 0.5) & (top > 0.3)
    q = np.minimum((f * 4).astype(np.int64), 3)
    cells = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    return np.bincount(cells[keep], minlength=64) / keep.size


def _nearest_centroid(train_x, train_y, test_x):
    labels = sorted(set(train_y))
    centroids = np.stack([np.mean([x for x, y in zip(train_x, train_y) if y == c], axis=0) for c in labels])
    distances = ((np.asarray(test_x)[:, None, :] - centroids[None]) ** 2).sum(-1)
    return [labels[i] for i in distances.argmin(1)]


def _majority_rate(train_y, val_y) -> float:
    majority = max(set(train_y), key=list(train_y).count)
    return float(np.mean([y == majority for y in val_y]))


def test_keystep_and_proficiency_are_learnable_from_simple_clip_statistics(learn_release):
    """A nearest-centroid classifier on per-clip colour and motion statistics of the ego video.

    Keystep: colour histogram of a segment minus its take's mean (the held object's colour).
    Proficiency: log mean absolute frame difference per 1 s clip (camera shake).
    Clear margin: keystep at least twice the majority class and 25 points above it;
    proficiency 15 points above the majority class.
    """
    release = Release.open(str(learn_release))
    data = {s: {"ks_x": [], "ks_y": [], "pr_x": [], "pr_y": []} for s in ("train", "val")}
    level = {d.take_uid: d.proficiency_score for s in ("train", "val") for d in release.demonstrator_proficiency(s)}
    for split in ("train", "val"):
        segments = {}
        for seg in release.keystep_segments(split):
            segments.setdefault(seg.take_uid, []).append(seg)
        for uid in release.splits().split_to_take_uids[split]:
            frames = _ego_frames(release, release.take(uid))
            take_mean = _colour_histogram(frames)
            for seg in segments.get(uid, []):
                clip = frames[int(seg.start_time * 30):int(seg.end_time * 30)]
                data[split]["ks_x"].append(_colour_histogram(clip) - take_mean)
                data[split]["ks_y"].append(seg.label_id)
            gray = frames.mean(-1)
            for start in range(0, len(frames) - 30 + 1, 30):
                diff = np.abs(np.diff(gray[start:start + 30], axis=0)).mean()
                data[split]["pr_x"].append([np.log(diff)])
                data[split]["pr_y"].append(PROFICIENCY_LEVELS.index(level[uid]))
    train, val = data["train"], data["val"]
    assert len(val["ks_y"]) >= 10 and len(val["pr_y"]) >= 20

    ks_pred = _nearest_centroid(train["ks_x"], train["ks_y"], val["ks_x"])
    ks_acc = np.mean([p == y for p, y in zip(ks_pred, val["ks_y"])])
    ks_major = _majority_rate(train["ks_y"], val["ks_y"])
    pr_pred = _nearest_centroid(train["pr_x"], train["pr_y"], val["pr_x"])
    pr_acc = np.mean([p == y for p, y in zip(pr_pred, val["pr_y"])])
    pr_major = _majority_rate(train["pr_y"], val["pr_y"])
    print(f"keystep top-1 {ks_acc:.2f} vs majority {ks_major:.2f} on {len(ks_pred)} val segments; "
          f"proficiency {pr_acc:.2f} vs majority {pr_major:.2f} on {len(pr_pred)} val clips")
    assert ks_acc >= max(2 * ks_major, ks_major + 0.25)
    assert pr_acc >= pr_major + 0.15
