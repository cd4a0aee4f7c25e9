"""Reading a release: typed records, views, laziness, geometry, masks, and S3."""
from __future__ import annotations

import numpy as np
import pytest
import s3fs

from engine.features.store import view_name
from engine.release import Release
from engine.release.catalog import BODY_JOINTS, HAND_JOINTS
from engine.release.records import parse_take
from engine.video import decode


def test_takes_and_views(default_release):
    release = Release.open(str(default_release))
    takes = release.takes()
    assert len(takes) == 10 and release.problems == []
    scenarios = {t.scenario for t in takes}
    assert scenarios == {"Cooking", "Health", "Bike Repair", "Music", "Basketball", "Rock Climbing", "Soccer", "Dance"}
    for take in takes:
        views = take.views()
        assert [v.key for v in views] == ["aria01_214-1", "cam01", "cam02", "cam03", "cam04"]
        assert views[0].is_ego and not any(v.is_ego for v in views[1:])
        assert [view_name(v) for v in views] == ["aria01_rgb", "cam01_0", "cam02_0", "cam03_0", "cam04_0"]
        for view in views + take.views("448"):
            assert release.exists(view.path), view.path
        assert take.best_exo in {v.cam_id for v in views[1:]}


def test_views_do_not_assume_camera_names():
    entry = {
        "take_uid": "u1", "take_name": "x_1",
        "capture": {"cameras": [{"cam_id": "aria02", "is_ego": True}, {"cam_id": "gp05", "is_ego": False}]},
        "frame_aligned_videos": {
            "aria02": {"rgb": {"stream_id": "214-1", "relative_path": "frame_aligned_videos/aria02_214-1.mp4"},
                       "slam-left": {"stream_id": "1201-1", "relative_path": "frame_aligned_videos/aria02_1201-1.mp4"}},
            "gp05": {"0": {"stream_id": "0", "relative_path": "frame_aligned_videos/gp05.mp4"}},
            "cam07": {"0": {"stream_id": "0", "relative_path": "frame_aligned_videos/cam07.mp4"}},
            "collage": {"0": {"stream_id": "0", "relative_path": "frame_aligned_videos/collage.mp4", "is_collage": True}},
            "best_exo": {"0": {"stream_id": "0", "relative_path": "frame_aligned_videos/gp05.mp4"}},
        }}
    take = parse_take(entry)
    assert [(v.key, v.is_ego) for v in take.views()] == [("aria02_214-1", True), ("cam07", False), ("gp05", False)]
    assert take.views("448")[0].path == "takes/x_1/frame_aligned_videos/downscaled/448/aria02_214-1.mp4"


def test_every_annotation_loads_with_the_split_it_belongs_to(default_release):
    release = Release.open(str(default_release))
    splits = release.splits()
    assert set(splits.take_uid_to_split) == release.take_uids()
    for split in ("train", "val"):
        members = set(splits.split_to_take_uids[split])
        keystep = release.keystep(split)
        assert keystep and set(keystep) <= members
        assert all(seg.end_time > seg.start_time for t in keystep.values() for seg in t.segments)
        assert set(release.atomic_descriptions(split)) == members
        assert set(release.expert_commentary(split)) == members
        assert {d.take_uid for d in release.demonstrator_proficiency(split)} == members
        assert {d.take_uid for d in release.demonstration_proficiency(split)} <= members
        assert set(release.procedure_understanding(split)) == set(keystep)
    demos = release.demonstration_proficiency("train")
    assert demos and all(e.comments for d in demos for e in d.good_executions + d.tips_for_improvement)
    labels = {m.label_id: m for m in release.label_mapping()}
    for split in ("train", "val"):
        for seg in release.keystep_segments(split):
            assert labels[seg.label_id].step_unique_id == seg.step_unique_id
    test_segments = release.keystep_segments("test")
    assert test_segments and all(s.label_id is None for s in test_segments)
    assert {"Cooking", "Health", "Bike Repair"} <= set(release.keystep_taxonomy())
    assert release.problems == []


def test_opening_and_listing_reads_no_annotation(default_release, monkeypatch):
    release = Release.open(str(default_release))
    opened = []
    real_open = release.fs.open
    monkeypatch.setattr(release.fs, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    release.takes()
    release.take(release.takes()[0].take_uid).views()
    assert [p.rsplit("/", 1)[-1] for p in opened] == ["takes.json"]


def _project(points, K, Rt):
    cam = points @ Rt[:, :3].T + Rt[:, 3]
    uv = cam[:, :2] / cam[:, 2:3]
    return uv * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]


