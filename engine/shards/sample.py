"""One take cut into samples: media per view, sensor arrays, and every annotation in the window.

Plain Python, no Ray: ``TakeSource`` gathers what the release says about one take (once),
``build_samples`` yields the members of each window's sample.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from engine import storage, video
from engine.errors import ContentError
from engine.release import Release, ReleaseError
from engine.release import records as rec
from engine.shards import dense, schema
from engine.shards.plan import ShardConfig, select_views, window_frames

FPS = 30.0


class BadTake(ContentError):
    """This take cannot be sharded; the message says why."""


def _asdict(record) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(record), default=_jsonable))


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _overlap(items, t0: float, t1: float):
    return [x for x in items if x.start_time < t1 and x.end_time > t0]


@dataclasses.dataclass
class TakeSource:
    """Everything the release says about one take, gathered once per take."""
    take: rec.Take
    split: str
    views: list[tuple[str, rec.View]]
    num_frames: int
    annotations: dict                 # benchmark -> take-level data, sliced per window later
    dense: dense.TakeDense            # poses, camera poses and masks as arrays, cut per window later
    trajectory: dict[str, np.ndarray] | None
    gaze: dict[str, np.ndarray] | None
    problems: list[dict]              # annotation files that could not be read, views trimmed: {file, reason}
    drift: dict[str, int]             # view -> frames past num_frames left out (drift: trim)

    @classmethod
    def load(cls, release: Release, take: rec.Take, split: str, config: ShardConfig) -> TakeSource:
        views = select_views(take, config.views, config.resolution)
        if not views:
            raise BadTake("no ego or exo view in takes.json")
        counts = {}
        for name, view in views:
            if not release.exists(view.path):
                raise BadTake(f"{view.key}: file not found ({view.path})")
            try:
                with release.open_file(view.path) as f:
                    counts[name] = video.probe(f).frames
            except video.VideoError as e:
                raise BadTake(f"{view.key}: {e}") from None
        problems = []
        num_frames = min(counts.values())
        drift = {name: c - num_frames for name, c in counts.items() if c > num_frames}
        if drift and config.drift == "reject":
            raise BadTake(f"views disagree on frame count: {counts}")
        if drift:
            # Frame-aligned videos start at the take's first frame, so the views agree up to the
            # shortest one's end: keep those frames, say what was cut.
            shortest = next(view for name, view in views if counts[name] == num_frames)
            problems.append({"file": shortest.path, "reason": f"take {take.take_name}: views disagree on frame count "
                             f"({counts}); every view trimmed to {num_frames} frames"})
        annotations = _take_annotations(release, take, split, problems)
        trajectory, gaze = _sensors(release, take, problems)
        return cls(take, split, views, num_frames, annotations, dense.TakeDense.from_annotations(annotations),
                   trajectory, gaze, problems, drift)


def _sensors(release: Release, take: rec.Take, problems: list[dict]):
    """The take's trajectory and eye gaze, each with ``take_time_s``: its device timestamps
    (``tracking_timestamp_us``) put on the take's clock through timesync.csv. Without a usable
    timesync the sensors are left out and the reason goes to ``problems``: sliced on the wrong
    clock they would be wrong."""
    def problem(file: str, reason: str) -> None:
        if {"file": file, "reason": reason} not in problems:
            problems.append({"file": file, "reason": reason})

    sensors = []
    for relative in (f"{take.root_dir}/trajectory/closed_loop_trajectory.csv",
                     f"{take.root_dir}/eye_gaze/general_eye_gaze.csv"):
        sensor = _csv(release, relative)
        if sensor is not None and "tracking_timestamp_us" not in sensor:
            problem(relative, f"{relative}: no tracking_timestamp_us column; left out")
            sensor = None
        sensors.append(sensor)
    if not any(sensors):
        return sensors
    try:
        clock = np.asarray(release.frame_clock(take), np.float64)
    except ReleaseError as e:
        problem(e.file, f"{e}; trajectory and eye gaze left out")
        return None, None
    for sensor in sensors:
        if sensor is not None:
            sensor["take_time_s"] = on_take_clock(sensor["tracking_timestamp_us"] * 1e3, clock)
    return sensors


def on_take_clock(device_ns: np.ndarray, clock: np.ndarray) -> np.ndarray:
    """Seconds on the take's clock of device times, given the device time of each take frame:
    linear between frames, and beyond the first and last frame along the end intervals."""
    frames = np.arange(len(clock)) / FPS
    seconds = np.interp(device_ns, clock, frames)
    before, after = device_ns < clock[0], device_ns > clock[-1]
    seconds[before] = (device_ns[before] - clock[0]) * (frames[1] - frames[0]) / (clock[1] - clock[0])
    seconds[after] = frames[-1] + (device_ns[after] - clock[-1]) * (frames[-1] - frames[-2]) / (clock[-1] - clock[-2])
    return seconds


def _csv(release: Release, relative: str) -> dict[str, np.ndarray] | None:
    """The numeric columns of a sensor CSV by name, in file order (the device timestamp
    ``tracking_timestamp_us`` first), or None if absent. Integer columns (timestamps) stay int64; float
    columns become float32, which keeps positions in metres to micrometres."""
    if not release.exists(relative):
        return None
    with storage.faults_named(storage.join(release.url, relative)), release.open_file(relative) as f:
        table = pacsv.read_csv(f)
    columns = {}
    for name, kind in zip(table.column_names, table.schema.types):
        if pa.types.is_integer(kind):
            columns[name] = table.column(name).to_numpy().astype(np.int64)
        elif pa.types.is_floating(kind):
            columns[name] = table.column(name).to_numpy().astype(np.float32)
    return columns


def _take_annotations(release: Release, take: rec.Take, split: str, problems: list[dict]) -> dict:
    """The take's annotations, benchmark by benchmark. A file that is absent or cannot be read
    (malformed, truncated) costs only what it holds: the take keeps its video and every other
    annotation, and the unreadable file goes to ``problems``."""
    def _optional(load):
        try:
            return load()
        except FileNotFoundError:
            return None
        except ReleaseError as e:
            problems.append({"file": e.file, "reason": str(e)})
            return None

    uid = take.take_uid
    out = {}
    keystep = _optional(lambda: release.keystep(split))
    if keystep and uid in keystep:
        out["keystep"] = keystep[uid]
    segments = _optional(lambda: release.keystep_segments(split)) or []
    out["keystep_segments"] = [s for s in segments if s.take_uid == uid]
    procedure = _optional(lambda: release.procedure_understanding(split))
    if procedure and uid in procedure:
        out["procedure_understanding"] = procedure[uid]
    for name, load in (("proficiency_demonstrator", release.demonstrator_proficiency),
                       ("proficiency_demonstration", release.demonstration_proficiency)):
        entries = _optional(lambda: load(split)) or []
        match = [e for e in entries if e.take_uid == uid]
        if match:
            out[name] = match[0]
    for name, load in (("atomic_descriptions", release.atomic_descriptions),
                       ("expert_commentary", release.expert_commentary)):
        entries = _optional(lambda: load(split))
        if entries and uid in entries:
            out[name] = entries[uid]
    relations = _optional(lambda: release.relations(split))
    if relations and uid in relations:
        out["relations"] = relations[uid]
    for part in ("body", "hand"):
        for kind in ("annotation", "automatic"):
            raw = _optional(lambda: release.read_json(f"annotations/ego_pose/{split}/{part}/{kind}/{uid}.json"))
            if raw is not None:
                out[f"ego_pose_{part}_{kind}"] = raw
    raw = _optional(lambda: release.read_json(f"annotations/ego_pose/{split}/camera_pose/{uid}.json"))
    if raw is not None:
        out["camera_pose"] = raw
    return out


def slice_annotations(ann: dict, t0: float, t1: float) -> dict:
    """The take's sparse annotations (segments, labels, descriptions) that fall in [t0, t1), in the
    release's terms; the dense ones (poses, masks) go to arrays (``engine.shards.dense``)."""
    out = {}
    if "keystep" in ann:
        k = ann["keystep"]
        out["keystep"] = {"scenario": k.scenario, "segments": [_asdict(s) for s in _overlap(k.segments, t0, t1)]}
    out["keystep_segments"] = [_asdict(s) for s in _overlap(ann["keystep_segments"], t0, t1)]
    if "procedure_understanding" in ann:
        out["procedure_understanding"] = [_asdict(s) for s in _overlap(ann["procedure_understanding"].segments, t0, t1)]
    if "proficiency_demonstrator" in ann:
        d = ann["proficiency_demonstrator"]
        out["proficiency_demonstrator"] = {"proficiency_score": d.proficiency_score, "scenario_name": d.scenario_name}
    if "proficiency_demonstration" in ann:
        d = ann["proficiency_demonstration"]
        out["proficiency_demonstration"] = {
            "proficiency_score": d.proficiency_score,
            "good_executions": [_asdict(e) for e in d.good_executions if t0 <= e.video_time < t1],
            "tips_for_improvement": [_asdict(e) for e in d.tips_for_improvement if t0 <= e.video_time < t1]}
    for name in ("atomic_descriptions", "expert_commentary"):
        if name in ann:
            out[name] = [_asdict(x) for x in ann[name] if t0 <= x.time < t1]
    return out


