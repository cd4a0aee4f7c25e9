"""Dense per-frame annotations of a take as numeric arrays: the compact form of ego pose, camera pose and relations masks.

The release keeps these as JSON (one object per frame and joint, masks as LZString-packed RLE strings);
here each value is stored once, as a number, in one ``.npz`` member per family and window. The arrays
read with ``np.load(io.BytesIO(data), allow_pickle=False)``; a small JSON description per member says
what each array is (dtype, shape, axes) and names the joints, cameras and objects its indices refer to.

Members of one window [f0, f1) (frames at 30 fps; a family with no rows in the window is left out,
``camera_pose`` is kept as long as the take has one since its static part holds for every window):

  ego_pose_body_annotation.npz, ego_pose_body_automatic.npz,      one per pose family
  ego_pose_hand_annotation.npz, ego_pose_hand_automatic.npz
    frames            int32   [N]           annotated frame numbers, ascending
    joints3d          float32 [N, J, 3]     world x, y, z in metres; NaN = joint not annotated
    joints2d          float32 [N, C, J, 2]  undistorted pixel x, y per camera; NaN = not annotated in that camera
    num_views_for_3d  int8    [N, J]        views the 3D joint was triangulated from; -1 = absent
    placement         int8    [N, C, J]     index into the description's ``placement_codes``; -1 = absent.
                                            Only when the take's values differ; a single value is
                                            written once as the description's ``placement``.
  camera_pose.npz
    intrinsics        float64 [C, 3, 3]     per camera (static, a few hundred bytes: kept exact)
    static_extrinsics float64 [C, 3, 4]     world -> camera; NaN for a moving camera (its poses are below)
    distortion        float64 [C, K]        ``distortion_coeffs``; NaN-padded, NaN rows for cameras without
    frames            int32   [N]           per-frame poses of moving (ego) cameras, ascending by camera, frame
    camera            int16   [N]           index into ``cameras``
    extrinsics        float32 [N, 3, 4]     world -> camera [R | t], t in metres
  relations.npz
    runs              uint32  [total]       every mask's uncompressed COCO RLE, concatenated: run lengths
                                            over the column-major pixels, the first run counting zeros
    offsets           int64   [M + 1]       mask m's runs are runs[offsets[m]:offsets[m + 1]]
    frames            int32   [M]
    object            int16   [M]           index into ``objects``
    camera            int16   [M]           index into ``cameras`` (view keys: aria01_214-1, cam01, ...)
    height, width     int32   [M]
    unmasked_frames, unmasked_object, unmasked_camera   int32/int16/int16 [K]
                                            listed in ``annotated_frames`` without a mask (object not
                                            visible)

Joints are in the official order (``engine.release.catalog``), then any other name found, sorted;
cameras are sorted names. ``window`` writes these, ``read_window`` reads them back and
``pose_frames``, ``mask``, ``ego_extrinsics`` turn arrays back into the release's terms.
"""
from __future__ import annotations

import dataclasses
import io
import zipfile
from itertools import chain, repeat
from operator import itemgetter

import numpy as np

from engine.release.catalog import BODY_JOINTS, HAND_JOINTS
from engine.release.masks import decode_runs, runs_to_mask
from engine.release.records import RelationsTake

POSE_FAMILIES = ("ego_pose_body_annotation", "ego_pose_body_automatic", "ego_pose_hand_annotation", "ego_pose_hand_automatic")
CAMERA_POSE = "camera_pose"
RELATIONS = "relations"


def member_name(family: str) -> str:
    return f"{family}.npz"


