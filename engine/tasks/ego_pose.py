"""Ego pose benchmarks: body pose from the Aria camera's poses, hand pose from its frames.

Ego body pose (``ego_body_pose``): the 17 COCO body joints in world coordinates (metres) at
every annotated frame, from the ego side only: the Aria camera's poses in the take's
camera_pose file.

Head frame: for a frame f, the origin is the Aria camera's centre and the axes are gravity
aligned (world z is up, as in Aria's world frame): x is the camera's viewing direction on the
horizontal plane, y points left, z up. A body expressed in its head frame does not depend on
where the wearer stands or which way they face, which is what lets a small model learn it.

Examples: one per annotated frame (val: the manual annotation, the frames the official script
scores; train: the manual and, by default, the automatic annotation; test: every frame with an
Aria pose, since the test's frames are not released). Inputs: the head poses at HEAD_OFFSETS
frames around f (position, viewing and image-down directions, all in f's head frame) and the
head's height (world z); with ``ego_features``, also the ego view's feature window nearest f.
Targets: the joints in f's head frame, NaN where the annotation has none; the loss is the mean
distance over the known joints (MPJPE itself).

Submission (official): ``{take_uid: {"take_name": str, "body": {"<frame>": [[x, y, z] x 17]}}}``
in world coordinates. Ground truth: the same shape with NaN for absent joints, as the official
script reads it; a run writes it as official_ground_truth_val.json beside the submission.
Metrics (engine.tasks.metrics.body_pose_errors): MPJPE in cm and MPJVE in m/s, pooled over all
takes and per category of the official script. A missing take or frame is an error, as there
(``lenient``: left out and counted under ``missing``).

Ego hand pose (``ego_hand_pose``): 21 joints per hand (0 wrist, 1-4 thumb, 5-8 index, 9-12
middle, 13-16 ring, 17-20 pinky) in the Aria camera's frame (x_cam = R x_world + t with that
frame's extrinsics), metres, from the ego frames alone. Ground truth, as the official
preparation builds it: a hand is evaluated when at least MIN_VALID_HAND_JOINTS of its 3D joints
are annotated; its other joints are masked. Examples: one per annotated frame, the ego frame
decoded from the release at ``size`` x ``size`` (a small CNN learns from the pixels), targets
both hands (NaN where not evaluated). Submission (official): ``{take_uid: {"<frame>":
{"left_hand_3d": 21x3, "right_hand_3d": 21x3}}}``. Metrics as the official
handpose/evaluation/evaluate.py: per hand instance, MPJPE and PA-MPJPE (similarity Procrustes)
in mm over its valid joints, then the mean over instances; also left and right apart. The
test split, whose frames are not released, gets no submission.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from engine import params as P
from engine.release.catalog import BODY_JOINTS, HAND_JOINTS
from engine.tasks.base import Examples, Task, TrainConfig, affine, build_head, register
from engine.tasks.metrics import MIN_RUN_FRAMES, body_category, body_pose_errors, hand_pose_errors

HEAD_OFFSETS = tuple(range(-30, 31, 5))     # frames around f whose head pose the model sees (+-1 s)
MIN_VALID_HAND_JOINTS = 10                  # a hand with fewer annotated 3D joints is not evaluated
HANDS = ("left", "right")


@dataclasses.dataclass(frozen=True)
class HeadTrack:
    """The Aria camera's trajectory over a take's frames: centres, viewing and image-down
    directions (world), and the heading angle of each frame's head frame."""
    frames: np.ndarray        # [T] sorted frame numbers
    centre: np.ndarray        # [T, 3]
    forward: np.ndarray       # [T, 3]
    down: np.ndarray          # [T, 3]
    yaw: np.ndarray           # [T]

    @staticmethod
    def from_extrinsics(extrinsics: dict[int, np.ndarray]) -> HeadTrack:
        """From world->camera 3x4 matrices [R | t] (x_cam = R x_world + t) per frame."""
        frames = np.asarray(sorted(extrinsics), np.int64)
        m = np.stack([np.asarray(extrinsics[f], np.float64) for f in frames])
        rotation, translation = m[:, :, :3], m[:, :, 3]
        to_world = np.transpose(rotation, (0, 2, 1))            # camera axes as world vectors
        centre = -np.einsum("tij,tj->ti", to_world, translation)
        forward, down = to_world[:, :, 2], to_world[:, :, 1]
        # Heading: the viewing direction on the horizontal plane; looking straight down, the
        # image's top (-down) points where the wearer faces.
        heading = np.where(np.linalg.norm(forward[:, :2], axis=1, keepdims=True) > 1e-3, forward[:, :2], -down[:, :2])
        return HeadTrack(frames, centre, forward, down, np.arctan2(heading[:, 1], heading[:, 0]))

    def index(self, frames) -> np.ndarray:
        """Index of the nearest frame with a pose, for each of ``frames``."""
        frames = np.asarray(frames)
        right = np.clip(np.searchsorted(self.frames, frames), 0, len(self.frames) - 1)
        left = np.clip(right - 1, 0, None)
        return np.where(np.abs(self.frames[left] - frames) <= np.abs(self.frames[right] - frames), left, right)

    def inputs(self, frames) -> np.ndarray:
        """[N, 9 x len(HEAD_OFFSETS) + 1] model inputs for the given frames."""
        at = self.index(frames)
        rot = head_rotation(self.yaw[at])                                          # [N, 3, 3]
        parts = []
        for offset in HEAD_OFFSETS:
            other = self.index(np.asarray(frames) + offset)
            for vectors in (self.centre[other] - self.centre[at], self.forward[other], self.down[other]):
                parts.append(np.einsum("nij,nj->ni", rot, vectors))
        parts.append(self.centre[at, 2:3])
        return np.concatenate(parts, axis=1).astype(np.float32)