def _sensor_slice(sensor: dict[str, np.ndarray] | None, t0: float, t1: float) -> dict[str, np.ndarray] | None:
    if sensor is None:
        return None
    seconds = sensor["take_time_s"]
    rows = (seconds >= t0) & (seconds < t1)
    return {name: column[rows] for name, column in sensor.items()}


def _view_clips(release: Release, view: rec.View, windows: list[tuple[int, int]], config: ShardConfig, audio: bool):
    """(clip, audio clip or None) of a view for each window, in order. Remux cuts them all in one
    forward pass; transcode and frames decode each window (their audio is still remuxed, read
    through a second handle so the two readers never move each other's position)."""
    with release.open_file(view.path) as source:
        if config.mode == "remux":
            yield from video.cut_windows(source, windows, audio=audio)
            return
        with contextlib.ExitStack() as sound_file:
            sounds = video.cut_windows(sound_file.enter_context(release.open_file(view.path)), windows,
                                       audio=True) if audio else None
            for f0, f1 in windows:
                source.seek(0)    # each window opens the file anew
                if config.mode == "transcode":
                    clip = video.transcode(source, f0, f1, config.short_side, config.fps, config.gop)
                else:
                    clip = video.jpeg_frames(source, f0, f1, config.short_side, config.fps)
                yield clip, next(sounds)[1] if sounds else None


