"""The 3D scene behind one miniature take, and its rendering into every camera.

World frame: metres, z up, the demonstrator standing near the origin facing +x.
Cameras follow OpenCV conventions (x right, y down, z forward); extrinsics map world to
camera, ``x_cam = R @ x_world + t``, as in Ego-Exo4D's camera_pose files.

Everything a take shows is computed here from its plan, for all frames at once, so that
every view, every keypoint file and every mask is a projection of the same scene.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.release.catalog import BODY_JOINTS, FINGERS, HAND_JOINTS

# Label ids of the label image each view is rendered into; colours come from a per-frame table.
BG, FLOOR_A, FLOOR_B, BODY, HEAD, HAND, HELD = 0, 1, 2, 3, 4, 5, 6
OBJECT0 = 8                     # static objects take labels OBJECT0, OBJECT0 + 1, ...
STAMP_BLACK, STAMP_WHITE = 14, 15  # the frame stamp's cells
NUM_LABELS = 16
NEAR = 0.05                     # near clipping plane, metres


# Geometry is written with elementwise arithmetic, not matmul: BLAS kernels may round
# differently with the memory alignment of their inputs, and one flipped edge pixel is
# enough to change an encoded video. Elementwise ufuncs round the same way every run.

def transform(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``points @ R.T + t`` for points [..., 3]."""
    return points[..., 0:1] * R[:, 0] + points[..., 1:2] * R[:, 1] + points[..., 2:3] * R[:, 2] + t