@pytest.mark.parametrize("part,names", [("body", BODY_JOINTS), ("hand", HAND_JOINTS)])
def test_3d_keypoints_project_onto_2d_annotations(default_release, part, names):
    release = Release.open(str(default_release))
    checked = 0
    for split in ("train", "val"):
        for uid in release.ego_pose_takes(split, part):
            pose = release.camera_pose(split, uid)
            for kind in ("annotation", "automatic"):
                for frame, ann in release.ego_pose(split, part, uid, kind).items():
                    # A 3D joint is there when at least two views annotated it in 2D.
                    views = {j: sum(j in joints for joints in ann.joints2d.values()) for j in names}
                    assert set(ann.joints3d) == {j for j in names if views[j] >= 2}
                    for cam, joints in ann.joints2d.items():
                        seen = [j for j in joints if j in ann.joints3d]
                        pts = np.array([ann.joints3d[j] for j in seen])
                        uv = _project(pts, pose.intrinsics[cam], pose.world_to_camera(cam, frame))
                        err = np.abs(uv - np.array([joints[j] for j in seen])).max()
                        assert err < 2.0, (uid, frame, cam, err)
                        checked += len(seen)
    assert checked > 1000


def test_aria_camera_and_head_frames_round_trip(default_release):
    """World -> Aria camera with a frame's extrinsics and back; the body pose task's head frame
    sits at the camera centre, gravity aligned, facing where the camera looks."""
    from engine.tasks.ego_pose import HeadTrack, to_head, to_world

    release = Release.open(str(default_release))
    uid = release.ego_pose_takes("val", "body")[0]
    aria = release.take(uid).ego_view.cam_id
    extrinsics = release.camera_pose("val", uid).extrinsics[aria]
    frame, ann = next(iter(release.ego_pose("val", "body", uid).items()))
    world = np.array(list(ann.joints3d.values()))
    m = extrinsics[frame]
    camera = world @ m[:, :3].T + m[:, 3]
    assert np.allclose((camera - m[:, 3]) @ m[:, :3], world, atol=1e-5)    # R orthonormal: back with R^T
    track = HeadTrack.from_extrinsics(extrinsics)
    at = int(track.index([frame])[0])
    assert np.allclose(m[:, :3] @ track.centre[at] + m[:, 3], 0, atol=1e-5)
    head = to_head(world[None], track.centre[at:at + 1], track.yaw[at:at + 1])[0]
    assert np.allclose(to_world(head[None], track.centre[at:at + 1], track.yaw[at:at + 1])[0], world)
    assert np.allclose(head[:, 2], world[:, 2] - track.centre[at, 2])      # z stays up
    forward = track.forward[at]
    assert np.isclose(np.arctan2(forward[1], forward[0]), track.yaw[at])


def test_relations_masks_match_the_rendered_objects(default_release):
    """Each decoded mask covers the pixels of its object's colour in the decoded video frame."""
    release = Release.open(str(default_release))
    ious = []
    for uid, rel in release.relations("train").items():
        take = release.take(uid)
        views = {v.key: v for v in take.views()}
        wanted = {}
        for _obj, per_view in rel.object_masks.items():
            for view, frames in per_view.items():
                for frame, mask in frames.items():
                    wanted.setdefault(view, {}).setdefault(frame, []).append(mask)
        for view, frames in wanted.items():
            with release.open_file(views[view].path) as f:
                decoded = dict(decode(f, indices=set(frames)))
            for frame, masks in frames.items():
                rgb = decoded[frame].astype(np.int32)
                for m in masks:
                    mask = m.decode().astype(bool)
                    assert mask.shape == rgb.shape[:2]
                    colour = np.median(rgb[mask], axis=0)
                    near = np.abs(rgb - colour).sum(axis=2) < 60
                    ys, xs = np.nonzero(mask)
                    box = np.zeros_like(mask)
                    box[max(ys.min() - 8, 0):ys.max() + 9, max(xs.min() - 8, 0):xs.max() + 9] = True
                    seen = near & box
                    ious.append((mask & seen).sum() / (mask | seen).sum())
    assert len(ious) > 50
    assert np.median(ious) > 0.9, np.percentile(ious, [5, 50, 95])


def test_s3_release_reads_like_local(tiny_release, s3_endpoint):
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    fs.mkdir("releases")
    fs.put(str(tiny_release), "releases/mini", recursive=True)
    local = Release.open(str(tiny_release))
    remote = Release.open("s3://releases/mini")   # endpoint and keys from the AWS_* environment
    assert remote.takes() == local.takes()
    assert remote.splits() == local.splits()
    assert remote.keystep("train") == local.keystep("train")
    assert remote.relations("val") == local.relations("val")
    assert remote.demonstrator_proficiency("train") == local.demonstrator_proficiency("train")
    uid = local.ego_pose_takes("train", "body")[0]
    assert remote.ego_pose("train", "body", uid) == local.ego_pose("train", "body", uid)
    for view in local.takes()[0].views() + local.takes()[0].views("448"):
        with remote.open_file(view.path) as r, local.open_file(view.path) as lo:
            assert r.read() == lo.read()
    explicit = Release.open("s3://releases/mini", {"key": "testing", "secret": "testing",
                                                   "endpoint_url": s3_endpoint})
    assert explicit.takes() == local.takes()

    from engine.release.validate import validate
    remote_report, local_report = validate("s3://releases/mini").to_json(), validate(str(tiny_release)).to_json()
    assert remote_report["summary"] == local_report["summary"]
    assert {u: t["views"] for u, t in remote_report["takes"].items()} == \
        {u: t["views"] for u, t in local_report["takes"].items()}