# ----------------------------------------------------------------------------- npz and descriptions

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` member. Compressed: np.savez writes 1.3x these bytes on the miniature (4x for the RLE runs;
    NaN padding and -1 codes deflate too); the float mantissas themselves do not. Deflate level 1, not
    np.savez_compressed's 6: as small on these arrays (measured: 1.4% smaller) in 60% of the time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def _describe(family: str, arrays: dict[str, np.ndarray], axes: dict[str, list[str]], **names) -> dict:
    arrays_json = {name: {"dtype": str(a.dtype), "shape": list(a.shape), "axes": axes[name]} for name, a in arrays.items()}
    return {"member": member_name(family), "family": family, "arrays": arrays_json, **names}


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` member (no pickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def read_window(members: dict[str, bytes], descriptions: dict) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of every described family present in ``members`` (member name -> bytes), keyed like ``descriptions``.

    Each array is checked against its description (dtype and shape); a mismatch raises ValueError.
    """
    out = {}
    for family, description in descriptions.items():
        data = members.get(description["member"])
        if data is None:
            continue
        arrays = load_npz(data)
        for name, spec in description["arrays"].items():
            if name not in arrays:
                raise ValueError(f"{description['member']}: array {name!r} is described but missing")
            a = arrays[name]
            if str(a.dtype) != spec["dtype"] or list(a.shape) != spec["shape"]:
                raise ValueError(f"{description['member']}: {name} is {a.dtype} {list(a.shape)}, "
                                 f"described as {spec['dtype']} {spec['shape']}")
        out[family] = arrays
    return out


# ----------------------------------------------------------------------------- ego pose

_POSE_AXES = {"frames": ["frame"], "joints3d": ["frame", "joint", "xyz"], "joints2d": ["frame", "camera", "joint", "xy"],
              "num_views_for_3d": ["frame", "joint"], "placement": ["frame", "camera", "joint"]}


def _floats(points: list[tuple], width: int) -> np.ndarray:
    """float32 [len(points), width] of equal-length tuples (None becomes NaN). Through one flat
    iterator: numpy reads a list of tuples about 3x slower."""
    flat = np.fromiter(chain.from_iterable(points), np.float32, count=width * len(points))
    return flat.reshape(len(points), width)


@dataclasses.dataclass
class PoseTrack:
    """One pose family of a take (e.g. manual body), every annotated frame."""
    joints: list[str]
    cameras: list[str]
    arrays: dict[str, np.ndarray]     # frames, joints3d, joints2d, and num_views_for_3d / placement when present
    placement: str | None = None      # the single placement value, when it never changes
    placement_codes: list[str] | None = None

    @classmethod
    def parse(cls, raw: dict, official: tuple[str, ...]) -> PoseTrack:
        """From the release's JSON: {frame: [{"annotation3D": {joint: {x, y, z, num_views_for_3d}},
        "annotation2D": {cam: {joint: {x, y, placement}}}, "metadata": ...}]}. The metadata repeats the take
        and the frame number and is not kept. Like ``records.parse_pose_frames``, the first entry of a frame is used."""
        entries = {}
        for key, value in raw.items():
            entry = value[0] if isinstance(value, list) and value else value
            if isinstance(entry, dict):
                entries[int(key)] = entry
        frames = sorted(entries)
        names3d = {j for e in entries.values() for j in (e.get("annotation3D") or {})}
        names2d = {j for e in entries.values() for joints in (e.get("annotation2D") or {}).values() for j in joints}
        cameras = sorted({c for e in entries.values() for c in (e.get("annotation2D") or {})})
        # Every official joint, even one never annotated: a family has the same joint axis in every take.
        joints = list(official) + sorted((names3d | names2d) - set(official))
        joint_index = {j: i for i, j in enumerate(joints)}
        camera_index = {c: i for i, c in enumerate(cameras)}
        n, nj, nc = len(frames), len(joints), len(cameras)
        # One flat list per array, filled in a single numpy assignment: setting items one by one
        # costs microseconds each, and a take has hundreds of thousands of them. The lists are
        # extended a dict at a time through map/itemgetter (C loops): a Python step per point was
        # most of a shard job's time on pose-heavy takes.
        rows3d, index3d, values3d, views3d = [], [], [], []
        rows2d, cams2d, index2d, values2d, placements = [], [], [], [], []
        xyz, xy = itemgetter("x", "y", "z"), itemgetter("x", "y")
        for row, frame in enumerate(frames):
            entry = entries[frame]
            points = (entry.get("annotation3D") or {}).values()
            rows3d += repeat(row, len(points))
            index3d += map(joint_index.__getitem__, entry.get("annotation3D") or {})
            values3d += map(xyz, points)
            views3d += map(dict.get, points, repeat("num_views_for_3d"))
            for cam, named in (entry.get("annotation2D") or {}).items():
                points = named.values()
                rows2d += repeat(row, len(points))
                cams2d += repeat(camera_index[cam], len(points))
                index2d += map(joint_index.__getitem__, named)
                values2d += map(xy, points)
                placements += map(dict.get, points, repeat("placement"))
        # Codes in order of first appearance, as a value is first met frame by frame.
        codes: dict[str, int] = {}
        for value in dict.fromkeys(placements):
            if value is not None:
                codes.setdefault(value, len(codes))
        joints3d = np.full((n, nj, 3), np.nan, np.float32)
        joints2d = np.full((n, nc, nj, 2), np.nan, np.float32)
        views = np.full((n, nj), -1, np.int8)
        placement = np.full((n, nc, nj), -1, np.int8)
        has_views = any(v is not None for v in views3d)
        if rows3d:
            rows, index = np.asarray(rows3d), np.asarray(index3d)
            joints3d[rows, index] = _floats(values3d, 3)
            views[rows, index] = [-1 if v is None else v for v in views3d]
        if rows2d:
            rows, cams, index = np.asarray(rows2d), np.asarray(cams2d), np.asarray(index2d)
            joints2d[rows, cams, index] = _floats(values2d, 2)
            if len(codes) > 1:       # else no per-point codes are written (below)
                placement[rows, cams, index] = [-1 if v is None else codes[v] for v in placements]
        arrays = {"frames": np.asarray(frames, np.int32), "joints3d": joints3d, "joints2d": joints2d}
        if has_views:
            arrays["num_views_for_3d"] = views
        track = cls(joints, cameras, arrays)
        if len(codes) == 1:          # one value for the whole take (the miniature's case): it says nothing per joint
            track.placement = next(iter(codes))
        elif codes:
            arrays["placement"] = placement
            track.placement_codes = sorted(codes, key=codes.get)
        return track

    def window(self, family: str, f0: int, f1: int) -> tuple[str, bytes, dict] | None:
        frames = self.arrays["frames"]
        rows = (frames >= f0) & (frames < f1)
        if not rows.any():
            return None
        arrays = {name: a[rows] for name, a in self.arrays.items()}
        names = {"joints": self.joints, "cameras": self.cameras}
        if self.placement is not None:
            names["placement"] = self.placement
        if self.placement_codes is not None:
            names["placement_codes"] = self.placement_codes
        return member_name(family), npz_bytes(arrays), _describe(family, arrays, _POSE_AXES, **names)


def pose_frames(arrays: dict[str, np.ndarray], description: dict) -> dict[int, dict]:
    """A pose family back in the release's terms: {frame: {"annotation3D": {joint: {x, y, z[, num_views_for_3d]}},
    "annotation2D": {cam: {joint: {x, y[, placement]}}}}}, only the joints present (values are the float32 ones)."""
    joints, cameras = description["joints"], description["cameras"]
    codes = description.get("placement_codes")
    out = {}
    for row, frame in enumerate(arrays["frames"].tolist()):
        ann3d = {}
        for j, name in enumerate(joints):
            x, y, z = arrays["joints3d"][row, j].tolist()
            if not np.isnan(x):
                ann3d[name] = {"x": x, "y": y, "z": z}
                if "num_views_for_3d" in arrays and arrays["num_views_for_3d"][row, j] >= 0:
                    ann3d[name]["num_views_for_3d"] = int(arrays["num_views_for_3d"][row, j])
        ann2d = {}
        for c, cam in enumerate(cameras):
            points = {}
            for j, name in enumerate(joints):
                x, y = arrays["joints2d"][row, c, j].tolist()
                if np.isnan(x):
                    continue
                points[name] = {"x": x, "y": y}
                if "placement" in arrays and arrays["placement"][row, c, j] >= 0:
                    points[name]["placement"] = codes[arrays["placement"][row, c, j]]
                elif description.get("placement") is not None:
                    points[name]["placement"] = description["placement"]
            if points:
                ann2d[cam] = points
        out[frame] = {"annotation3D": ann3d, "annotation2D": ann2d}
    return out


# ----------------------------------------------------------------------------- camera pose

_CAMERA_AXES = {"intrinsics": ["camera", "row", "column"], "static_extrinsics": ["camera", "row", "column"],
                "distortion": ["camera", "coefficient"], "frames": ["pose"], "camera": ["pose"],
                "extrinsics": ["pose", "row", "column"]}


@dataclasses.dataclass
class CameraTrack:
    """A take's camera_pose file: static intrinsics and exo poses, per-frame poses of the moving (Aria) camera."""
    cameras: list[str]
    static: dict[str, np.ndarray]      # intrinsics, static_extrinsics, distortion
    moving: dict[str, np.ndarray]      # frames, camera, extrinsics
    metadata: dict
    extra: dict                        # per-camera fields other than intrinsics, extrinsics, distortion (none in the miniature)

    @classmethod
    def parse(cls, raw: dict) -> CameraTrack:
        entries = {cam: e for cam, e in raw.items() if cam != "metadata" and isinstance(e, dict)}
        cameras = sorted(entries)
        n = len(cameras)
        intrinsics = np.full((n, 3, 3), np.nan)
        static = np.full((n, 3, 4), np.nan)
        distortion_lists = {}
        frames, which, poses, extra = [], [], [], {}
        for c, cam in enumerate(cameras):
            entry = entries[cam]
            if entry.get("camera_intrinsics") is not None:
                intrinsics[c] = entry["camera_intrinsics"]
            ext = entry.get("camera_extrinsics")
            if isinstance(ext, dict):
                for f in sorted(ext, key=int):
                    frames.append(int(f))
                    which.append(c)
                    poses.append(ext[f])
            elif ext is not None:
                static[c] = ext
            if entry.get("distortion_coeffs") is not None:
                distortion_lists[c] = entry["distortion_coeffs"]
            rest = {k: v for k, v in entry.items() if k not in ("camera_intrinsics", "camera_extrinsics", "distortion_coeffs")}
            if rest:
                extra[cam] = rest
        static_arrays = {"intrinsics": intrinsics, "static_extrinsics": static}
        if distortion_lists:
            width = max(len(d) for d in distortion_lists.values())
            distortion = np.full((n, width), np.nan)
            for c, coeffs in distortion_lists.items():
                distortion[c, :len(coeffs)] = coeffs
            static_arrays["distortion"] = distortion
        moving = {"frames": np.asarray(frames, np.int32), "camera": np.asarray(which, np.int16),
                  "extrinsics": np.asarray(poses, np.float32).reshape(-1, 3, 4)}
        return cls(cameras, static_arrays, moving, raw.get("metadata") or {}, extra)

    def window(self, f0: int, f1: int) -> tuple[str, bytes, dict]:
        rows = (self.moving["frames"] >= f0) & (self.moving["frames"] < f1)
        arrays = {**self.static, **{name: a[rows] for name, a in self.moving.items()}}
        moving = sorted({self.cameras[c] for c in self.moving["camera"].tolist()})
        names = {"cameras": self.cameras, "moving_cameras": moving, "metadata": self.metadata}
        if self.extra:
            names["camera_extra"] = self.extra
        return member_name(CAMERA_POSE), npz_bytes(arrays), _describe(CAMERA_POSE, arrays, _CAMERA_AXES, **names)


