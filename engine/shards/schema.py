"""The shard sample layout, version 2: what one sample's JSON holds and how its members are named.

One sample is one time window of one take with every selected view. Its tar members, named
``<key>.<member>``:
  json                  the sample's meta (``SampleMeta``), with its layout ``version``
  <view>.mp4            remux and transcode modes: the view's clip; any FFmpeg-based reader
                        decodes exactly the window's frames (remux: an edit list skips the
                        pre-roll from the keyframe before the window and the reference frames
                        after it)
  <view>.NNNN.jpg       frames mode: one JPEG per kept frame, NNNN counting from 0000
  trajectory.npz        sensor slices: one array per numeric column of the release's CSV
  gaze.npz              (integer timestamps int64, the rest float32), plus take_time_s (float64):
                        each row's device timestamp on the take's clock, through timesync.csv
  audio.m4a             the ego audio: its AAC packets copied, an edit list trimming them to the window
  <family>.npz          dense annotations (``engine.shards.dense``): keypoints, camera poses,
                        object masks as numeric arrays, NaN where missing; ``arrays`` in the
                        meta says what each array's axes are

Every member reads with numpy (``allow_pickle=False``), json or an FFmpeg-based reader alone.
The shard writer builds a ``SampleMeta`` and stores ``encode()``; every reader goes through
``SampleMeta.from_json`` (or ``read_meta``), which refuses, naming the sample, a version it
does not know or a field missing. A change to the layout is a new ``VERSION``. Version 1 (clips
with pre-roll, annotations as JSON text, PCM audio) is refused with the fix: shard again.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from engine.errors import ContentError

VERSION = 2
READABLE_VERSIONS = (2,)
JSON_MEMBER = "json"


class SchemaError(ContentError, ValueError):
    """A sample's meta is not a layout this code reads; the message names the sample and why."""


# ----------------------------------------------------------------------------- names

def sample_key(take_uid: str, start_frame: int) -> str:
    """Deterministic, dot-free key of a window: webdataset splits names at the first dot."""
    return f"{take_uid}_{start_frame:08d}"


def video_member(view: str) -> str:
    """The member holding a view's clip (remux and transcode modes): ``ego.mp4``."""
    return f"{view}.mp4"


def frame_member(view: str, index: int) -> str:
    """The member holding a view's ``index``-th kept frame (frames mode): ``ego.0007.jpg``."""
    return f"{view}.{index:04d}.jpg"


def sensor_member(sensor: str) -> str:
    """The member holding a sensor slice: ``trajectory.npz``, ``gaze.npz``."""
    return f"{sensor}.npz"


AUDIO_MEMBER = "audio.m4a"


# ----------------------------------------------------------------------------- records

def _fields(cls, data: Any, where: str, key: str) -> dict:
    """``data``'s entries for the fields of ``cls``; a clear SchemaError when it is not an object,
    lacks a field without a default, or holds a field ``cls`` does not have."""
    if not isinstance(data, dict):
        raise SchemaError(f"sample {key}: {where} is {type(data).__name__}, expected an object")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SchemaError(f"sample {key}: {where} lacks field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise SchemaError(f"sample {key}: {where} holds unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}")
    return {name: data[name] for name in names if name in data}


class _Part:
    """A part of the meta: its JSON is its fields; read back with every field checked."""
    where = ""                     # its place in the meta, for error messages

    def to_json(self) -> dict:
        # Shallow: the fields are plain values and lists or dicts of them. dataclasses.asdict
        # copies every list item (a view's source_frames), about 8% of a shard job's time.
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Any, key: str = "?", where: str = ""):
        return cls(**_fields(cls, data, where or cls.where, key))


@dataclasses.dataclass(frozen=True)
class TakeInfo(_Part):
    """The take a sample comes from, as takes.json and the splits describe it."""
    where = "take"
    take_uid: str
    take_name: str
    scenario: str | None
    task_name: str | None
    parent_task_id: int | None
    split: str
    best_exo: str | None
    num_frames: int              # of the whole take, every view
    fps: float                   # of the take's timeline (source frame i covers [i/fps, (i+1)/fps))
    drift_frames: dict[str, int] = dataclasses.field(default_factory=dict)
    # ^ views whose source has more frames than the take (``drift: trim``): frames left out at its end


@dataclasses.dataclass(frozen=True)
class Window(_Part):
    """The sample's time window on the take's timeline: [t0, t1) s, source frames [start_frame, end_frame)."""
    where = "window"
    t0: float
    t1: float
    start_frame: int
    end_frame: int


