"""Typed records of an Ego-Exo4D release, parsed tolerantly from the real JSON schemas.

Each ``parse_*`` function takes one raw entry and returns a record, or raises
``MalformedEntry`` with a short reason; unknown fields are ignored and optional ones may be
missing. Loaders in ``engine.release.reader`` turn those errors into per-entry problems.
"""
from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

import numpy as np

from engine.errors import ContentError

PSEUDO_CAMERAS = ("collage", "best_exo")
EGO_STREAM_KEYS = ("rgb", "214-1")


class MalformedEntry(ContentError, ValueError):
    """An annotation or metadata entry does not have the shape of the real schema."""

    def __init__(self, reason: str, code: str = "malformed_entry"):
        super().__init__(reason)
        self.code = code


def _req(entry: Any, key: str, kind=None):
    if not isinstance(entry, dict):
        raise MalformedEntry(f"expected an object, got {type(entry).__name__}")
    if key not in entry or entry[key] is None:
        raise MalformedEntry(f"missing field {key!r}")
    value = entry[key]
    if kind is not None and not isinstance(value, kind):
        raise MalformedEntry(f"field {key!r} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _num(entry: dict, key: str) -> float:
    value = _req(entry, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedEntry(f"field {key!r} should be a number, got {value!r}")
    return float(value)


def safe_relative(path: str) -> bool:
    """True for a relative POSIX path that stays below its base (no '..', not absolute)."""
    if not path or path.startswith("/") or "\\" in path:
        return False
    return ".." not in posixpath.normpath(path).split("/") and not posixpath.normpath(path).startswith("..")


# ----------------------------------------------------------------------------- takes

@dataclasses.dataclass(frozen=True)
class Stream:
    cam_id: str
    stream_key: str             # key in frame_aligned_videos: "rgb", "slam-left", "0", ...
    stream_id: str              # "214-1" for Aria RGB, "0" for GoPro
    relative_path: str          # relative to the take's root_dir
    is_collage: bool = False


@dataclasses.dataclass(frozen=True)
class CaptureCamera:
    cam_id: str
    is_ego: bool
    device_type: str | None = None


@dataclasses.dataclass(frozen=True)
class View:
    """One real camera stream of a take, with its file at a chosen resolution."""
    cam_id: str
    stream_id: str
    is_ego: bool
    path: str                   # relative to the release root

    @property
    def key(self) -> str:
        """The name relations annotations use: ``aria01_214-1`` for ego, ``cam01`` for exo."""
        return f"{self.cam_id}_{self.stream_id}" if self.is_ego else self.cam_id


@dataclasses.dataclass(frozen=True)
class Take:
    take_uid: str
    take_name: str
    root_dir: str
    parent_task_id: int | None
    parent_task_name: str | None
    task_id: int | None
    task_name: str | None
    duration_sec: float | None
    task_start_sec: float | None
    task_end_sec: float | None
    best_exo: str | None
    streams: tuple[Stream, ...]
    cameras: tuple[CaptureCamera, ...]
    raw: dict = dataclasses.field(repr=False, compare=False, hash=False)

    @property
    def scenario(self) -> str | None:
        return self.parent_task_name

    def _is_ego(self, cam_id: str) -> bool:
        for cam in self.cameras:
            if cam.cam_id == cam_id:
                return cam.is_ego
        return cam_id.startswith("aria")

    def views(self, resolution: str = "full") -> list[View]:
        """The ego RGB stream and every exo stream; SLAM, eye tracking and pseudo-cameras are not views.

        ``resolution`` is ``"full"`` or ``"448"`` (the ``downscaled/448`` copies).
        """
        if resolution not in ("full", "448"):
            raise ValueError(f"resolution must be 'full' or '448', got {resolution!r}")
        out = []
        for s in self.streams:
            if s.cam_id in PSEUDO_CAMERAS or s.is_collage:
                continue
            ego = self._is_ego(s.cam_id)
            if ego and s.stream_key not in EGO_STREAM_KEYS and s.stream_id != "214-1":
                continue
            rel = s.relative_path
            if resolution == "448":
                rel = posixpath.join(posixpath.dirname(rel), "downscaled", "448", posixpath.basename(rel))
            out.append(View(s.cam_id, s.stream_id, ego, posixpath.join(self.root_dir, rel)))
        return sorted(out, key=lambda v: (not v.is_ego, v.cam_id))

    @property
    def ego_view(self) -> View | None:
        return next((v for v in self.views() if v.is_ego), None)


def parse_take(entry: Any) -> Take:
    uid = _req(entry, "take_uid", str)
    name = _req(entry, "take_name", str)
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise MalformedEntry(f"take_name {name!r} contains a path separator or '..'; not followed", "unsafe_path")
    root_dir = entry.get("root_dir") or f"takes/{name}"
    if not isinstance(root_dir, str) or not safe_relative(root_dir):
        raise MalformedEntry(f"root_dir {root_dir!r} leaves the release; not followed", "unsafe_path")
    streams = []
    fav = entry.get("frame_aligned_videos") or {}
    if not isinstance(fav, dict):
        raise MalformedEntry("frame_aligned_videos should be an object")
    for cam_id, by_key in fav.items():
        if not isinstance(by_key, dict):
            raise MalformedEntry(f"frame_aligned_videos[{cam_id!r}] should be an object")
        for key, s in by_key.items():
            rel = _req(s, "relative_path", str)
            if not safe_relative(rel):
                raise MalformedEntry(f"relative_path {rel!r} of {cam_id}/{key} leaves the take; not followed",
                                     "unsafe_path")
            streams.append(Stream(cam_id, str(key), str(s.get("stream_id", key)), rel, bool(s.get("is_collage", False))))
    cameras = []
    capture = entry.get("capture") or {}
    for cam in (capture.get("cameras") or []) if isinstance(capture, dict) else []:
        if isinstance(cam, dict) and "cam_id" in cam:
            cameras.append(CaptureCamera(cam["cam_id"], bool(cam.get("is_ego")), cam.get("device_type")))

    def opt_num(key):
        v = entry.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return Take(take_uid=uid, take_name=name, root_dir=root_dir.rstrip("/"),
                parent_task_id=entry.get("parent_task_id"), parent_task_name=entry.get("parent_task_name"),
                task_id=entry.get("task_id"), task_name=entry.get("task_name"),
                duration_sec=opt_num("duration_sec"), task_start_sec=opt_num("task_start_sec"),
                task_end_sec=opt_num("task_end_sec"), best_exo=entry.get("best_exo"),
                streams=tuple(streams), cameras=tuple(cameras), raw=entry)


# ----------------------------------------------------------------------------- splits

@dataclasses.dataclass(frozen=True)
class Splits:
    split_to_take_uids: dict[str, list[str]]
    take_uid_to_split: dict[str, str]
    take_uid_to_benchmark: dict[str, list[str]]


def parse_splits(data: Any) -> Splits:
    s2t = _req(data, "split_to_take_uids", dict)
    t2s = data.get("take_uid_to_split") or {uid: split for split, uids in s2t.items() for uid in uids}
    return Splits({k: list(v) for k, v in s2t.items()}, dict(t2s), dict(data.get("take_uid_to_benchmark") or {}))


# ----------------------------------------------------------------------------- keystep

@dataclasses.dataclass(frozen=True)
class KeystepSegment:
    start_time: float
    end_time: float
    step_unique_id: int | None
    step_name: str | None
    is_essential: bool | None


@dataclasses.dataclass(frozen=True)
class KeystepTake:
    take_uid: str
    take_name: str | None
    scenario: str | None
    segments: tuple[KeystepSegment, ...]


def parse_keystep_take(entry: Any) -> KeystepTake:
    uid = _req(entry, "take_uid", str)
    segments = []
    for k, seg in enumerate(_req(entry, "segments", list)):
        try:
            start, end = _num(seg, "start_time"), _num(seg, "end_time")
        except MalformedEntry as e:
            raise MalformedEntry(f"segment {k}: {e}") from None
        if end < start:
            raise MalformedEntry(f"segment {k}: end_time {end} before start_time {start}")
        sid = seg.get("step_unique_id")
        segments.append(KeystepSegment(start, end, int(sid) if sid is not None else None, seg.get("step_name"),
                                       seg.get("is_essential")))
    return KeystepTake(uid, entry.get("take_name"), entry.get("scenario"), tuple(segments))


@dataclasses.dataclass(frozen=True)
class KeystepBenchmarkSegment:
    take_uid: str
    start_time: float
    end_time: float
    label_id: int | None        # None in test_unannotated
    step_unique_id: int | None
    ego_segment_name: str | None


def parse_keystep_benchmark_segment(entry: Any) -> KeystepBenchmarkSegment:
    start, end = _num(entry, "start_time"), _num(entry, "end_time")
    if end < start:
        raise MalformedEntry(f"end_time {end} before start_time {start}")
    label = entry.get("label_id")
    sid = entry.get("step_unique_id")
    return KeystepBenchmarkSegment(_req(entry, "take_uid", str), start, end,
                                   int(label) if label is not None else None,
                                   int(sid) if sid is not None else None, entry.get("ego_segment_name"))


@dataclasses.dataclass(frozen=True)
class LabelMapping:
    label_id: int
    step_unique_id: int
    step_name: str
    scenario_name: str


# ----------------------------------------------------------------------------- procedure understanding

@dataclasses.dataclass(frozen=True)
class ProcedureSegment:
    start_time: float
    end_time: float
    step_unique_id: int | None
    previous_keysteps: tuple[int, ...]
    is_optional: bool | None = None
    is_procedural_mistake: bool | None = None
    missing_keysteps: tuple[int, ...] | None = None
    next_keysteps: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ProcedureTake:
    take_uid: str
    scenario: str | None
    segments: tuple[ProcedureSegment, ...]


def parse_procedure_take(entry: Any) -> ProcedureTake:
    segments = []
    for seg in _req(entry, "segments", list):
        opt = {k: tuple(seg[k]) if isinstance(seg.get(k), list) else seg.get(k)
               for k in ("is_optional", "is_procedural_mistake", "missing_keysteps", "next_keysteps")}
        segments.append(ProcedureSegment(_num(seg, "start_time"), _num(seg, "end_time"), seg.get("step_unique_id"),
                                         tuple(seg.get("previous_keysteps") or ()), **opt))
    return ProcedureTake(_req(entry, "take_uid", str), entry.get("scenario"), tuple(segments))


# ----------------------------------------------------------------------------- proficiency

@dataclasses.dataclass(frozen=True)
class DemonstratorProficiency:
    take_uid: str
    scenario_name: str | None
    proficiency_score: str
    video_paths: dict


@dataclasses.dataclass(frozen=True)
class ProficiencyEvent:
    video_time: float
    comments: tuple[str, ...]
    expert_uid: str | None


@dataclasses.dataclass(frozen=True)
class DemonstrationProficiency:
    take_uid: str
    scenario_name: str | None
    proficiency_score: str | None
    good_executions: tuple[ProficiencyEvent, ...]
    tips_for_improvement: tuple[ProficiencyEvent, ...]


def parse_demonstrator(entry: Any) -> DemonstratorProficiency:
    return DemonstratorProficiency(_req(entry, "take_uid", str), entry.get("scenario_name"),
                                   _req(entry, "proficiency_score", str), dict(entry.get("video_paths") or {}))


def parse_demonstration(entry: Any) -> DemonstrationProficiency:
    def events(key):
        out = []
        for ev in entry.get(key) or []:
            comments = ev.get("list") if isinstance(ev, dict) else None
            out.append(ProficiencyEvent(_num(ev, "video_time"), tuple(comments or ()), ev.get("expert_uid")))
        return tuple(out)

    return DemonstrationProficiency(_req(entry, "take_uid", str), entry.get("scenario_name"),
                                    entry.get("proficiency_score"), events("good_executions"),
                                    events("tips_for_improvement"))


# ----------------------------------------------------------------------------- ego pose

@dataclasses.dataclass(frozen=True)
class PoseFrame:
    frame: int
    joints3d: dict[str, tuple[float, float, float]]
    joints2d: dict[str, dict[str, tuple[float, float]]]     # cam_id -> joint -> (x, y)


def parse_pose_frames(data: Any) -> dict[int, PoseFrame]:
    if not isinstance(data, dict):
        raise MalformedEntry("ego pose file should map frame numbers to annotations")
    out = {}
    for key, entries in data.items():
        try:
            frame = int(key)
        except ValueError:
            raise MalformedEntry(f"frame key {key!r} is not a number") from None
        entry = entries[0] if isinstance(entries, list) and entries else entries
        if not isinstance(entry, dict):
            raise MalformedEntry(f"frame {key}: expected an annotation object")
        j3 = {name: (_num(p, "x"), _num(p, "y"), _num(p, "z")) for name, p in (entry.get("annotation3D") or {}).items()}
        j2 = {cam: {name: (_num(p, "x"), _num(p, "y")) for name, p in joints.items()}
              for cam, joints in (entry.get("annotation2D") or {}).items()}
        out[frame] = PoseFrame(frame, j3, j2)
    return out


@dataclasses.dataclass(frozen=True)
class CameraPose:
    intrinsics: dict[str, np.ndarray]                   # cam_id -> 3x3
    extrinsics: dict[str, np.ndarray | dict[int, np.ndarray]]  # exo: 3x4; ego: frame -> 3x4

    def world_to_camera(self, cam_id: str, frame: int) -> np.ndarray:
        ext = self.extrinsics[cam_id]
        return ext[frame] if isinstance(ext, dict) else ext


def parse_camera_pose(data: Any) -> CameraPose:
    if not isinstance(data, dict):
        raise MalformedEntry("camera pose file should be an object")
    intr, extr = {}, {}
    for cam_id, entry in data.items():
        if cam_id == "metadata" or not isinstance(entry, dict) or "camera_intrinsics" not in entry:
            continue
        intr[cam_id] = np.asarray(entry["camera_intrinsics"], dtype=np.float64)
        ext = entry.get("camera_extrinsics")
        if isinstance(ext, dict):
            extr[cam_id] = {int(f): np.asarray(m, dtype=np.float64) for f, m in ext.items()}
        elif ext is not None:
            extr[cam_id] = np.asarray(ext, dtype=np.float64)
    return CameraPose(intr, extr)


# ----------------------------------------------------------------------------- relations

@dataclasses.dataclass(frozen=True)
class EncodedMask:
    width: int
    height: int
    encoded: str

    def decode(self) -> np.ndarray:
        from engine.release.masks import decode_mask
        return decode_mask(self.encoded, self.height, self.width)


@dataclasses.dataclass(frozen=True)
class RelationsTake:
    take_uid: str
    scenario: str | None
    take_name: str | None
    # object name -> view key (aria01_214-1, cam01, ...) -> frame -> mask
    object_masks: dict[str, dict[str, dict[int, EncodedMask]]]
    # object name -> view key -> frames the view was annotated at; one without a mask: object not visible
    annotated_frames: dict[str, dict[str, tuple[int, ...]]] = dataclasses.field(default_factory=dict)


def parse_relations_take(uid: str, entry: Any) -> RelationsTake:
    objects, annotated = {}, {}
    for obj, views in (_req(entry, "object_masks", dict)).items():
        objects[obj], annotated[obj] = {}, {}
        for view, track in views.items():
            frames = {}
            for f, m in (track.get("annotation") or {}).items():
                frames[int(f)] = EncodedMask(int(_num(m, "width")), int(_num(m, "height")), _req(m, "encodedMask", str))
            objects[obj][view] = frames
            annotated[obj][view] = tuple(sorted(int(f) for f in track.get("annotated_frames") or frames))
    return RelationsTake(uid, entry.get("scenario"), entry.get("take_name"), objects, annotated)


# ----------------------------------------------------------------------------- language

@dataclasses.dataclass(frozen=True)
class TimedText:
    time: float
    text: str


def parse_atomic(entry: Any) -> tuple[TimedText, ...]:
    """All non-rejected descriptions of a take, from every annotator."""
    items = entry if isinstance(entry, list) else [entry]
    out = []
    for ann in items:
        if not isinstance(ann, dict) or ann.get("rejected"):
            continue
        for d in ann.get("descriptions") or []:
            out.append(TimedText(_num(d, "timestamp"), str(_req(d, "text"))))
    return tuple(sorted(out, key=lambda x: x.time))


def parse_commentary(entry: Any) -> tuple[TimedText, ...]:
    items = entry if isinstance(entry, list) else [entry]
    out = []
    for ann in items:
        if not isinstance(ann, dict):
            raise MalformedEntry("commentary should be an object")
        for c in ann.get("commentary_data") or []:
            out.append(TimedText(_num(c, "video_time"), str(c.get("text", ""))))
    return tuple(sorted(out, key=lambda x: x.time))
