"""How the demonstrator moves: the labels of a take, turned into 3D motion for every frame.

See the docstring of ``engine.miniature.synth`` for which label leaves which trace.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.miniature import scene as sc
from engine.release.catalog import BODY_JOINTS, FINGERS, HAND_JOINTS, PROFICIENCY_LEVELS

FPS = 30
# Hand and head tremor (metres, std) per proficiency level; each take scales it by U(0.8, 1.25),
# so neighbouring levels overlap a little.
TREMOR = dict(zip(PROFICIENCY_LEVELS, (0.026, 0.016, 0.009, 0.004)))
EVENT_SECONDS = 0.5             # how long a demonstration event shows
HELD_IDLE_COLOUR = (150, 150, 150)


def keystep_colour(label_id: int) -> np.ndarray:
    """A distinct saturated colour per keystep class: the held object's colour during the step."""
    hue = (label_id * 0.618034) % 1.0
    value = 1.0 if label_id % 2 == 0 else 0.7
    return (np.array(_hsv_to_rgb(hue, 0.9, value)) * 255).astype(np.uint8)


def keystep_motion(label_id: int) -> tuple[float, float]:
    """(frequency Hz, radius m) of the hand circling while performing a keystep."""
    return 0.5 + 0.25 * (label_id % 5), 0.03 + 0.015 * (label_id % 3)


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def smooth_noise(rng: np.random.Generator, n: int, dims: int, width: int) -> np.ndarray:
    """Unit-variance noise low-passed by a moving average of ``width`` frames."""
    raw = rng.standard_normal((n + width, dims))
    # A running sum, not np.convolve (whose dot products may round with memory alignment).
    total = np.concatenate([np.zeros((1, dims)), np.cumsum(raw, axis=0)])
    out = (total[width:width + n] - total[:n]) / width
    return out / out.std(axis=0, keepdims=True).clip(1e-9)


@dataclasses.dataclass
class Segment:
    start: float
    end: float
    step_index: int       # index into the scenario's keysteps
    label_id: int         # keystep class
    trace_label_id: int   # the class whose colour and motion are shown (differs under label noise)


@dataclasses.dataclass
class Event:
    time: float
    kind: str             # "good" or "tip"
    visible: bool         # False for the events whose trace is left out (label noise)


def simulate(rng: np.random.Generator, n_frames: int, height_m: float, procedural: bool,
             proficiency: str, segments: list[Segment], events: list[Event],
             object_specs: list[dict]) -> sc.SceneState:
    t = np.arange(n_frames) / FPS
    tremor = TREMOR[proficiency] * rng.uniform(0.8, 1.25)
    eye_height = height_m * 0.94
    # Head: slow sway plus tremor.
    head = np.zeros((n_frames, 3))
    head[:, 2] = eye_height
    head += 0.05 * smooth_noise(rng, n_frames, 3, 45) * [1, 1, 0.2]
    head += tremor * 0.5 * smooth_noise(rng, n_frames, 3, 4)
    yaw = 0.15 * np.sin(2 * np.pi * t / rng.uniform(5, 9) + rng.uniform(0, 6.3))
    forward = np.stack([np.cos(yaw), np.sin(yaw), np.zeros_like(yaw)], axis=1)
    left = np.stack([-np.sin(yaw), np.cos(yaw), np.zeros_like(yaw)], axis=1)
    up = np.array([0.0, 0.0, 1.0])

    # Right hand: circles at the work point with the keystep's frequency and radius;
    # physical scenarios repeat a drill motion instead.
    work = head * [1, 1, 0] + forward * 0.42 + up * (eye_height - 0.55)
    right = work - left * 0.12
    left_hand = work + left * 0.16
    held_colour = np.tile(np.array(HELD_IDLE_COLOUR, np.uint8), (n_frames, 1))
    if procedural:
        for seg in segments:
            sel = (t >= seg.start) & (t < seg.end)
            freq, radius = keystep_motion(seg.trace_label_id)
            phase = 2 * np.pi * freq * (t[sel] - seg.start)
            right[sel] += radius * (np.cos(phase)[:, None] * left[sel] + np.sin(phase)[:, None] * up)
            held_colour[sel] = keystep_colour(seg.trace_label_id)
    else:
        drill = 0.12 * np.sin(2 * np.pi * 1.2 * t)
        right += drill[:, None] * up
        left_hand += -drill[:, None] * up * 0.5
        head += (0.03 * np.sin(2 * np.pi * 0.6 * t))[:, None] * left
    right += tremor * smooth_noise(rng, n_frames, 3, 3)
    left_hand += tremor * 0.6 * smooth_noise(rng, n_frames, 3, 3)
    for ev in events:
        sel = (t >= ev.time - EVENT_SECONDS / 2) & (t < ev.time + EVENT_SECONDS / 2)
        if ev.visible:
            # Good execution: the held object flashes white. Tip: it goes dark and the hand drops.
            held_colour[sel] = (250, 250, 250) if ev.kind == "good" else (20, 20, 20)
            if ev.kind == "tip":
                right[sel] -= up * 0.08

    body = _body(head, forward, left, right, left_hand, eye_height)
    hands = np.concatenate([_hand(body, "left", left), _hand(body, "right", left)], axis=1)
    held = hands[:, HAND_JOINTS.index("right_middle_2")] + forward * 0.05
    objects = [dict(spec, label=sc.OBJECT0 + k) for k, spec in enumerate(object_specs)]
    # The Aria camera sits between the eyes and looks at the hands (procedural) or ahead
    # (physical); tremor shakes it like the head it rides on.
    eye = head + forward * 0.08 + up * 0.02
    if procedural:
        gaze = work + up * 0.05
    else:
        gaze = eye + forward * 2.0 - up * 0.7
    gaze = gaze + tremor * 1.5 * smooth_noise(rng, n_frames, 3, 3)
    return sc.SceneState(body=body, hands=hands, head=head + up * 0.02, held=held,
                         held_label_colour=held_colour, objects=objects, eye=eye, gaze=gaze)


