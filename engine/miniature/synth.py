"""Miniature Ego-Exo4D release: the real layout and schemas, real H.264 video, learnable labels.

Each take is one 3D scene (``engine.miniature.scene``): a demonstrator with 17 body and
2 x 21 hand joints, a few static objects, four static GoPros and an Aria camera riding on
the head. Every video, 2D/3D keypoint, camera pose and object mask is a projection of that
scene, so they agree across views. Every frame carries a stamp of its index
(``read_stamp``) that survives H.264 and resizing, to prove frame-exact sync downstream.

What each label leaves in the pixels, and the noise on it:

- Keystep (procedural scenarios): while a step is performed the object in the right hand
  takes that step's colour (``motion.keystep_colour``) and the hand circles at the step's
  frequency and radius (``motion.keystep_motion``). Noise: 10% of segments show another
  step of the same scenario, segment lengths vary, hands tremble.
- Procedure (procedural scenarios): steps follow the scenario's canonical order, optional
  steps (every third) are skipped a quarter of the time, and with probability MISTAKE_RATE two
  neighbouring steps swap places, a procedural mistake (task graph: ``_procedure``).
- Demonstrator proficiency: hand and head tremor shrinks with skill
  (``motion.TREMOR``), scaled per take by U(0.8, 1.25) so neighbouring levels overlap. The
  ego camera rides on the head, so its shake shows it most.
- Demonstration proficiency (physical scenarios): a good execution flashes the held object
  white for 0.5 s around its time; a tip for improvement turns it dark and drops the hand.
  Noise: 10% of events show nothing.
- Body pose given the head: the skeleton hangs from the head pose (torso, hips and legs
  follow the head's position and yaw); arms follow the hands.
- Object identity across views (correspondence): each static object keeps its shape and
  colour in every view, and its relations masks are the pixels it occupies after occlusion.
  Every view is annotated at every relations frame (1 fps); where the object is out of the view
  (the ego camera looks away) or hidden behind the demonstrator, the frame is annotated without
  a mask, so visibility is a real question (on the learnability release about 10% of ego and 7%
  of exo annotations).
- Audio (ego track): a tone whose pitch follows the keystep, a chime at good executions and
  a low buzz at tips, over noise.

None of these is readable from metadata: the proficiency of a take, its keystep labels and
its events appear only in the annotation files and the pixels.

Conventions: frame-aligned video at 30 fps, all views of a take with the same frame count;
trajectory at 100 Hz (the real one is 1 kHz); manual body annotations every 3rd frame from
frame 0, manual hand annotations every 10th frame from frame 5, automatic ones every 2nd frame,
numbered in the take's 30 fps frame indices; a 3D joint is present only where at least two
views see it.

Clocks, as in the real release: trajectory and eye gaze are stamped with the Aria device clock
(``tracking_timestamp_us``), which is not the take's. The capture's ``timesync.csv`` gives the
device time of every synchronized frame (``aria01_214-1_capture_timestamp_ns``), and the take is
rows ``timesync_start_idx + 1`` .. ``timesync_end_idx - 1`` of it. Here the device clock starts
``DEVICE_CLOCK_OFFSET_NS`` before the capture's first row and runs ``DEVICE_CLOCK_RATE`` times as
fast as the GoPros' clock, so a reader that took device time for take time would be minutes off.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import os
import shutil
import uuid
import wave
from pathlib import Path

import av
import numpy as np

from engine.miniature import motion as mo
from engine.miniature import scene as sc
from engine.miniature.scenarios import (
    EGO_CAM,
    SCENARIOS,
    UNIVERSITIES,
    Scenario,
    keystep_classes,
    keystep_unique_id,
    scenario_by_name,
)
from engine.miniature.stamp import draw_stamp, read_stamp  # noqa: F401  (read_stamp is part of this API)
from engine.release.catalog import BODY_JOINTS, EGO_STREAM, EGO_STREAM_NAME, HAND_JOINTS, PROFICIENCY_LEVELS
from engine.release.masks import encode_mask
from engine.video import VideoWriter

FPS = mo.FPS
DEVICE_CLOCK_OFFSET_NS = 123_456_789_000      # device time at the capture's first timesync row
DEVICE_CLOCK_RATE = 1.0005                     # device seconds per capture second
TIMESYNC_LEAD = FPS                            # capture rows before a take's first frame
DOWNSCALED = 448
AUDIO_RATE = 48000
EXO_CAMS = ("cam01", "cam02", "cam03", "cam04")
SPLIT_PATTERN = ("train", "train", "train", "val", "test")
MISTAKE_RATE = 0.15                            # chance that a procedural step swaps with the next


@dataclasses.dataclass(frozen=True)
class Preset:
    takes: int
    seconds: float
    ego_size: int               # the Aria RGB is square
    exo_size: tuple[int, int]   # GoPro (width, height), 16:9 like 3840x2160


PRESETS = {
    # The demo and most tests: 40 s of takes (3.3 view-minutes) covering all 8 scenarios.
    "default": Preset(takes=10, seconds=4.0, ego_size=512, exo_size=(960, 540)),
    # Quick checks: full resolution equals the downscaled one.
    "tiny": Preset(takes=4, seconds=3.0, ego_size=448, exo_size=(796, 448)),
    # Benchmarks: 60 takes of a minute, 5 views each: 5 view-hours.
    "large": Preset(takes=60, seconds=60.0, ego_size=512, exo_size=(960, 540)),
}


def downscaled_size(width: int, height: int) -> tuple[int, int]:
    """Size of the ``downscaled/448`` copy: short side 448, even dimensions."""
    scale = DOWNSCALED / min(width, height)
    return int(round(width * scale / 2) * 2), int(round(height * scale / 2) * 2)


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


# ----------------------------------------------------------------------------- planning

@dataclasses.dataclass
class TakePlan:
    index: int
    seed: int
    take_uid: str
    take_name: str
    capture_name: str
    capture_uid: str
    participant_uid: int
    physical_setting_uid: str
    university: str
    scenario: Scenario
    task_id: int
    task_name: str
    split: str
    seconds: float
    proficiency: str
    height_m: float
    segments: list[mo.Segment]
    events: list[mo.Event]
    objects: list[dict]
    best_exo: str
    faults: dict = dataclasses.field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * FPS))

    @property
    def procedural(self) -> bool:
        return self.scenario.procedural


def _scenario_cycle(scenarios: list[Scenario]) -> list[Scenario]:
    """Procedural and physical scenarios alternate, so a few takes cover every benchmark."""
    procedural = [s for s in scenarios if s.procedural]
    physical = [s for s in scenarios if not s.procedural]
    if not procedural or not physical:
        return scenarios
    n = len(procedural) * len(physical)
    return [s for k in range(n) for s in (procedural[k % len(procedural)], physical[k % len(physical)])]


def plan_release(takes: int, seconds: float, seed: int = 0, scenarios: list[str] | None = None) -> list[TakePlan]:
    seeds = np.random.SeedSequence(seed).spawn(takes)
    chosen = [scenario_by_name(n) for n in scenarios] if scenarios else list(SCENARIOS)
    cycle = _scenario_cycle(chosen)
    classes = {(s, step): label for label, _, step, s in keystep_classes()}
    plans = []
    for i in range(takes):
        scenario = cycle[i % len(cycle)]
        trng = np.random.default_rng(seeds[i])
        university = UNIVERSITIES[int(trng.integers(len(UNIVERSITIES)))]
        capture_no = int(trng.integers(1, 60))
        take_idx = int(trng.integers(1, 9))
        capture_name = f"{university}_{scenario.slug}_{capture_no:02d}"
        task_id, task_name = scenario.tasks[int(trng.integers(len(scenario.tasks)))]
        proficiency = PROFICIENCY_LEVELS[int(trng.choice(4, p=[0.2, 0.25, 0.35, 0.2]))]
        # Mistakes draw from their own stream, so that adding them left the other draws as they were.
        mistakes = np.random.default_rng(seeds[i].spawn(1)[0])
        segments = _plan_segments(trng, mistakes, scenario, seconds, classes) if scenario.procedural else []
        events = [] if scenario.procedural else _plan_events(trng, seconds)
        plans.append(TakePlan(
            index=i, seed=int(trng.integers(2**31)), take_uid=_uuid(trng),
            take_name=f"{capture_name}_{take_idx}", capture_name=capture_name, capture_uid=_uuid(trng),
            participant_uid=int(trng.integers(100, 999)), physical_setting_uid=_uuid(trng),
            university=university, scenario=scenario, task_id=task_id, task_name=task_name,
            split=SPLIT_PATTERN[i % len(SPLIT_PATTERN)], seconds=seconds, proficiency=proficiency,
            height_m=float(trng.uniform(1.55, 1.9)), segments=segments, events=events,
            objects=_plan_objects(trng, scenario), best_exo=""))
    return plans


def _plan_segments(rng, mistakes, scenario: Scenario, seconds: float, classes) -> list[mo.Segment]:
    steps = list(range(len(scenario.keysteps)))
    t, k, out = 0.4, 0, []
    order = []
    while len(order) < 64:
        order += steps
    if scenario.keysteps:
        for pos in range(len(order) - 1):
            if mistakes.random() < MISTAKE_RATE:   # a procedural mistake: two steps done out of order
                order[pos], order[pos + 1] = order[pos + 1], order[pos]
    for _pos, step in enumerate(order):
        if scenario.keysteps and step % 3 == 2 and rng.random() < 0.25:
            continue  # optional steps are sometimes skipped
        duration = float(rng.uniform(1.4, 2.6))
        if t + duration > seconds - 0.2:
            break
        label = classes[(scenario.name, scenario.keysteps[step])]
        trace = label
        if rng.random() < 0.1:   # label noise: the pixels show another step of the scenario
            other = int(rng.integers(len(scenario.keysteps)))
            trace = classes[(scenario.name, scenario.keysteps[other])]
        out.append(mo.Segment(round(t, 3), round(t + duration, 3), step, label, trace))
        t += duration + float(rng.uniform(0.05, 0.3))
        k += 1
    return out


def _plan_events(rng, seconds: float) -> list[mo.Event]:
    out, t = [], float(rng.uniform(0.6, 1.2))
    while t < seconds - 0.5:
        out.append(mo.Event(round(t, 3), "good" if rng.random() < 0.6 else "tip", bool(rng.random() >= 0.1)))
        t += float(rng.uniform(1.2, 2.4))
    return out


_OBJECT_COLOURS = [(40, 90, 200), (200, 160, 30), (30, 160, 120), (180, 60, 160), (120, 200, 230)]


def _plan_objects(rng, scenario: Scenario) -> list[dict]:
    names = list(scenario.objects)
    rng.shuffle(names)
    colours = rng.permutation(len(_OBJECT_COLOURS))
    objs = []
    for k, name in enumerate(names[:3]):
        # Spread around the work area in front of the demonstrator, resting on a table height.
        angle = -0.9 + 0.9 * k + rng.uniform(-0.2, 0.2)
        dist = rng.uniform(0.55, 0.85)
        size = float(rng.uniform(0.05, 0.09))
        objs.append(dict(name=f"{name}_{k}", shape="sphere" if k % 2 else "box", size=size,
                         centre=np.array([dist * np.cos(angle), dist * np.sin(angle), 0.85 + size]),
                         colour=_OBJECT_COLOURS[int(colours[k])]))
    return objs


# ----------------------------------------------------------------------------- one take

def _cameras(plan: TakePlan, eye: np.ndarray, gaze: np.ndarray, ego_size: int,
             exo_size: tuple[int, int], rng) -> dict[str, sc.Camera]:
    cams = {}
    rotations, translations = zip(*(sc.look_at(e, g) for e, g in zip(eye, gaze)))
    cams[EGO_CAM] = sc.Camera(f"{EGO_CAM}_{EGO_STREAM}", ego_size, ego_size, sc.intrinsics(ego_size, ego_size, 95.0),
                              np.stack(rotations), np.stack(translations))
    for k, cam_id in enumerate(EXO_CAMS):
        azimuth = np.radians(40 + 90 * k + rng.uniform(-20, 20))
        radius, height = rng.uniform(2.6, 3.3), rng.uniform(1.3, 2.1)
        position = np.array([radius * np.cos(azimuth), radius * np.sin(azimuth), height])
        R, t = sc.look_at(position, np.array([0.25, 0.0, 1.0]) + rng.uniform(-0.1, 0.1, 3))
        cams[cam_id] = sc.Camera(cam_id, *exo_size, sc.intrinsics(*exo_size, 62.0), R, t)
    return cams


def _colours(rng, plan: TakePlan) -> np.ndarray:
    colours = np.zeros((sc.NUM_LABELS, 3), np.uint8)  # by label id
    grey = rng.integers(90, 140)
    colours[sc.BG] = (grey, grey + 8, grey + 20)
    floor = rng.integers(60, 110)
    colours[sc.FLOOR_A] = (floor, floor - 10, floor - 25)
    colours[sc.FLOOR_B] = (floor + 40, floor + 30, floor + 10)
    colours[sc.BODY] = (70, 80, 110) if plan.index % 2 else (110, 70, 60)
    colours[sc.HEAD] = colours[sc.HAND] = (205, 160, 130)
    for k, obj in enumerate(plan.objects):
        colours[sc.OBJECT0 + k] = obj["colour"]
    return colours


def _audio(plan: TakePlan) -> np.ndarray:
    rng = np.random.default_rng([plan.seed, 5])
    n = int(plan.seconds * AUDIO_RATE)
    t = np.arange(n) / AUDIO_RATE
    audio = 0.02 * rng.standard_normal(n)
    for seg in plan.segments:
        sel = (t >= seg.start) & (t < seg.end)
        audio[sel] += 0.15 * np.sin(2 * np.pi * 220 * 2 ** (seg.trace_label_id / 8) * t[sel])
    for ev in plan.events:
        if ev.visible:
            sel = np.abs(t - ev.time) < 0.15
            audio[sel] += 0.25 * np.sin(2 * np.pi * (1760 if ev.kind == "good" else 110) * t[sel])
    return audio[None, :].astype(np.float32)


def take_dir(root: Path, plan: TakePlan) -> Path:
    return root / "takes" / plan.take_name


def _write_take(plan: TakePlan, root: str, ego_size: int, exo_size: tuple[int, int]) -> dict:
    """Render, encode and write one take's files; return its relations entry."""
    rng = np.random.default_rng(plan.seed)
    tdir = take_dir(Path(root), plan)
    videos = tdir / "frame_aligned_videos"
    (videos / "downscaled" / str(DOWNSCALED)).mkdir(parents=True, exist_ok=True)
    colours = _colours(rng, plan)
    state = mo.simulate(rng, plan.n_frames, plan.height_m, plan.procedural, plan.proficiency,
                        plan.segments, plan.events, plan.objects)
    audio = _audio(plan)
    cams = _cameras(plan, state.eye, state.gaze, ego_size, exo_size, rng)
    n = plan.n_frames
    short_cam, short_by = plan.faults.get("short_view", (None, 0))
    writers, names = {}, {}
    for cam_id, cam in cams.items():
        name = names[cam_id] = f"{cam_id}_{EGO_STREAM}.mp4" if cam_id == EGO_CAM else f"{cam_id}.mp4"
        track = audio if cam_id == EGO_CAM else None
        small = downscaled_size(cam.width, cam.height)
        writers[cam_id] = [VideoWriter(str(videos / name), cam.width, cam.height, audio=track)]
        if small != (cam.width, cam.height):
            writers[cam_id].append(VideoWriter(str(videos / "downscaled" / str(DOWNSCALED) / name), *small, audio=track))
    floors = {cid: sc.floor_labels(cam, 0) for cid, cam in cams.items() if cam.R.ndim == 2}
    relation_frames = set(range(FPS // 2, n, FPS))  # 1 fps, as the real annotations
    masks: dict = {}
    palette = np.zeros((256, 4), np.uint8)   # PyAV's pal8 palette entries are bytes A, R, G, B
    palette[:, 0] = 255
    palette[sc.STAMP_WHITE, 1:] = 255
    for i in range(n):
        frame_colours = colours.copy()
        frame_colours[sc.HELD] = state.held_label_colour[i]
        palette[:sc.NUM_LABELS - 2, 1:] = frame_colours[:sc.NUM_LABELS - 2]
        for cam_id, cam in cams.items():
            labels = sc.render_labels(state, cam, i, floors.get(cam_id))
            draw_stamp(labels, i, low=sc.STAMP_BLACK, high=sc.STAMP_WHITE)
            if i in relation_frames:
                for obj in state.objects:
                    masks.setdefault(obj["name"], {}).setdefault(cam.name, {})[i] = labels == obj["label"]
            if cam_id == short_cam and i >= n - short_by:
                continue
            frame = av.VideoFrame.from_ndarray((labels, palette), format="pal8")
            for writer in writers[cam_id]:
                writer.write(frame)
    for cam_id, ws in writers.items():
        for w in ws:
            w.close()
        if len(ws) == 1:   # full resolution already is 448: the copy is the same file
            shutil.copyfile(videos / names[cam_id], videos / "downscaled" / str(DOWNSCALED) / names[cam_id])

    _write_sensors(plan, tdir, state, cams, audio)
    _write_ego_pose(plan, Path(root), state, cams)
    # Every view is annotated at every relations frame; a frame where the object does not show
    # (out of the view, or hidden behind the demonstrator) is annotated without a mask.
    relations = {}
    for obj_name, per_view in masks.items():
        relations[obj_name] = {
            view: {"annotation": {str(f): {"width": int(m.shape[1]), "height": int(m.shape[0]),
                                           "encodedMask": encode_mask(m)} for f, m in sorted(frames.items()) if m.any()},
                   "annotated_frames": sorted(frames)}
            for view, frames in per_view.items()}
    return {"object_masks": relations, "best_exo": _best_exo(cams)}


def _best_exo(cams: dict[str, sc.Camera]) -> str:
    """The GoPro looking most squarely at the demonstrator's front (+x)."""
    def facing(cam):
        centre = sc.camera_centre(cam.R, cam.t)
        return centre[0] / np.hypot(centre[0], centre[1])
    return max(EXO_CAMS, key=lambda cid: facing(cams[cid]))


def _quaternion(R: np.ndarray) -> tuple[float, float, float, float]:
    """(qx, qy, qz, qw) of a rotation matrix."""
    w = np.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = np.copysign(np.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return float(x), float(y), float(z), float(w)


def device_ns(row: float) -> int:
    """The Aria device clock at (fractional) timesync row ``row``, in nanoseconds."""
    return DEVICE_CLOCK_OFFSET_NS + round(row / FPS * 1e9 * DEVICE_CLOCK_RATE)


def _device_us(take_seconds: float) -> int:
    """The device clock (tracking_timestamp_us) at a time on the take's clock; the take's frame 0
    is timesync row TIMESYNC_LEAD + 1."""
    return device_ns(TIMESYNC_LEAD + 1 + take_seconds * FPS) // 1000


def _write_sensors(plan: TakePlan, tdir: Path, state: sc.SceneState, cams, audio: np.ndarray) -> None:
    """Trajectory (device = the Aria RGB camera here), GoPro calibration, eye gaze, audio."""
    traj = tdir / "trajectory"
    traj.mkdir(exist_ok=True)
    ego = cams[EGO_CAM]
    rate = 100
    times = np.arange(int(plan.seconds * rate)) / rate
    frames = np.minimum((times * FPS).astype(int), plan.n_frames - 1)
    with open(traj / "closed_loop_trajectory.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["graph_uid", "tracking_timestamp_us", "utc_timestamp_ns",
                    "tx_world_device", "ty_world_device", "tz_world_device",
                    "qx_world_device", "qy_world_device", "qz_world_device", "qw_world_device",
                    "gravity_x_world", "gravity_y_world", "gravity_z_world", "quality_score"])
        for ts, i in zip(times, frames):
            R, t = ego.pose(i)
            centre = sc.camera_centre(R, t)
            w.writerow([plan.capture_uid, _device_us(ts), int(1.7e18 + ts * 1e9), *np.round(centre, 5),
                        *np.round(_quaternion(R.T), 6), 0.0, 0.0, -9.81, 1.0])
    with open(traj / "gopro_calibs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cam_uid", "image_width", "image_height", "intrinsics_type", "intrinsics_0", "intrinsics_1",
                    "intrinsics_2", "intrinsics_3", "qw_world_cam", "qx_world_cam", "qy_world_cam", "qz_world_cam",
                    "tx_world_cam", "ty_world_cam", "tz_world_cam"])
        for cam_id in EXO_CAMS:
            cam = cams[cam_id]
            qx, qy, qz, qw = _quaternion(cam.R.T)
            w.writerow([cam_id, cam.width, cam.height, "Pinhole", cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2],
                        qw, qx, qy, qz, *sc.camera_centre(cam.R, cam.t)])
    gaze_dir = tdir / "eye_gaze"
    gaze_dir.mkdir(exist_ok=True)
    with open(gaze_dir / "general_eye_gaze.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tracking_timestamp_us", "yaw_rads_cpf", "pitch_rads_cpf", "depth_m"])
        for i in range(0, plan.n_frames, 3):  # 10 Hz
            R, t = ego.pose(i)
            target = sc.transform(state.held[i], R, t)
            w.writerow([_device_us(i / FPS), round(float(np.arctan2(target[0], target[2])), 5),
                        round(float(np.arctan2(-target[1], target[2])), 5), round(float(np.sqrt((target * target).sum())), 4)])
    audio_dir = tdir / "audio"
    audio_dir.mkdir(exist_ok=True)
    pcm = (np.clip(audio[0], -1, 1) * 32767).astype("<i2")
    with wave.open(str(audio_dir / f"{EGO_CAM}.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(AUDIO_RATE)
        f.writeframes(pcm.tobytes())


def _keypoint_entry(plan, frame, names, points, cams, placement):
    ann2d = {}
    for cam_id, cam in cams.items():
        R, t = cam.pose(frame)
        uv, z = sc.project(points, cam.K, R, t)
        visible = {name: {"x": round(float(u), 3), "y": round(float(v), 3), "placement": placement}
                   for name, (u, v), depth in zip(names, uv, z)
                   if depth > sc.NEAR and 0 <= u < cam.width and 0 <= v < cam.height}
        if visible:
            ann2d[cam_id] = visible
    # A 3D joint is triangulated from its 2D annotations: one seen in fewer than two views has none.
    views = {name: sum(name in joints for joints in ann2d.values()) for name in names}
    ann3d = {name: {"x": round(float(p[0]), 5), "y": round(float(p[1]), 5), "z": round(float(p[2]), 5),
                    "num_views_for_3d": views[name]} for name, p in zip(names, points) if views[name] >= 2}
    return [{"metadata": {"take_uid": plan.take_uid, "take_name": plan.take_name, "frame_number": frame},
             "annotation2D": ann2d, "annotation3D": ann3d}]


def _write_ego_pose(plan: TakePlan, root: Path, state: sc.SceneState, cams) -> None:
    base = root / "annotations" / "ego_pose" / plan.split
    if plan.split != "test":
        # Manual body frames are 3 apart, so that they form the long runs the official body
        # evaluation scores (it drops runs under 4 s, and a step over 3 frames ends a run);
        # they include the relations frames (15 + 30k), as the hand frames do.
        for part, names, joints, manual in (("body", BODY_JOINTS, state.body, range(0, plan.n_frames, 3)),
                                            ("hand", HAND_JOINTS, state.hands, range(5, plan.n_frames, 10))):
            for kind, frames, placement in (("annotation", manual, "manual"),
                                            ("automatic", range(0, plan.n_frames, 2), "auto")):
                out = {str(f): _keypoint_entry(plan, f, names, joints[f], cams, placement) for f in frames}
                path = base / part / kind / f"{plan.take_uid}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(out))
    pose = {"metadata": {"take_uid": plan.take_uid, "take_name": plan.take_name}}
    ego = cams[EGO_CAM]
    pose[EGO_CAM] = {"camera_intrinsics": ego.K.tolist(),
                     "camera_extrinsics": {str(i): np.hstack([ego.R[i], ego.t[i][:, None]]).round(6).tolist()
                                           for i in range(plan.n_frames)}}
    for cam_id in EXO_CAMS:
        cam = cams[cam_id]
        pose[cam_id] = {"camera_intrinsics": cam.K.tolist(), "distortion_coeffs": [0.0] * 4,
                        "camera_extrinsics": np.hstack([cam.R, cam.t[:, None]]).round(6).tolist()}
    path = base / "camera_pose" / f"{plan.take_uid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pose))


# ----------------------------------------------------------------------------- the release

def generate(out: str | os.PathLike, preset: str = "default", takes: int | None = None,
             seconds: float | None = None, seed: int = 0, faults: bool = False,
             scenarios: list[str] | None = None, workers: int | None = None) -> list[TakePlan]:
    """Write a complete miniature release under ``out`` (a local directory) and return its plan."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    plans = plan_release(takes or p.takes, seconds or p.seconds, seed, scenarios)
    if faults:
        _assign_faults(plans)
    final = Path(out)
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"{final} is not empty; synth writes a fresh release")
    # Written under a temporary name and renamed when complete: a crash never leaves
    # something that looks like a release.
    root = final.with_name(final.name + ".partial")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    workers = workers or min(2, os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        results = list(pool.map(_write_take, plans, [str(root)] * len(plans),
                                [p.ego_size] * len(plans), [p.exo_size] * len(plans)))
    for plan, res in zip(plans, results):
        plan.best_exo = res["best_exo"]
    _write_metadata(root, plans)
    _write_annotations(root, plans, [r["object_masks"] for r in results], seed)
    if faults:
        _apply_file_faults(root, plans, seed)
    if final.exists():
        final.rmdir()
    root.rename(final)
    return plans


def _assign_faults(plans: list[TakePlan]) -> None:
    if len(plans) < 3:
        raise ValueError("--faults needs at least 3 takes")
    plans[0].faults["truncated_video"] = "cam02"
    plans[1].faults["missing_view"] = "cam03"
    plans[2].faults["short_view"] = ("cam01", 7)


def _apply_file_faults(root: Path, plans: list[TakePlan], seed: int) -> None:
    for plan in plans:
        videos = take_dir(root, plan) / "frame_aligned_videos"
        if "truncated_video" in plan.faults:
            path = videos / f"{plan.faults['truncated_video']}.mp4"
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 2 // 5])
        if "missing_view" in plan.faults:
            name = f"{plan.faults['missing_view']}.mp4"
            (videos / name).unlink()
            (videos / "downscaled" / str(DOWNSCALED) / name).unlink()
    # An annotation for a take that takes.json does not have.
    path = root / "annotations" / "keystep_train.json"
    data = json.loads(path.read_text())
    ghost = _uuid(np.random.default_rng([seed, 99999]))
    data["annotations"][ghost] = {"take_uid": ghost, "take_name": "ghost_cooking_99_1", "scenario": "Cooking",
                                  "segments": []}
    path.write_text(json.dumps(data))


def _stream(cam_id, stream_id, readable, relative_path, rng, is_collage=False):
    return {"cam_id": cam_id, "stream_id": stream_id, "readable_stream_id": readable, "clip_uid": _uuid(rng),
            "relative_path": relative_path, "is_collage": is_collage}


def _take_record(plan: TakePlan) -> dict:
    rng = np.random.default_rng([plan.seed, 1])
    fav = {EGO_CAM: {
        EGO_STREAM_NAME: _stream(EGO_CAM, EGO_STREAM, EGO_STREAM_NAME, f"frame_aligned_videos/{EGO_CAM}_{EGO_STREAM}.mp4", rng),
        "slam-left": _stream(EGO_CAM, "1201-1", "slam-left", f"frame_aligned_videos/{EGO_CAM}_1201-1.mp4", rng),
        "slam-right": _stream(EGO_CAM, "1201-2", "slam-right", f"frame_aligned_videos/{EGO_CAM}_1201-2.mp4", rng),
        "et": _stream(EGO_CAM, "211-1", "et", f"frame_aligned_videos/{EGO_CAM}_211-1.mp4", rng),
    }}
    for cam_id in EXO_CAMS:
        fav[cam_id] = {"0": _stream(cam_id, "0", None, f"frame_aligned_videos/{cam_id}.mp4", rng)}
    fav["collage"] = {"0": _stream("collage", "0", None, "frame_aligned_videos/collage.mp4", rng, True)}
    fav["best_exo"] = {"0": _stream("best_exo", "0", None, f"frame_aligned_videos/{plan.best_exo}.mp4", rng)}
    cameras = [{"cam_id": EGO_CAM, "is_ego": True, "device_type": "aria", "has_walkaround": True, "includes_audio": True}]
    cameras += [{"cam_id": c, "is_ego": False, "device_type": "hero10", "has_walkaround": False,
                 "includes_audio": False} for c in EXO_CAMS]
    capture = {"capture_uid": plan.capture_uid, "capture_name": plan.capture_name, "university_id": plan.university,
               "physical_setting_uid": plan.physical_setting_uid, "cameras": cameras,
               "timesync_validated": True, "post_surveys": None}
    return {
        "take_uid": plan.take_uid, "take_name": plan.take_name, "root_dir": f"takes/{plan.take_name}",
        "capture_uid": plan.capture_uid, "participant_uid": plan.participant_uid,
        "parent_task_id": plan.scenario.parent_task_id, "parent_task_name": plan.scenario.name,
        "task_id": plan.task_id, "task_name": plan.task_name, "take_idx": int(plan.take_name.rsplit("_", 1)[1]),
        "duration_sec": plan.seconds, "task_start_sec": 0.0,
        "task_end_sec": None if plan.index % 4 == 3 else plan.seconds,
        "best_exo": plan.best_exo, "is_dropped": False, "is_narrated": plan.index % 2 == 0,
        "validated": True, "university_name": plan.university, "physical_setting_uid": plan.physical_setting_uid,
        "timesync_start_idx": TIMESYNC_LEAD, "timesync_end_idx": TIMESYNC_LEAD + plan.n_frames + 1,
        "capture": capture, "has_trimmed_vrs": True,
        "vrs_relative_path": f"takes/{plan.take_name}/{EGO_CAM}_noimagestreams.vrs",
        "frame_aligned_videos": fav,
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _write_metadata(root: Path, plans: list[TakePlan]) -> None:
    takes = [_take_record(p) for p in plans]
    _write_json(root / "takes.json", takes)
    _write_json(root / "captures.json", [dict(t["capture"], take_uids=[t["take_uid"]]) for t in takes])
    _write_json(root / "participants.json", sorted(
        ({"participant_uid": p.participant_uid, "university_id": p.university} for p in plans),
        key=lambda r: r["participant_uid"]))
    _write_json(root / "physical_setting.json",
                [{"physical_setting_uid": p.physical_setting_uid, "name": f"{p.university} {p.scenario.name} room",
                  "university_id": p.university} for p in plans])
    _write_json(root / "visual_objects.json",
                sorted({o["name"].rsplit("_", 1)[0] for p in plans for o in p.objects}))
    # "generator" keeps the module's name of when miniature-v2 was defined (it now lives in
    # engine.miniature.synth), so a given seed still writes the same bytes.
    _write_json(root / "metadata.json", {"version": "miniature-v2", "takes": len(plans),
                                         "generator": "engine.release.synth"})
    for plan in plans:
        path = root / "captures" / plan.capture_name / "timesync.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        cams = [f"{EGO_CAM}_{EGO_STREAM}"] + list(EXO_CAMS)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([c for cam in cams for c in (f"{cam}_pts", f"{cam}_frame_number")]
                       + [f"{EGO_CAM}_{EGO_STREAM}_capture_timestamp_ns"])
            for k in range(plan.n_frames + 2 * TIMESYNC_LEAD + 1):
                w.writerow([v for _ in cams for v in (k * 1001 // FPS * 1000, k)] + [device_ns(k)])


def _write_annotations(root: Path, plans: list[TakePlan], relations: list[dict], seed: int) -> None:
    ann = root / "annotations"
    by_split = {s: [p for p in plans if p.split == s] for s in ("train", "val", "test")}
    benchmarks = {}
    for p in plans:
        names = ["proficiency_demonstrator", "relations"]
        names += ["keystep", "procedure_understanding"] if p.procedural else ["proficiency_demonstration"]
        names += ["ego_pose"]
        benchmarks[p.take_uid] = names
    _write_json(ann / "splits.json", {
        "split_to_take_uids": {s: [p.take_uid for p in ps] for s, ps in by_split.items()},
        "take_uid_to_split": {p.take_uid: p.split for p in plans},
        "take_uid_to_benchmark": benchmarks})

    classes = keystep_classes()
    (ann / "keystep_benchmark").mkdir(parents=True)
    with open(ann / "keystep_benchmark" / "label_mapping.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label_id", "step_unique_id", "step_name", "scenario_name"])
        w.writerows(classes)
    taxonomy, vocabulary = {}, {}
    for s in SCENARIOS:
        if not s.procedural:
            continue
        nodes = {str(s.parent_task_id): {"id": s.parent_task_id, "name": s.name, "parent_id": None,
                                         "parent_name": None, "is_leafnode": False, "unique_id": s.parent_task_id}}
        for i, step in enumerate(s.keysteps):
            uid = keystep_unique_id(s, i)
            nodes[str(uid)] = {"id": i + 1, "name": step, "parent_id": s.parent_task_id, "parent_name": s.name,
                               "is_leafnode": True, "unique_id": uid}
            vocabulary[str(uid)] = step
        taxonomy[s.name] = nodes

    def keystep_segment(p, seg):
        uid = keystep_unique_id(p.scenario, seg.step_index)
        return {"start_time": seg.start, "end_time": seg.end, "step_id": seg.step_index + 1, "step_unique_id": uid,
                "step_name": p.scenario.keysteps[seg.step_index],
                "step_description": f"{p.scenario.keysteps[seg.step_index]} ({p.task_name})",
                "is_essential": seg.step_index % 3 != 2}

    for split in ("train", "val"):
        procedural = [p for p in by_split[split] if p.procedural]
        _write_json(ann / f"keystep_{split}.json", {
            "annotations": {p.take_uid: {"take_uid": p.take_uid, "take_name": p.take_name, "scenario": p.scenario.name,
                                         "segments": [keystep_segment(p, s) for s in p.segments]} for p in procedural},
            "taxonomy": taxonomy, "vocabulary": vocabulary})
    for split in ("train", "val", "test"):
        segs = []
        for p in by_split[split]:
            for k, seg in enumerate(p.segments):
                ego_name = f"{p.take_name}_{EGO_CAM}_{k}"
                entry = {"take_uid": p.take_uid, "take_name": p.take_name, "start_time": seg.start,
                         "end_time": seg.end, "ego_segment_name": ego_name,
                         "segment_name_list": [ego_name] + [f"{p.take_name}_{c}_{k}" for c in EXO_CAMS]}
                if split != "test":
                    entry.update(step_unique_id=keystep_unique_id(p.scenario, seg.step_index),
                                 label_id=seg.label_id, step_name=p.scenario.keysteps[seg.step_index])
                segs.append(entry)
        name = "test_unannotated" if split == "test" else split
        _write_json(ann / "keystep_benchmark" / f"keystep_segment_{name}.json", {"segments": segs})
        _write_json(ann / f"procedure_understanding_{name}.json",
                    {"annotations": {p.take_uid: _procedure(p, annotated=split != "test")
                                     for p in by_split[split] if p.procedural}})

    def header(p):
        files = {"ego": f"takes/{p.take_name}/frame_aligned_videos/{EGO_CAM}_{EGO_STREAM}.mp4"}
        files.update({f"exo{k + 1}": f"takes/{p.take_name}/frame_aligned_videos/{c}.mp4" for k, c in enumerate(EXO_CAMS)})
        return {"take_uid": p.take_uid, "take_name": p.take_name, "task_id": p.task_id, "task_name": p.task_name,
                "scenario_name": p.scenario.name, "video_paths": files}

    for split in ("train", "val"):
        _write_json(ann / f"proficiency_demonstrator_{split}.json",
                    {"annotations": [dict(header(p), proficiency_score=p.proficiency) for p in by_split[split]]})
        demos = []
        for p in by_split[split]:
            if p.procedural:
                continue
            erng = np.random.default_rng([p.seed, 2])
            expert = _uuid(erng)
            events = {"good": [], "tip": []}
            for ev in p.events:
                text = "clean, controlled execution" if ev.kind == "good" else "keep the wrist steady through the motion"
                events[ev.kind].append({"video_time": ev.time, "list": [text], "expert_uid": expert})
            demos.append(dict(header(p), proficiency_score=p.proficiency, good_executions=events["good"],
                              tips_for_improvement=events["tip"]))
        _write_json(ann / f"proficiency_demonstration_{split}.json", {"annotations": demos})
        _write_json(ann / f"atomic_descriptions_{split}.json",
                    {"annotations": {p.take_uid: [_atomic(p)] for p in by_split[split]}})
        _write_json(ann / f"expert_commentary_{split}.json",
                    {"annotations": {p.take_uid: [_commentary(p)] for p in by_split[split]}})
    for split in ("train", "val", "test"):
        _write_json(ann / f"relations_{split}.json", {"annotations": {
            p.take_uid: {"scenario": p.scenario.name, "take_name": p.take_name, "object_masks": rel}
            for p, rel in zip(plans, relations) if p.split == split}})


def _procedure(p: TakePlan, annotated: bool) -> dict:
    """The scenario's task graph: steps in canonical order, every third one (index 2, 5, ...)
    optional; a step requires every non-optional step before it. Per segment: the steps it
    requires (previous_keysteps), whether it is optional, the required steps not yet done in
    the take (missing_keysteps; any makes the segment a procedural mistake), and the steps that
    may come next (the following one, and the one after it when that one is optional)."""
    done, segments = set(), []
    steps = len(p.scenario.keysteps)
    uids = [keystep_unique_id(p.scenario, i) for i in range(steps)]
    for seg in p.segments:
        k = seg.step_index
        entry = {"start_time": seg.start, "end_time": seg.end, "step_unique_id": uids[k]}
        if annotated:
            required = [uids[j] for j in range(k) if j % 3 != 2]
            missing = [u for u in required if u not in done]
            following = [k + 1] + ([k + 2] if (k + 1) % 3 == 2 else [])
            entry.update(previous_keysteps=required, is_optional=k % 3 == 2, is_procedural_mistake=bool(missing),
                         missing_keysteps=missing, next_keysteps=[uids[j] for j in following if j < steps])
        segments.append(entry)
        done.add(uids[k])
    return {"take_uid": p.take_uid, "take_name": p.take_name, "scenario": p.scenario.name, "segments": segments}


def _atomic(p: TakePlan) -> dict:
    rng = np.random.default_rng([p.seed, 3])
    descriptions = []
    for k in range(int(p.seconds // 1.5)):
        obj = p.objects[k % len(p.objects)]["name"].rsplit("_", 1)[0]
        verb = ("picks up", "looks at", "moves", "holds")[k % 4]
        descriptions.append({"text": f"C {verb} the {obj}", "timestamp": round(0.75 + 1.5 * k, 3),
                             "subject": "C", "ego_visible": True, "unsure": False})
    return {"annotation_uid": _uuid(rng), "annotator_id": _uuid(rng), "rejected": False, "reject_reason": None,
            "descriptions": descriptions}


def _commentary(p: TakePlan) -> dict:
    rng = np.random.default_rng([p.seed, 4])
    comments = [{"video_time": round(p.seconds * f, 3), "duration": 2.0,
                 "text": f"The demonstrator shows {p.proficiency.lower()} control here.", "recording": f"{k}.webm"}
                for k, f in enumerate((0.3, 0.7))]
    return {"take_uid": p.take_uid, "take_name": p.take_name, "commentator": _uuid(rng),
            "proficiency": p.proficiency, "commentary_data": comments}