def ego_extrinsics(arrays: dict[str, np.ndarray], description: dict, camera: str | None = None) -> dict[int, np.ndarray]:
    """{frame: float32 [3, 4] world -> camera} of a moving camera (default: the only one, the Aria)."""
    if camera is None:
        if len(description["moving_cameras"]) != 1:
            raise ValueError(f"name the camera: moving cameras are {description['moving_cameras']}")
        camera = description["moving_cameras"][0]
    index = description["cameras"].index(camera)
    rows = np.flatnonzero(arrays["camera"] == index)
    return {int(arrays["frames"][r]): arrays["extrinsics"][r] for r in rows}


# ----------------------------------------------------------------------------- relations masks

_RELATIONS_AXES = {"runs": ["run"], "offsets": ["mask + 1"], "frames": ["mask"], "object": ["mask"], "camera": ["mask"],
                   "height": ["mask"], "width": ["mask"], "unmasked_frames": ["entry"], "unmasked_object": ["entry"],
                   "unmasked_camera": ["entry"]}


@dataclasses.dataclass
class MaskTrack:
    """Every relations mask of a take, decoded once to RLE runs."""
    objects: list[str]
    cameras: list[str]
    arrays: dict[str, np.ndarray]     # per mask: frames, object, camera, height, width; runs in a list until cut
    runs: list[np.ndarray]
    unmasked: dict[str, np.ndarray]   # annotated frames without a mask (object not visible there)

    @classmethod
    def parse(cls, relations: RelationsTake) -> MaskTrack:
        object_masks = relations.object_masks
        objects = sorted(object_masks)
        cameras = sorted({view for views in object_masks.values() for view in views})
        rows = []
        for o, obj in enumerate(objects):
            for view, frames in object_masks[obj].items():
                for frame, encoded in frames.items():
                    rows.append((int(frame), o, cameras.index(view), encoded))
        rows.sort(key=lambda r: r[:3])
        # COCO's counts are the runs themselves: no mask is drawn to get them.
        runs = [decode_runs(encoded.encoded, encoded.height, encoded.width) for *_, encoded in rows]
        arrays = {"frames": np.asarray([r[0] for r in rows], np.int32), "object": np.asarray([r[1] for r in rows], np.int16),
                  "camera": np.asarray([r[2] for r in rows], np.int16),
                  "height": np.asarray([r[3].height for r in rows], np.int32),
                  "width": np.asarray([r[3].width for r in rows], np.int32)}
        empty = sorted((f, objects.index(obj), cameras.index(view))
                       for obj, views in relations.annotated_frames.items() for view, frames in views.items()
                       for f in frames if f not in object_masks.get(obj, {}).get(view, {})
                       and obj in objects and view in cameras)
        unmasked = {"unmasked_frames": np.asarray([e[0] for e in empty], np.int32),
                    "unmasked_object": np.asarray([e[1] for e in empty], np.int16),
                    "unmasked_camera": np.asarray([e[2] for e in empty], np.int16)}
        return cls(objects, cameras, arrays, runs, unmasked)

    def window(self, f0: int, f1: int) -> tuple[str, bytes, dict] | None:
        selected = np.flatnonzero((self.arrays["frames"] >= f0) & (self.arrays["frames"] < f1))
        arrays = {name: a[selected] for name, a in self.arrays.items()}
        keep = (self.unmasked["unmasked_frames"] >= f0) & (self.unmasked["unmasked_frames"] < f1)
        arrays.update({name: a[keep] for name, a in self.unmasked.items()})
        if not any(len(a) for a in arrays.values()):
            return None
        runs = [self.runs[i] for i in selected]
        arrays["runs"] = np.concatenate(runs) if runs else np.zeros(0, np.uint32)
        arrays["offsets"] = np.concatenate([[0], np.cumsum([len(r) for r in runs], dtype=np.int64)]).astype(np.int64)
        names = {"objects": self.objects, "cameras": self.cameras}
        return member_name(RELATIONS), npz_bytes(arrays), _describe(RELATIONS, arrays, _RELATIONS_AXES, **names)


