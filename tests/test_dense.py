"""Dense annotations as npz arrays (engine.shards.dense): round trips against the miniature release's own files, sizes.

Tolerances: pose keypoints and ego extrinsics are float32, so each value comes back within half a float32 ulp of the
release's number, |got - want| <= |want| * 2**-24 (relative 6e-8; about 0.1 um at 2 m, 0.1 mpx at 2000 px). Intrinsics,
static extrinsics and distortion are float64 and come back exactly; masks come back pixel for pixel.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json

import lzstring
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from engine.release import Release, masks
from engine.shards import dense
from engine.shards.sample import _take_annotations

FPS = 30
FLOAT32_REL = 2.0 ** -24
WINDOW_8S = 8 * FPS


@dataclasses.dataclass
class Take:
    uid: str
    split: str
    num_frames: int
    ann: dict
    relations_entry: dict
    release_bytes: int      # its ego_pose JSON files plus its share of relations_<split>.json
    dense: dense.TakeDense


@pytest.fixture(scope="module")
def takes(tiny_release) -> list[Take]:
    """Every take of the miniature with body and hand pose (manual and automatic), camera pose and relations."""
    release = Release.open(str(tiny_release))
    splits = release.splits()
    out = []
    for take in release.takes():
        split = splits.take_uid_to_split[take.take_uid]
        problems = []
        ann = _take_annotations(release, take, split, problems)
        assert not problems
        if not all(k in ann for k in (*dense.POSE_FAMILIES, dense.CAMERA_POSE, dense.RELATIONS)):
            continue
        entry = release.read_json(f"annotations/relations_{split}.json")["annotations"][take.take_uid]
        files = [f"annotations/ego_pose/{split}/{part}/{kind}/{take.take_uid}.json"
                 for part in ("body", "hand") for kind in ("annotation", "automatic")]
        files.append(f"annotations/ego_pose/{split}/camera_pose/{take.take_uid}.json")
        size = sum(release.fs.size(release.path(f)) for f in files) + len(json.dumps(entry))
        out.append(Take(take.take_uid, split, round(take.duration_sec * FPS), ann, entry, size,
                        dense.TakeDense.from_annotations(ann)))
    assert len(out) >= 2, "the miniature should have takes with every dense annotation"
    return out


def windows(num_frames: int, size: int) -> list[tuple[int, int]]:
    """Back-to-back windows; the last one is short when ``size`` does not divide the take."""
    return [(f0, min(f0 + size, num_frames)) for f0 in range(0, num_frames, size)]


def read(parts) -> tuple[dict, dict]:
    members = {member: data for member, data, _ in parts}
    descriptions = json.loads(json.dumps({d["family"]: d for _, _, d in parts}))   # as a sample's JSON would hold them
    return dense.read_window(members, descriptions), descriptions


def close(got: float, want: float) -> bool:
    return abs(got - want) <= abs(want) * FLOAT32_REL


# 25 frames: three windows per 2 s take, the last one 10 frames; 8 s: one short window per take.
@pytest.mark.parametrize("size", [25, WINDOW_8S])
def test_pose_round_trip(takes, size):
    worst = worst2d = 0.0
    for take in takes:
        seen = {family: set() for family in dense.POSE_FAMILIES}
        for f0, f1 in windows(take.num_frames, size):
            arrays, descriptions = read(take.dense.window(f0, f1))
            for family in dense.POSE_FAMILIES:
                raw = {int(f): v[0] for f, v in take.ann[family].items() if f0 <= int(f) < f1}
                if not raw:
                    assert family not in descriptions
                    continue
                got = dense.pose_frames(arrays[family], descriptions[family])
                assert set(got) == set(raw)
                seen[family] |= set(got)
                for frame, entry in raw.items():
                    want3d, got3d = entry["annotation3D"], got[frame]["annotation3D"]
                    assert set(got3d) == set(want3d)   # absent joints are NaN in the arrays and absent here
                    for joint, p in want3d.items():
                        assert all(close(got3d[joint][axis], p[axis]) for axis in "xyz"), (family, frame, joint)
                        worst = max(worst, *(abs(got3d[joint][axis] - p[axis]) for axis in "xyz"))
                        assert got3d[joint]["num_views_for_3d"] == p["num_views_for_3d"]
                    want2d, got2d = entry["annotation2D"], got[frame]["annotation2D"]
                    assert set(got2d) == set(want2d)
                    for cam, points in want2d.items():
                        assert set(got2d[cam]) == set(points)
                        for joint, p in points.items():
                            q = got2d[cam][joint]
                            assert close(q["x"], p["x"]) and close(q["y"], p["y"]), (family, frame, cam, joint)
                            worst2d = max(worst2d, abs(q["x"] - p["x"]), abs(q["y"] - p["y"]))
                            assert q["placement"] == p["placement"]
                # NaN exactly where the release has no value
                a = arrays[family]
                joints, cameras = descriptions[family]["joints"], descriptions[family]["cameras"]
                for row, frame in enumerate(a["frames"].tolist()):
                    for j, joint in enumerate(joints):
                        assert np.isnan(a["joints3d"][row, j]).all() == (joint not in raw[frame]["annotation3D"])
                        for c, cam in enumerate(cameras):
                            absent = joint not in raw[frame]["annotation2D"].get(cam, {})
                            assert np.isnan(a["joints2d"][row, c, j]).all() == absent
        for family in dense.POSE_FAMILIES:   # the windows together hold every annotated frame once
            assert seen[family] == {int(f) for f in take.ann[family]}
    print(f"\npose round trip, {size}-frame windows: max |error| of 3D {worst:.2e} m, of 2D {worst2d:.2e} px")


def test_joint_order_is_the_official_one(takes):
    take = takes[0]
    _, descriptions = read(take.dense.window(0, take.num_frames))
    assert descriptions["ego_pose_body_annotation"]["joints"][:3] == ["nose", "left-eye", "right-eye"]
    assert len(descriptions["ego_pose_body_annotation"]["joints"]) == 17
    hand = descriptions["ego_pose_hand_automatic"]["joints"]
    assert len(hand) == 42 and hand[0] == "left_wrist" and hand[21] == "right_wrist"
    # The miniature writes one placement per file ("manual" / "auto"): kept once in the description, no array.
    assert descriptions["ego_pose_body_annotation"]["placement"] == "manual"
    assert descriptions["ego_pose_body_automatic"]["placement"] == "auto"
    assert "placement" not in descriptions["ego_pose_body_annotation"]["arrays"]


@pytest.mark.parametrize("size", [25, WINDOW_8S])
def test_masks_decode_exactly(takes, size):
    count = unmasked = 0
    for take in takes:
        relations = take.ann["relations"]
        object_masks = relations.object_masks
        for f0, f1 in windows(take.num_frames, size):
            arrays, descriptions = read(take.dense.window(f0, f1))
            want = [(obj, view, frame, m) for obj, views in object_masks.items() for view, frames in views.items()
                    for frame, m in frames.items() if f0 <= frame < f1]
            # Annotated frames without a mask: the object does not show in that view.
            want_unmasked = sorted((frame, obj, view) for obj, views in relations.annotated_frames.items()
                                   for view, frames in views.items() for frame in frames
                                   if f0 <= frame < f1 and frame not in object_masks[obj][view])
            if not want and not want_unmasked:
                assert "relations" not in descriptions
                continue
            rel, description = arrays["relations"], descriptions["relations"]
            assert len(rel["frames"]) == len(want)
            for obj, view, frame, m in want:
                # The reference decode: the lzstring package, then pycocotools (the engine decodes both itself).
                counts = lzstring.LZString().decompressFromEncodedURIComponent(m.encoded)
                expected = coco_mask.decode({"size": [m.height, m.width], "counts": counts.encode()}).astype(bool)
                assert np.array_equal(m.decode(), expected)
                assert np.array_equal(dense.mask(rel, description, obj, view, frame), expected)
                count += 1
                inverse = masks.mask_runs(~expected)   # starts with a set pixel: an empty first run of zeros
                assert inverse[0] == 0 and np.array_equal(masks.runs_to_mask(inverse, *expected.shape), ~expected)
            assert sorted(zip(rel["unmasked_frames"].tolist(),
                              (description["objects"][o] for o in rel["unmasked_object"]),
                              (description["cameras"][c] for c in rel["unmasked_camera"]))) == want_unmasked
            unmasked += len(want_unmasked)
    assert count > 0 and unmasked > 0


def test_ego_extrinsics_round_trip(takes):
    worst = 0.0
    for take in takes:
        raw = take.ann["camera_pose"]
        ego = [cam for cam, e in raw.items() if cam != "metadata" and isinstance(e["camera_extrinsics"], dict)]
        assert len(ego) == 1
        seen = set()
        for f0, f1 in windows(take.num_frames, 25):
            arrays, descriptions = read(take.dense.window(f0, f1))
            a, description = arrays["camera_pose"], descriptions["camera_pose"]
            got = dense.ego_extrinsics(a, description)
            want = {int(f): np.asarray(m) for f, m in raw[ego[0]]["camera_extrinsics"].items() if f0 <= int(f) < f1}
            assert set(got) == set(want)
            seen |= set(got)
            for frame, m in want.items():
                error = np.abs(got[frame].astype(np.float64) - m)
                assert (error <= np.abs(m) * FLOAT32_REL).all()
                worst = max(worst, float(error.max()))
            # Take-level parts: float64, exact.
            assert description["metadata"] == raw["metadata"]
            for c, cam in enumerate(description["cameras"]):
                assert np.array_equal(a["intrinsics"][c], np.asarray(raw[cam]["camera_intrinsics"]))
                if cam in description["moving_cameras"]:
                    assert np.isnan(a["static_extrinsics"][c]).all()
                else:
                    assert np.array_equal(a["static_extrinsics"][c], np.asarray(raw[cam]["camera_extrinsics"]))
                if "distortion_coeffs" in raw[cam]:
                    assert np.array_equal(a["distortion"][c], np.asarray(raw[cam]["distortion_coeffs"], np.float64))
        assert seen == {int(f) for f in raw[ego[0]]["camera_extrinsics"]}
    print(f"\nego extrinsics round trip: max |error| {worst:.2e} (rotation entries and translation in m)")


def test_every_member_loads_without_pickle_and_matches_its_description(takes):
    for take in takes:
        for f0, f1 in windows(take.num_frames, 25):
            for member, data, description in take.dense.window(f0, f1):
                assert member == description["member"] == f"{description['family']}.npz"
                with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                    assert set(npz.files) == set(description["arrays"])
                    for name, spec in description["arrays"].items():
                        assert str(npz[name].dtype) == spec["dtype"] and list(npz[name].shape) == spec["shape"]
                        assert len(spec["axes"]) == len(spec["shape"])
                json.dumps(description)


def test_a_window_past_the_annotations_keeps_only_the_take_level_camera_pose(takes):
    take = takes[0]
    parts = take.dense.window(take.num_frames, take.num_frames + WINDOW_8S)
    assert [member for member, _, _ in parts] == ["camera_pose.npz"]
    arrays, _ = read(parts)
    assert arrays["camera_pose"]["frames"].shape == (0,) and arrays["camera_pose"]["intrinsics"].shape[0] > 0


def test_sizes_against_the_release_files(takes):
    for size in (WINDOW_8S, 25):
        members = descriptions = uncompressed = 0
        for take in takes:
            for f0, f1 in windows(take.num_frames, size):
                parts = take.dense.window(f0, f1)
                members += sum(len(data) for _, data, _ in parts)
                for _, data, _ in parts:   # what np.savez (no deflate) would have written
                    buf = io.BytesIO()
                    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                        np.savez(buf, **{name: npz[name] for name in npz.files})
                    uncompressed += len(buf.getvalue())
                descriptions += sum(len(json.dumps(d)) for _, _, d in parts)
        release = sum(t.release_bytes for t in takes)
        ratio = members / release
        print(f"\n{size}-frame windows: npz members {members} B + descriptions {descriptions} B "
              f"for {release} B of release JSON: ratio {ratio:.3f} ({(members + descriptions) / release:.3f} with descriptions); "
              f"np.savez would write {uncompressed} B ({uncompressed / members:.2f}x)")
        assert (members + descriptions) / release <= 0.5


def test_placement_codes_and_annotated_frames_without_mask(takes):
    """Two things the miniature never writes, made from a real take's data: placement varying per joint and
    camera, and an annotated frame where the object has no mask."""
    take = takes[0]
    ann = dict(take.ann)
    raw = copy.deepcopy(take.ann["ego_pose_body_annotation"])
    for f, entries in raw.items():
        for cam, points in entries[0]["annotation2D"].items():
            for k, joint in enumerate(sorted(points)):
                points[joint]["placement"] = "auto" if (k + int(f) + len(cam)) % 3 == 0 else "manual"
    ann["ego_pose_body_annotation"] = raw
    relations = take.ann["relations"]
    obj = sorted(relations.object_masks)[0]
    view = sorted(relations.object_masks[obj])[0]
    dropped = min(relations.object_masks[obj][view])
    object_masks = copy.copy(relations.object_masks)
    object_masks[obj] = dict(object_masks[obj], **{view: {f: m for f, m in object_masks[obj][view].items() if f != dropped}})
    # The frame stays in annotated_frames: annotated, object not visible.
    ann["relations"] = dataclasses.replace(relations, object_masks=object_masks)

    arrays, descriptions = read(dense.TakeDense.from_annotations(ann).window(0, take.num_frames))
    description = descriptions["ego_pose_body_annotation"]
    assert sorted(description["placement_codes"]) == ["auto", "manual"] and "placement" in description["arrays"]
    got = dense.pose_frames(arrays["ego_pose_body_annotation"], description)
    for f, entries in raw.items():
        for cam, points in entries[0]["annotation2D"].items():
            assert {j: p["placement"] for j, p in got[int(f)]["annotation2D"][cam].items()} == \
                   {j: p["placement"] for j, p in points.items()}
    rel, description = arrays["relations"], descriptions["relations"]
    assert list(zip(rel["unmasked_frames"].tolist(), rel["unmasked_object"].tolist(), rel["unmasked_camera"].tolist())) == \
           [(dropped, description["objects"].index(obj), description["cameras"].index(view))]
    with pytest.raises(KeyError):
        dense.mask(rel, description, obj, view, dropped)