@dataclasses.dataclass(frozen=True)
class ViewMeta(_Part):
    """One view's media in a sample: a clip (``member``) or one JPEG per kept frame (``members``)."""
    cam_id: str
    stream_id: str
    is_ego: bool
    key: str                       # the release's view key
    source: str                    # the source file, relative to the release
    width: int
    height: int
    source_frames: list[int]       # entry k: the source frame the view's frame k shows
    media_start: float             # seconds on the take's timeline the media covers
    media_end: float
    member: str | None = None      # remux, transcode: ``<view>.mp4``
    members: list[str] | None = None   # frames: ``<view>.NNNN.jpg``, one per entry of source_frames

    def to_json(self) -> dict:
        out = super().to_json()
        for name in ("member", "members"):
            if out[name] is None:
                del out[name]
        return out

    @classmethod
    def from_json(cls, data: Any, key: str = "?", where: str = "views") -> ViewMeta:
        view = super().from_json(data, key, where)
        if (view.member is None) == (view.members is None):
            raise SchemaError(f"sample {key}: {where} needs exactly one of member (a clip) "
                              f"and members (frames)")
        return view


@dataclasses.dataclass(frozen=True)
class ArraySensor(_Part):
    """A sensor table's slice (trajectory, gaze): ``member`` holds one array [rows] per numeric
    column of the release's CSV, named as there: integer columns (timestamps; the first is the
    device's, in microseconds) int64, the others float32; and ``take_time_s`` (float64), the
    device time on the take's clock (the window holds the rows with t0 <= take_time_s < t1)."""
    member: str
    columns: list[str]
    rows: int


@dataclasses.dataclass(frozen=True)
class AudioSensor(_Part):
    """The ego audio's slice: ``member`` is an audio-only mp4 of the source's packets (``codec``)
    that decodes to ``samples`` samples per channel from the window's start (``start`` s)."""
    member: str
    codec: str
    rate: int
    channels: int
    start: float
    samples: int


Sensor = ArraySensor | AudioSensor
SENSORS: dict[str, type] = {"trajectory": ArraySensor, "gaze": ArraySensor, "audio": AudioSensor}


@dataclasses.dataclass(frozen=True)
class SampleMeta:
    """The JSON of one sample. ``annotations`` holds the sparse annotations in the release's own
    terms (benchmark name -> what of it falls in the window); the dense ones are in ``arrays``."""
    key: str
    take: TakeInfo
    window: Window
    mode: str                      # remux, transcode or frames
    views: dict[str, ViewMeta]     # by member name: ``ego``, exo views by cam_id
    sensors: dict[str, Sensor]     # by name: trajectory, gaze, audio (those present)
    annotations: dict[str, Any]
    arrays: dict[str, Any]         # dense annotation family -> its member and arrays (engine.shards.dense)
    version: int = VERSION

    def to_json(self) -> dict:
        return {"version": self.version, "key": self.key, "take": self.take.to_json(),
                "window": self.window.to_json(), "mode": self.mode,
                "views": {name: view.to_json() for name, view in self.views.items()},
                "sensors": {name: sensor.to_json() for name, sensor in self.sensors.items()},
                "annotations": self.annotations, "arrays": self.arrays}

    def encode(self) -> bytes:
        """The ``json`` member's bytes."""
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Any) -> SampleMeta:
        """A sample's meta from its parsed JSON; SchemaError, naming the sample, when its version
        is unknown or a field is missing."""
        key = data.get("key", "?") if isinstance(data, dict) else "?"
        if not isinstance(data, dict):
            raise SchemaError(f"sample {key}: meta is {type(data).__name__}, expected an object")
        version = data.get("version", 1)   # written before the field existed: the version 1 layout
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise SchemaError(f"sample {key}: layout version {version!r} is not one this reader knows "
                              f"({', '.join(map(str, READABLE_VERSIONS))}); write the shards again with this "
                              f"engine (ee4d shard, or rerun the graph: the shard stage's version changed)")
        fields = _fields(cls, {"version": version, **data}, "meta", key)
        views, sensors = fields["views"], fields["sensors"]
        if not isinstance(views, dict) or not isinstance(sensors, dict):
            raise SchemaError(f"sample {key}: views and sensors must be objects")
        unknown = sorted(set(sensors) - set(SENSORS))
        if unknown:
            raise SchemaError(f"sample {key}: unknown sensor{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        if not isinstance(fields["annotations"], dict) or not isinstance(fields["arrays"], dict):
            raise SchemaError(f"sample {key}: annotations and arrays must be objects")
        return cls(
            key=fields["key"], take=TakeInfo.from_json(fields["take"], key),
            window=Window.from_json(fields["window"], key), mode=fields["mode"],
            views={name: ViewMeta.from_json(v, key, f"views.{name}") for name, v in views.items()},
            sensors={name: SENSORS[name].from_json(s, key, f"sensors.{name}") for name, s in sensors.items()},
            annotations=fields["annotations"], arrays=fields["arrays"], version=version)


def read_meta(value: Any) -> SampleMeta:
    """The typed meta of a sample from its ``json`` member however a reader holds it: bytes or
    text (webdataset, wids, Ray Data), the parsed object, or already a ``SampleMeta``."""
    if isinstance(value, SampleMeta):
        return value
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise SchemaError(f"sample ?: json member does not parse: {e}") from None
    return SampleMeta.from_json(value)