def camera_centre(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``-R.T @ t``: the camera's position in the world."""
    return -(R[0] * t[0] + R[1] * t[1] + R[2] * t[2])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt((v * v).sum())


def look_at(position: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera rotation and translation of a camera at ``position`` looking at ``target``."""
    forward = _unit(target - position)
    right = _unit(np.cross(forward, [0.0, 0.0, 1.0]))
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    return rotation, -transform(position, rotation, np.zeros(3))


def intrinsics(width: int, height: int, hfov_deg: float) -> np.ndarray:
    f = (width / 2) / np.tan(np.radians(hfov_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=np.float64)


def project(points: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates [N, 2] and camera depth [N] of world points [N, 3]."""
    cam = transform(points, R, t)
    z = cam[:, 2]
    uv = (cam[:, :2] / np.maximum(z, 1e-9)[:, None]) * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    return uv, z


@dataclasses.dataclass
class Camera:
    name: str           # cam_id for exo, the ego stream name for the Aria camera
    width: int
    height: int
    K: np.ndarray
    R: np.ndarray       # [3, 3] or [T, 3, 3] for a moving camera
    t: np.ndarray       # [3] or [T, 3]

    def pose(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        if self.R.ndim == 3:
            return self.R[frame], self.t[frame]
        return self.R, self.t


# Bones drawn as capsules: (joint a, joint b, radius in metres).
BODY_BONES = [
    ("left-shoulder", "right-shoulder", 0.06), ("left-hip", "right-hip", 0.07),
    ("left-shoulder", "left-hip", 0.09), ("right-shoulder", "right-hip", 0.09),
    ("left-shoulder", "left-elbow", 0.045), ("left-elbow", "left-wrist", 0.04),
    ("right-shoulder", "right-elbow", 0.045), ("right-elbow", "right-wrist", 0.04),
    ("left-hip", "left-knee", 0.06), ("left-knee", "left-ankle", 0.05),
    ("right-hip", "right-knee", 0.06), ("right-knee", "right-ankle", 0.05),
]
_BODY_INDEX = {name: i for i, name in enumerate(BODY_JOINTS)}
_HAND_INDEX = {name: i for i, name in enumerate(HAND_JOINTS)}


@dataclasses.dataclass
class SceneState:
    """Everything visible in a take, for all T frames."""
    body: np.ndarray            # [T, 17, 3]
    hands: np.ndarray           # [T, 42, 3]
    head: np.ndarray            # [T, 3] centre of the head
    held: np.ndarray            # [T, 3] centre of the object in the right hand
    held_label_colour: np.ndarray  # [T, 3] uint8 colour of the held object
    objects: list[dict]         # static objects: name, label, centre [3], size, shape, colour
    eye: np.ndarray             # [T, 3] optical centre of the Aria RGB camera
    gaze: np.ndarray            # [T, 3] the point that camera looks at


class Canvas:
    """A label image with painter's-algorithm primitives clipped to the frame."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.label = np.zeros((height, width), np.uint8)

    def _box(self, xmin, xmax, ymin, ymax):
        x0, x1 = max(int(np.floor(xmin)), 0), min(int(np.ceil(xmax)) + 1, self.width)
        y0, y1 = max(int(np.floor(ymin)), 0), min(int(np.ceil(ymax)) + 1, self.height)
        if x0 >= x1 or y0 >= y1:
            return None
        return x0, x1, y0, y1

    def disk(self, cx: float, cy: float, r: float, label: int) -> None:
        box = self._box(cx - r, cx + r, cy - r, cy + r)
        if box is None:
            return
        x0, x1, y0, y1 = box
        ys, xs = np.ogrid[y0:y1, x0:x1]
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        self.label[y0:y1, x0:x1][inside] = label

    def capsule(self, a: np.ndarray, b: np.ndarray, r: float, label: int) -> None:
        box = self._box(min(a[0], b[0]) - r, max(a[0], b[0]) + r, min(a[1], b[1]) - r, max(a[1], b[1]) + r)
        if box is None:
            return
        x0, x1, y0, y1 = box
        ys, xs = np.ogrid[y0:y1, x0:x1]
        d = b - a
        px, py = xs - a[0], ys - a[1]
        s = np.clip((px * d[0] + py * d[1]) / max(d[0] * d[0] + d[1] * d[1], 1e-9), 0.0, 1.0)
        inside = (px - s * d[0]) ** 2 + (py - s * d[1]) ** 2 <= r * r
        self.label[y0:y1, x0:x1][inside] = label

    def convex(self, points: np.ndarray, label: int) -> None:
        hull = convex_hull(points)
        box = self._box(hull[:, 0].min(), hull[:, 0].max(), hull[:, 1].min(), hull[:, 1].max())
        if box is None or len(hull) < 3:
            return
        x0, x1, y0, y1 = box
        ys, xs = np.ogrid[y0:y1, x0:x1]
        inside = np.ones((y1 - y0, x1 - x0), bool)
        for p, q in zip(hull, np.roll(hull, -1, axis=0)):
            # Counter-clockwise hull in image coordinates: inside is left of each edge.
            inside &= (q[0] - p[0]) * (ys - p[1]) - (q[1] - p[1]) * (xs - p[0]) >= 0
        self.label[y0:y1, x0:x1][inside] = label


def convex_hull(points: np.ndarray) -> np.ndarray:
    pts = sorted(map(tuple, points))
    if len(pts) <= 2:
        return np.array(pts)

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def _clip_segment(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Clip a camera-space segment to the near plane."""
    if a[2] < NEAR and b[2] < NEAR:
        return None
    if a[2] < NEAR:
        a = a + (b - a) * (NEAR - a[2]) / (b[2] - a[2])
    elif b[2] < NEAR:
        b = b + (a - b) * (NEAR - b[2]) / (a[2] - b[2])
    return a, b


def render_labels(state: SceneState, camera: Camera, frame: int, floor: np.ndarray | None) -> np.ndarray:
    """The label image of one view at one frame (floor and background, then the scene by depth)."""
    R, t = camera.pose(frame)
    K = camera.K
    fx = K[0, 0]
    canvas = Canvas(camera.width, camera.height)
    canvas.label[:] = floor if floor is not None else floor_labels(camera, frame)

    def to_px(p):
        return np.array([p[0] / p[2] * fx + K[0, 2], p[1] / p[2] * K[1, 1] + K[1, 2]])

    items = []  # (depth, draw callable)
    body = transform(state.body[frame], R, t)
    for ja, jb, radius in BODY_BONES:
        seg = _clip_segment(body[_BODY_INDEX[ja]], body[_BODY_INDEX[jb]])
        if seg is not None:
            a, b = seg
            items.append(((a[2] + b[2]) / 2, canvas.capsule, (to_px(a), to_px(b), fx * radius / min(a[2], b[2]), BODY)))
    spheres = [(state.head[frame], 0.11, HEAD), (state.held[frame], 0.08, HELD)]
    hands = transform(state.hands[frame], R, t)
    for side in ("left", "right"):
        wrist = hands[_HAND_INDEX[f"{side}_wrist"]]
        spheres.append(((state.hands[frame][_HAND_INDEX[f"{side}_wrist"]]), 0.035, HAND))
        for finger in FINGERS:
            seg = _clip_segment(wrist, hands[_HAND_INDEX[f"{side}_{finger}_4"]])
            if seg is not None:
                a, b = seg
                items.append(((a[2] + b[2]) / 2, canvas.capsule, (to_px(a), to_px(b), fx * 0.011 / min(a[2], b[2]), HAND)))
    for centre, radius, label in spheres:
        c = transform(centre, R, t)
        if c[2] > NEAR + radius:
            items.append((c[2], canvas.disk, (*to_px(c), fx * radius / c[2], label)))
    for obj in state.objects:
        c = transform(obj["centre"], R, t)
        if c[2] <= NEAR + obj["size"]:
            continue
        if obj["shape"] == "sphere":
            items.append((c[2], canvas.disk, (*to_px(c), fx * obj["size"] / c[2], obj["label"])))
        else:
            corners = obj["centre"] + obj["size"] * np.array(
                [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
            cam = transform(corners, R, t)
            if (cam[:, 2] > NEAR).all():
                uv = cam[:, :2] / cam[:, 2:3] * [fx, K[1, 1]] + [K[0, 2], K[1, 2]]
                items.append((c[2], canvas.convex, (uv, obj["label"])))
    for _, draw, args in sorted(items, key=lambda item: -item[0]):
        draw(*args)
    return canvas.label


def floor_labels(camera: Camera, frame: int, step: int = 4) -> np.ndarray:
    """Checkerboard floor (0.5 m squares) seen by a camera, computed on a coarse grid."""
    R, t = camera.pose(frame)
    centre = camera_centre(R, t)
    h, w = -(-camera.height // step), -(-camera.width // step)
    v, u = np.mgrid[0:h, 0:w]
    rays = transform(np.stack([(u * step + step / 2 - camera.K[0, 2]) / camera.K[0, 0],
                               (v * step + step / 2 - camera.K[1, 2]) / camera.K[1, 1],
                               np.ones((h, w))], axis=-1), R.T, np.zeros(3))   # camera rays in the world
    with np.errstate(divide="ignore", invalid="ignore"):
        s = -centre[2] / rays[..., 2]
        x, y = centre[0] + s * rays[..., 0], centre[1] + s * rays[..., 1]
        on_floor = (rays[..., 2] < -1e-3) & (s < 25)
        checker = (np.floor(x / 0.5) + np.floor(y / 0.5)).astype(np.int64) & 1
    small = np.where(on_floor, np.where(checker == 1, FLOOR_A, FLOOR_B), BG).astype(np.uint8)
    return np.repeat(np.repeat(small, step, axis=0), step, axis=1)[:camera.height, :camera.width]