def _body(head, forward, left, right_wrist, left_wrist, eye_height) -> np.ndarray:
    j = {}
    up = np.array([0.0, 0.0, 1.0])
    j["nose"] = head + forward * 0.09 - up * 0.03
    j["left-eye"] = head + forward * 0.07 + left * 0.03
    j["right-eye"] = head + forward * 0.07 - left * 0.03
    j["left-ear"] = head + left * 0.075 - up * 0.02
    j["right-ear"] = head - left * 0.075 - up * 0.02
    neck = head - up * 0.22 - forward * 0.03
    j["left-shoulder"] = neck + left * 0.18
    j["right-shoulder"] = neck - left * 0.18
    pelvis = head * [1, 1, 0] + up * (eye_height * 0.56) - forward * 0.02
    j["left-hip"] = pelvis + left * 0.1
    j["right-hip"] = pelvis - left * 0.1
    for side, wrist in (("left", left_wrist), ("right", right_wrist)):
        shoulder = j[f"{side}-shoulder"]
        outward = left if side == "left" else -left
        j[f"{side}-elbow"] = (shoulder + wrist) / 2 - up * 0.12 + outward * 0.06
        j[f"{side}-wrist"] = wrist
        hip = j[f"{side}-hip"]
        knee = hip * [1, 1, 0] + up * (eye_height * 0.29) + forward * 0.03
        j[f"{side}-knee"] = knee
        j[f"{side}-ankle"] = knee * [1, 1, 0] + up * 0.08
    return np.stack([j[name] for name in BODY_JOINTS], axis=1)


def _hand(body: np.ndarray, side: str, left: np.ndarray) -> np.ndarray:
    """21 joints of one hand: fingers fan out along the forearm, slightly curled."""
    wrist = body[:, BODY_JOINTS.index(f"{side}-wrist")]
    elbow = body[:, BODY_JOINTS.index(f"{side}-elbow")]
    along = wrist - elbow
    along /= np.sqrt((along * along).sum(axis=1, keepdims=True))
    across = left if side == "left" else -left
    joints = [wrist]
    for f, finger in enumerate(FINGERS):
        spread = (f - 2) * 0.02 + (0.015 if finger == "thumb" else 0.0)
        base = 0.035 if finger == "thumb" else 0.07
        for k in range(1, 5):
            reach = base * (0.4 if finger == "thumb" else 1.0) + 0.022 * k
            joints.append(wrist + along * reach + across * spread * (1 + 0.2 * k) - np.array([0, 0, 0.006 * k * k]))
    return np.stack(joints, axis=1)