def mask(arrays: dict[str, np.ndarray], description: dict, object: str, camera: str, frame: int) -> np.ndarray:
    """The bool mask [height, width] of ``object`` in view ``camera`` at ``frame``; KeyError when there is none."""
    hits = np.flatnonzero((arrays["frames"] == frame) & (arrays["object"] == description["objects"].index(object))
                          & (arrays["camera"] == description["cameras"].index(camera)))
    if not len(hits):
        raise KeyError(f"no mask of {object!r} in {camera} at frame {frame}")
    m = hits[0]
    runs = arrays["runs"][arrays["offsets"][m]:arrays["offsets"][m + 1]]
    return runs_to_mask(runs, int(arrays["height"][m]), int(arrays["width"][m]))


# ----------------------------------------------------------------------------- a take

@dataclasses.dataclass
class TakeDense:
    """The dense annotations of one take, parsed once; ``window`` cuts the members of one sample."""
    poses: dict[str, PoseTrack]
    cameras: CameraTrack | None
    masks: MaskTrack | None

    @classmethod
    def from_annotations(cls, ann: dict) -> TakeDense:
        """From ``engine.shards.sample._take_annotations``'s dict."""
        poses = {}
        for family in POSE_FAMILIES:
            if ann.get(family):
                poses[family] = PoseTrack.parse(ann[family], BODY_JOINTS if "_body_" in family else HAND_JOINTS)
        cameras = CameraTrack.parse(ann[CAMERA_POSE]) if ann.get(CAMERA_POSE) else None
        masks = MaskTrack.parse(ann[RELATIONS]) if RELATIONS in ann else None
        return cls(poses, cameras, masks)

    def window(self, f0: int, f1: int) -> list[tuple[str, bytes, dict]]:
        """(member name, npz bytes, description) of every family with something in frames [f0, f1)."""
        parts = [track.window(family, f0, f1) for family, track in self.poses.items()]
        if self.cameras is not None:
            parts.append(self.cameras.window(f0, f1))
        if self.masks is not None:
            parts.append(self.masks.window(f0, f1))
        return [p for p in parts if p is not None]