def build_samples(release: Release, src: TakeSource, config: ShardConfig) -> Iterator[tuple[str, list[tuple[str, bytes]], dict]]:
    """Yield (key, members, row) per window; members are (extension, bytes) in a fixed order.

    Each view is opened once for the whole take and read forward through its windows."""
    take = src.take
    windows = window_frames(src.num_frames, config.window, config.stride, FPS)
    ego = next((name for name, view in src.views if view.is_ego), None)
    with contextlib.ExitStack() as readers:    # closes every view's file when the take ends or fails
        clips = {name: readers.enter_context(contextlib.closing(_view_clips(release, view, windows, config, name == ego)))
                 for name, view in src.views}
        for f0, f1 in windows:
            t0, t1 = f0 / FPS, f1 / FPS
            key = schema.sample_key(take.take_uid, f0)
            members, views, sensors = [], {}, {}
            for name, view in src.views:
                try:
                    clip, sound = next(clips[name])
                except video.VideoError as e:
                    raise BadTake(f"{view.key} window [{t0:.3f}, {t1:.3f}): {e}") from None
                if config.mode == "frames":
                    media = {"members": [schema.frame_member(name, k) for k in range(len(clip.data))]}
                    members += list(zip(media["members"], clip.data))
                else:
                    media = {"member": schema.video_member(name)}
                    members.append((media["member"], clip.data))
                views[name] = schema.ViewMeta(
                    cam_id=view.cam_id, stream_id=view.stream_id, is_ego=view.is_ego, key=view.key, source=view.path,
                    width=clip.width, height=clip.height, source_frames=clip.source_frames,
                    media_start=clip.source_frames[0] / FPS, media_end=(clip.source_frames[-1] + 1) / FPS, **media)
                if sound is not None:
                    sensors["audio"] = schema.AudioSensor(
                        schema.AUDIO_MEMBER, codec=sound.codec, rate=sound.rate, channels=sound.channels, start=t0,
                        samples=round((t1 - t0) * sound.rate))
                    members.append((schema.AUDIO_MEMBER, sound.data))
            for sensor_name, sensor in (("trajectory", src.trajectory), ("gaze", src.gaze)):
                part = _sensor_slice(sensor, t0, t1)
                if part is not None:
                    sensors[sensor_name] = schema.ArraySensor(schema.sensor_member(sensor_name), list(part),
                                                              len(next(iter(part.values()))))
                    members.append((sensors[sensor_name].member, dense.npz_bytes(part)))
            arrays = {}
            for member, data, description in src.dense.window(f0, f1):
                arrays[member.removesuffix(".npz")] = description
                members.append((member, data))
            meta = schema.SampleMeta(
                key=key,
                take=schema.TakeInfo(take_uid=take.take_uid, take_name=take.take_name, scenario=take.scenario,
                                     task_name=take.task_name, parent_task_id=take.parent_task_id, split=src.split,
                                     best_exo=take.best_exo, num_frames=src.num_frames, fps=FPS,
                                     drift_frames=src.drift),
                window=schema.Window(t0=t0, t1=t1, start_frame=f0, end_frame=f1),
                mode=config.mode, views=views, sensors=sensors,
                annotations=slice_annotations(src.annotations, t0, t1), arrays=arrays)
            members.insert(0, (schema.JSON_MEMBER, meta.encode()))
            row = {"key": key, "take_uid": take.take_uid, "split": src.split, "t0": t0, "t1": t1,
                   "views": sorted(views)}
            yield key, members, row