def head_rotation(yaw: np.ndarray) -> np.ndarray:
    """World -> head frame rotations [N, 3, 3] for heading angles ``yaw`` (about world z)."""
    c, s = np.cos(yaw), np.sin(yaw)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, s, zero], -1), np.stack([-s, c, zero], -1), np.stack([zero, zero, one], -1)], 1)


def to_head(points: np.ndarray, centre: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """[N, J, 3] world points into the head frames of N frames."""
    return np.einsum("nij,nkj->nki", head_rotation(yaw), points - centre[:, None])


def to_world(points: np.ndarray, centre: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    return np.einsum("nji,nkj->nki", head_rotation(yaw), points) + centre[:, None]


def ego_feature_at(features, take_uid: str, seconds: np.ndarray) -> np.ndarray:
    """[N, D] the take's ego feature window whose centre is nearest each time (seconds)."""
    ego, _ = features.views(take_uid)
    if ego is None:
        raise ValueError(f"take {take_uid}: no ego features in {features.url}")
    t0, t1, vectors = features.load(ego)
    return vectors[np.abs((t0 + t1)[None, :] / 2 - np.asarray(seconds)[:, None]).argmin(axis=1)]


def body_array(joints3d: dict[str, tuple[float, float, float]]) -> np.ndarray:
    """[17, 3] in BODY_JOINTS order, NaN for absent joints."""
    return np.asarray([joints3d.get(name, (math.nan,) * 3) for name in BODY_JOINTS], np.float64)


def joint_distance_loss():
    """Mean Euclidean distance over the known joints (targets [N, 3J], NaN where unknown)."""
    import torch

    class JointDistance(torch.nn.Module):
        def forward(self, predicted, target):
            predicted, target = predicted.view(len(predicted), -1, 3), target.view(len(target), -1, 3)
            known = torch.isfinite(target[..., 0])
            distance = torch.sqrt(((predicted - torch.nan_to_num(target)) ** 2).sum(-1) + 1e-12)
            return (distance * known).sum() / known.sum().clamp(min=1)

    return JointDistance()


@dataclasses.dataclass(frozen=True)
class PoseOptions(TrainConfig):
    train_labels: str = P.setting("annotation+automatic", "annotations trained on (the manual one is evaluated)",
                                  choices=("annotation", "annotation+automatic"))


class PoseTask(Task):
    """What the pose benchmarks share: an error to minimize, the joint distance as the loss, the
    annotations trained on, and the official script's ground-truth file beside the submission
    (which already is in the official format)."""
    maximize = False
    Options = PoseOptions

    def kinds(self, train: bool) -> list[str]:
        return self.options.train_labels.split("+") if train else ["annotation"]

    def loss(self):
        return joint_distance_loss()

    def official_files(self, submission: dict, release, split: str) -> dict[str, dict]:
        return {f"official_ground_truth_{split}.json": self.truth(release, split)} if split == "val" else {}


@register
class EgoBodyPose(PoseTask):
    name = "ego_body_pose"
    metric = "mpjpe_cm"

    @dataclasses.dataclass(frozen=True)
    class Options(PoseOptions):
        ego_features: bool = P.setting(False, "add the ego view's feature window nearest each frame to the inputs")

    @property
    def reads_features(self) -> bool:
        return self.options.ego_features

    def outputs(self, release) -> int:
        return 3 * len(BODY_JOINTS)

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        """The MLP predicts standardized joints, mapped back to metres in the head frame."""
        from torch import nn
        return nn.Sequential(build_head(scale["x"], outputs, hidden, dropout), affine(scale["y"], inverse=True))

    def _track(self, release, split: str, uid: str) -> HeadTrack:
        pose = release.camera_pose(split, uid)
        return HeadTrack.from_extrinsics(pose.extrinsics[release.take(uid).ego_view.cam_id])

    def examples(self, release, features, split: str, train: bool) -> Examples:
        kinds = self.kinds(train)
        files = {kind: set(release.ego_pose_takes(split, "body", kind)) for kind in kinds}
        annotated = set().union(*files.values())
        labelled = bool(annotated)
        uids = sorted(annotated) if labelled else release.ego_pose_takes(split, "camera_pose")
        xs, ys, meta = [], [], []
        for uid in uids:
            track = self._track(release, split, uid)
            take_name = release.take(uid).take_name
            if labelled:
                bodies = {}
                for kind in kinds:
                    if uid in files[kind]:
                        for frame, pose in release.ego_pose(split, "body", uid, kind).items():
                            bodies[(frame, kind)] = body_array(pose.joints3d)
                keys = sorted(bodies)
                frames = np.asarray([f for f, _ in keys], np.int64)
            else:   # test: every frame with a pose, whichever the scorer asks for
                keys, frames = [], track.frames
            if not len(frames):
                continue
            at = track.index(frames)
            centre, yaw = track.centre[at], track.yaw[at]
            inputs = track.inputs(frames)
            if self.options.ego_features:
                inputs = np.concatenate([inputs, ego_feature_at(features, uid, frames / 30.0)], axis=1)
            xs.append(inputs)
            if labelled:
                ys.append(to_head(np.stack([bodies[k] for k in keys]), centre, yaw).reshape(len(keys), -1))
            else:
                ys.append(np.full((len(frames), self.outputs(release)), np.nan))
            meta += [{"take_uid": uid, "take_name": take_name, "frame": int(f), "kind": k[1] if keys else None,
                      "centre": c.tolist(), "yaw": float(a)}
                     for f, c, a, k in zip(frames, centre, yaw, keys or [(None, None)] * len(frames))]
        width = 9 * len(HEAD_OFFSETS) + 1 + (features.dim if self.options.ego_features else 0)
        return Examples(np.concatenate(xs) if xs else np.zeros((0, width), np.float32),
                        np.concatenate(ys).astype(np.float32) if ys else np.zeros((0, self.outputs(release)), np.float32),
                        meta)

    def truth(self, release, split: str) -> dict:
        out = {}
        for uid in release.ego_pose_takes(split, "body", "annotation"):
            frames = release.ego_pose(split, "body", uid, "annotation")
            out[uid] = {"take_name": release.take(uid).take_name,
                        "body": {str(f): body_array(frames[f].joints3d).tolist() for f in sorted(frames)}}
        return out

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        keep = [i for i, m in enumerate(examples.meta) if m["kind"] in (None, "annotation")]
        meta = [examples.meta[i] for i in keep]
        if not meta:
            return {}
        centre = np.asarray([m["centre"] for m in meta])
        yaw = np.asarray([m["yaw"] for m in meta])
        world = to_world(np.asarray(logits, np.float64)[keep].reshape(len(keep), -1, 3), centre, yaw).round(4)
        out: dict = {}
        for m, joints in zip(meta, world):
            take = out.setdefault(m["take_uid"], {"take_name": m["take_name"], "body": {}})
            take["body"][str(m["frame"])] = joints.tolist()
        return out

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        sums: dict[str, list] = {}
        missing: list | None = [] if lenient else None
        for uid, gt in truth.items():
            predicted = submission.get(uid)
            if lenient and predicted is None:
                predicted = {"take_name": gt["take_name"], "body": {}}
            if not isinstance(predicted, dict) or not isinstance(predicted.get("body"), dict):
                raise ValueError(f"submission has no body poses for take {gt['take_name']} ({uid})")
            if "take_name" not in predicted:
                raise ValueError(f"submission's take {uid} has no take_name (the challenge requires it)")
            body = {}
            for frame in gt["body"]:
                if frame in predicted["body"]:
                    joints = np.asarray(predicted["body"][frame], np.float64)
                    if joints.shape != (len(BODY_JOINTS), 3):
                        raise ValueError(f"take {gt['take_name']} frame {frame}: body should be "
                                         f"{len(BODY_JOINTS)}x3, got {list(joints.shape)}")
                    body[int(frame)] = joints
            try:
                errors = body_pose_errors({int(f): np.asarray(v, np.float64) for f, v in gt["body"].items()}, body,
                                          missing=missing)
            except KeyError as e:
                raise ValueError(f"submission has no body for take {gt['take_name']} ({uid}) frame {e.args[0]} "
                                 "(the official script stops here; --lenient scores without it)") from None
            total = sums.setdefault(body_category(gt["take_name"]), [0.0, 0, 0.0, 0])
            for k, v in enumerate(errors):
                total[k] += v
        position, joints, velocity, velocities = (sum(s[k] for s in sums.values()) for k in range(4))
        if not joints:
            raise ValueError(f"no ground-truth frame is evaluated: every run of annotated frames is shorter than "
                             f"{MIN_RUN_FRAMES} frames")
        out = {"mpjpe_cm": 100 * position / joints, "mpjve_m_s": velocity / velocities if velocities else math.nan,
               "joints": joints, "joint_velocities": velocities, "takes": len(truth),
               "missing": len(missing or []), "ignored": sum(uid not in truth for uid in submission)}
        for category, (p, n, v, m) in sorted(sums.items()):
            if n:
                out[f"mpjpe_cm_{category}"] = 100 * p / n
                out[f"mpjve_m_s_{category}"] = v / m if m else math.nan
        return out

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """static: the train set's mean body in the head frame, placed at every frame's head."""
        mean_body = np.nanmean(train.y[train.labelled()], axis=0)
        static = np.tile(mean_body, (len(evaluated), 1))
        return {"static": self.evaluate(self.submission(static, evaluated, split), truth)[self.metric]}


def hand_arrays(joints3d: dict[str, tuple[float, float, float]]) -> np.ndarray:
    """[2, 21, 3] (left, right) world joints, NaN where absent; a hand with fewer than
    MIN_VALID_HAND_JOINTS joints is all NaN (not evaluated)."""
    hands = np.asarray([joints3d.get(name, (math.nan,) * 3) for name in HAND_JOINTS], np.float64).reshape(2, 21, 3)
    hands[np.isfinite(hands[..., 0]).sum(axis=1) < MIN_VALID_HAND_JOINTS] = np.nan
    return hands


def to_camera(points: np.ndarray, world_to_camera: np.ndarray) -> np.ndarray:
    """[..., 3] world points into a camera's frame with its 3x4 [R | t]."""
    return points @ world_to_camera[:, :3].T + world_to_camera[:, 3]


def ego_view(release, uid: str, resolution: str):
    """The take's ego view, its file at ``resolution`` ("448" or "full")."""
    return next(v for v in release.take(uid).views(resolution) if v.is_ego)


def view_frames(release, view, frames: set[int], size: int | None = None) -> dict[int, np.ndarray]:
    """A view's frames at ``frames`` (uint8 [H, W, 3], or [size, size, 3]), in one pass over its file."""
    from engine import video

    with release.open_file(view.path) as f:
        return dict(video.decode(f, size=(size, size) if size else None, indices=frames))


def ego_frames(release, uid: str, resolution: str, size: int, frames: set[int]) -> dict[int, np.ndarray]:
    """The take's ego frames at ``frames`` (uint8 [size, size, 3] each), in one pass over its video."""
    return view_frames(release, ego_view(release, uid, resolution), frames, size)


def frame_cnn(x_scale: np.ndarray, size: int, outputs: int, hidden: int, dropout: float):
    """A small CNN on one standardized size x size RGB frame (the input vector, HWC order)."""
    from torch import nn

    class Frames(nn.Module):
        def forward(self, v):
            return v.view(len(v), size, size, 3).permute(0, 3, 1, 2)

    convolutions = nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(8), nn.Flatten())
    return nn.Sequential(affine(x_scale), Frames(), convolutions, nn.Linear(64 * 8 * 8, hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, outputs))


@register
class EgoHandPose(PoseTask):
    name = "ego_hand_pose"
    metric = "mpjpe_mm"
    reads_features = False

    @dataclasses.dataclass(frozen=True)
    class Options(PoseOptions):
        size: int = P.setting(64, "side of the square ego frame the model sees, pixels")
        resolution: str = P.setting("448", "which ego video file frames are decoded from", choices=("448", "full"))

    def outputs(self, release) -> int:
        return 3 * len(HAND_JOINTS)

    def head(self, scale: dict, outputs: int, hidden: int, dropout: float):
        from torch import nn
        return nn.Sequential(frame_cnn(scale["x"], self.options.size, outputs, hidden, dropout),
                             affine(scale["y"], inverse=True))

    def _hands_in_camera(self, release, split: str, kinds: list[str]) -> dict[str, dict[tuple[int, str], np.ndarray]]:
        """take_uid -> (frame, annotation kind) -> [2, 21, 3] hands in the Aria camera's frame; each
        kind's folder is listed once."""
        listed = {kind: set(release.ego_pose_takes(split, "hand", kind)) for kind in kinds}
        out: dict[str, dict] = {}
        for uid in sorted(set().union(*listed.values())):
            pose, aria = release.camera_pose(split, uid), release.take(uid).ego_view.cam_id
            out[uid] = {(frame, kind): to_camera(hand_arrays(ann.joints3d), pose.world_to_camera(aria, frame))
                        for kind in kinds if uid in listed[kind]
                        for frame, ann in release.ego_pose(split, "hand", uid, kind).items()}
        return out

    def examples(self, release, features, split: str, train: bool) -> Examples:
        xs, ys, meta = [], [], []
        for uid, annotated in sorted(self._hands_in_camera(release, split, self.kinds(train)).items()):
            hands = {key: h for key, h in annotated.items() if np.isfinite(h).any() or key[1] == "annotation"}
            images = ego_frames(release, uid, self.options.resolution, self.options.size, {f for f, _ in hands})
            for (frame, kind), h in sorted(hands.items()):
                if frame not in images:
                    raise ValueError(f"take {uid}: hand annotation at frame {frame}, past the end of its ego video")
                xs.append(images[frame].reshape(-1))
                ys.append(h.reshape(-1))
                meta.append({"take_uid": uid, "frame": frame, "kind": kind})
        width = 3 * self.options.size ** 2
        return Examples(np.asarray(xs, np.float32).reshape(-1, width),
                        np.asarray(ys, np.float32).reshape(-1, self.outputs(release)), meta)

    def truth(self, release, split: str) -> dict:
        out: dict = {}
        for uid, annotated in self._hands_in_camera(release, split, ["annotation"]).items():
            for (frame, _), hands in sorted(annotated.items()):
                entry = {}
                for side, h in zip(HANDS, hands):
                    valid = np.isfinite(h[:, 0])
                    entry[f"{side}_hand_3d"] = np.where(valid[:, None], h, 0.0).tolist() if valid.any() else []
                    entry[f"{side}_hand_valid_3d"] = valid.tolist()
                out.setdefault(uid, {})[str(frame)] = entry
        return out

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        out: dict = {}
        for m, row in zip(examples.meta, np.asarray(logits, np.float64)):
            if m["kind"] == "annotation":
                hands = row.reshape(2, 21, 3).round(5)
                out.setdefault(m["take_uid"], {})[str(m["frame"])] = {
                    f"{side}_hand_3d": h.tolist() for side, h in zip(HANDS, hands)}
        return out

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        errors: dict[str, list] = {side: [] for side in HANDS}
        missing = []
        for uid, frames in truth.items():
            for frame, entry in frames.items():
                for side in ("right", "left"):     # the official order
                    if not entry[f"{side}_hand_3d"]:
                        continue
                    predicted = submission.get(uid, {}).get(frame, {}).get(f"{side}_hand_3d")
                    if predicted is None:
                        if not lenient:
                            raise ValueError(f"submission has no {side} hand for take {uid} frame {frame} "
                                             "(the official script stops here; --lenient scores without it)")
                        missing.append((uid, frame, side))
                        continue
                    predicted = np.asarray(predicted, np.float64)
                    if predicted.shape != (21, 3):
                        raise ValueError(f"take {uid} frame {frame}: {side}_hand_3d should be 21x3, "
                                         f"got {list(predicted.shape)}")
                    valid = np.asarray(entry[f"{side}_hand_valid_3d"], bool)
                    errors[side].append(hand_pose_errors(np.asarray(entry[f"{side}_hand_3d"])[valid], predicted[valid]))
        both = errors["right"] + errors["left"]
        if not both:
            raise ValueError("no hand is evaluated: the ground truth has no valid hand" + (
                " with a prediction" if missing else ""))
        out = {"mpjpe_mm": float(np.mean([e[0] for e in both])), "pa_mpjpe_mm": float(np.mean([e[1] for e in both])),
               "hands": len(both), "missing": len(missing),
               "ignored": sum(uid not in truth for uid in submission)}
        for side in HANDS:
            if errors[side]:
                out[f"mpjpe_mm_{side}"] = float(np.mean([e[0] for e in errors[side]]))
                out[f"pa_mpjpe_mm_{side}"] = float(np.mean([e[1] for e in errors[side]]))
        return out

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        """mean: the train set's mean pose of each hand in the camera frame, at every frame."""
        mean_hands = np.nanmean(train.y[train.labelled()], axis=0)
        guess = np.tile(mean_hands, (len(evaluated), 1))
        return {"mean_hand": self.evaluate(self.submission(guess, evaluated, split), truth)[self.metric]}
