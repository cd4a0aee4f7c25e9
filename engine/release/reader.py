"""Reading an Ego-Exo4D release, local or on S3, lazily.

``Release.open(url)`` reads nothing but a listing check; ``takes()`` parses takes.json once;
every annotation file is read the first time it is asked for and cached. A 5,000-take
release opens and lists without touching any annotation.

Malformed entries never abort a load: each loader returns the good records and keeps the
bad ones as ``Problem`` s (file, entry, reason) in ``release.problems``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import posixpath
from collections.abc import Callable
from typing import Any

import orjson

from engine import storage
from engine.errors import ContentError, StorageFault
from engine.release import records as rec

SPLITS = ("train", "val", "test")
# Digits kept, everything else a space: 19 digits in a row may be an integer past 64 bits, which
# orjson turns into a float where json keeps it exact.
_DIGITS = bytes(c if 48 <= c <= 57 else 32 for c in range(256))


def loads(raw: bytes | str) -> Any:
    """``json.loads``, the same values, about twice as fast on the pose files (most of what a
    shard job parses). orjson where it gives exactly json's result; json for anything it
    rejects (NaN, 1e400, lone surrogates, a BOM, other encodings, deep nesting, malformed files:
    json's error names the line and column) and for 19-digit runs (a check of 1 ms per MB)."""
    if isinstance(raw, bytes) and b"0" * 19 not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


# What a malformed entry can raise while being parsed.
_ENTRY_ERRORS = (rec.MalformedEntry, KeyError, TypeError, ValueError, AttributeError)


class ReleaseError(ContentError):
    """The release, or one of its files, cannot be read at all; ``file`` names the file."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


@dataclasses.dataclass(frozen=True)
class Problem:
    code: str                   # short machine code, e.g. "malformed_entry"
    reason: str                 # what a person needs to know
    file: str | None = None     # relative to the release root
    entry: str | None = None    # which entry of the file (take_uid, index, ...)
    take_uid: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Release:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = storage.filesystem(url, storage_options)
        self.problems: list[Problem] = []
        self._cache: dict[Any, Any] = {}

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> Release:
        release = cls(url, storage_options)
        try:
            found = release.fs.exists(release.path("takes.json"))
        except Exception as e:   # unreachable endpoint, bad credentials, ...
            raise ReleaseError(f"{url}: cannot reach the release: {e}") from e
        if not found:
            raise ReleaseError(f"{url}: no takes.json; not an Ego-Exo4D release root")
        return release

    # ------------------------------------------------------------------ files

    def path(self, relative: str) -> str:
        return storage.join(self.root, relative)

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def open_file(self, relative: str, mode: str = "rb"):
        return self.fs.open(self.path(relative), mode)

    def read_json(self, relative: str) -> Any:
        """Parse one JSON file; a syntax error names the file, line and column."""
        try:
            with storage.faults_named(storage.join(self.url, relative)), self.open_file(relative) as f:
                raw = f.read()
        except (FileNotFoundError, StorageFault):
            raise
        except Exception as e:
            raise ReleaseError(f"{relative}: cannot read: {e}", relative) from e
        try:
            return loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ReleaseError(f"{relative}: malformed JSON at {where}", relative) from e

    def _cached(self, key, load: Callable[[], Any]):
        if key not in self._cache:
            try:
                self._cache[key] = load()
            except ReleaseError as e:     # a malformed file stays malformed: parse it once
                self._cache[key] = e
        if isinstance(self._cache[key], ReleaseError):
            raise self._cache[key]
        return self._cache[key]

    def _entries(self, relative: str, items, parse) -> list:
        """Parse ``(label, raw)`` entries, keeping the bad ones as problems instead of failing the file."""
        out = []
        for label, raw in items:
            try:
                out.append(parse(raw))
            except _ENTRY_ERRORS as e:
                uid = raw.get("take_uid") if isinstance(raw, dict) else None
                self.problems.append(Problem(getattr(e, "code", "malformed_entry"), str(e), relative, str(label), uid))
        return out

    # ------------------------------------------------------------------ takes and splits

    def takes(self) -> list[rec.Take]:
        """Every well-formed take of takes.json (a list, or a dict keyed by take_uid)."""
        def load():
            data = self.read_json("takes.json")
            if isinstance(data, dict):
                items = list(data.items())
            elif isinstance(data, list):
                items = [(raw.get("take_uid", i) if isinstance(raw, dict) else i, raw) for i, raw in enumerate(data)]
            else:
                raise ReleaseError("takes.json: expected a list or an object of takes")
            return self._entries("takes.json", items, rec.parse_take)
        return self._cached("takes", load)

    def take(self, take_uid: str) -> rec.Take:
        index = self._cached("take_index", lambda: {t.take_uid: t for t in self.takes()})
        return index[take_uid]

    def take_uids(self) -> set[str]:
        return {t.take_uid for t in self.takes()}

    def splits(self) -> rec.Splits:
        return self._cached("splits", lambda: rec.parse_splits(self.read_json("annotations/splits.json")))

    # ------------------------------------------------------------------ annotations

    def _by_take(self, relative: str, parse) -> dict:
        """Files shaped {"annotations": {take_uid: entry}} (or a bare dict of take_uid -> entry)."""
        def load():
            data = self.read_json(relative)
            ann = data.get("annotations", data) if isinstance(data, dict) else None
            if not isinstance(ann, dict):
                raise ReleaseError(f"{relative}: expected an object of annotations keyed by take_uid", relative)
            good = {}
            for uid, raw in ann.items():
                try:
                    good[uid] = parse(uid, raw)
                except _ENTRY_ERRORS as e:
                    self.problems.append(Problem(getattr(e, "code", "malformed_entry"), str(e), relative, uid, uid))
            return good
        return self._cached(relative, load)

    def _listed(self, relative: str, parse, key: str = "annotations") -> list:
        """Files shaped {key: [entry, ...]} or a bare list."""
        def load():
            data = self.read_json(relative)
            items = data.get(key) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ReleaseError(f"{relative}: expected a list of entries under {key!r}", relative)
            return self._entries(relative, enumerate(items), parse)
        return self._cached(relative, load)

    def keystep(self, split: str) -> dict[str, rec.KeystepTake]:
        return self._by_take(f"annotations/keystep_{split}.json", lambda uid, raw: rec.parse_keystep_take(
            dict(raw, take_uid=raw.get("take_uid", uid)) if isinstance(raw, dict) else raw))

    def keystep_taxonomy(self, split: str = "train") -> dict:
        data = self._cached(("raw", split), lambda: self.read_json(f"annotations/keystep_{split}.json"))
        return data.get("taxonomy", {}) if isinstance(data, dict) else {}

    def keystep_segments(self, split: str) -> list[rec.KeystepBenchmarkSegment]:
        name = "test_unannotated" if split == "test" else split
        return self._listed(f"annotations/keystep_benchmark/keystep_segment_{name}.json",
                            rec.parse_keystep_benchmark_segment, key="segments")

    def label_mapping(self) -> list[rec.LabelMapping]:
        def load():
            relative = "annotations/keystep_benchmark/label_mapping.csv"
            with self.open_file(relative) as f:
                rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
            return self._entries(relative, enumerate(rows), lambda r: rec.LabelMapping(
                int(r["label_id"]), int(r["step_unique_id"]), r["step_name"], r["scenario_name"]))
        return self._cached("label_mapping", load)

    def procedure_understanding(self, split: str) -> dict[str, rec.ProcedureTake]:
        name = "test_unannotated" if split == "test" else split
        return self._by_take(f"annotations/procedure_understanding_{name}.json", lambda uid, raw: rec.parse_procedure_take(
            dict(raw, take_uid=raw.get("take_uid", uid)) if isinstance(raw, dict) else raw))

    def demonstrator_proficiency(self, split: str) -> list[rec.DemonstratorProficiency]:
        return self._listed(f"annotations/proficiency_demonstrator_{split}.json", rec.parse_demonstrator)

    def demonstration_proficiency(self, split: str) -> list[rec.DemonstrationProficiency]:
        return self._listed(f"annotations/proficiency_demonstration_{split}.json", rec.parse_demonstration)

    def relations(self, split: str) -> dict[str, rec.RelationsTake]:
        return self._by_take(f"annotations/relations_{split}.json", rec.parse_relations_take)

    def atomic_descriptions(self, split: str) -> dict[str, tuple[rec.TimedText, ...]]:
        return self._by_take(f"annotations/atomic_descriptions_{split}.json", lambda uid, raw: rec.parse_atomic(raw))

    def expert_commentary(self, split: str) -> dict[str, tuple[rec.TimedText, ...]]:
        return self._by_take(f"annotations/expert_commentary_{split}.json", lambda uid, raw: rec.parse_commentary(raw))

    def ego_pose_takes(self, split: str, part: str, kind: str = "annotation") -> list[str]:
        """take_uids with an ego pose file; ``part`` is body, hand or camera_pose."""
        folder = f"annotations/ego_pose/{split}/{part}" + ("" if part == "camera_pose" else f"/{kind}")
        try:
            names = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(n)[:-5] for n in names if n.endswith(".json"))

    def ego_pose(self, split: str, part: str, take_uid: str, kind: str = "annotation") -> dict[int, rec.PoseFrame]:
        """Body or hand keypoints of one take; ``kind`` is annotation (manual) or automatic."""
        return rec.parse_pose_frames(self.read_json(f"annotations/ego_pose/{split}/{part}/{kind}/{take_uid}.json"))

    def camera_pose(self, split: str, take_uid: str) -> rec.CameraPose:
        return rec.parse_camera_pose(self.read_json(f"annotations/ego_pose/{split}/camera_pose/{take_uid}.json"))

    # ------------------------------------------------------------------ clocks

    def frame_clock(self, take: rec.Take) -> list[int]:
        """The Aria device time (ns) of each of the take's frames, the clock its trajectory and
        eye gaze are stamped with: column ``<ego cam>_<stream>_capture_timestamp_ns`` of its
        capture's timesync.csv, rows timesync_start_idx + 1 .. timesync_end_idx - 1. Anything
        missing or unusable raises ReleaseError naming the file."""
        capture = take.raw.get("capture") if isinstance(take.raw.get("capture"), dict) else {}
        relative = f"captures/{capture.get('capture_name')}/timesync.csv"
        ego, start, end = take.ego_view, take.raw.get("timesync_start_idx"), take.raw.get("timesync_end_idx")
        if ego is None or not isinstance(start, int) or not isinstance(end, int) or not capture.get("capture_name"):
            raise ReleaseError(f"take {take.take_name}: no ego view, capture_name or timesync_start_idx/end_idx "
                               "to find its frames in timesync.csv", "takes.json")
        column = f"{ego.cam_id}_{ego.stream_id}_capture_timestamp_ns"

        def device_ns(value: str | None) -> int | None:
            try:
                number = float(value)
            except (TypeError, ValueError):
                return None
            return int(number) if math.isfinite(number) else None

        def load():
            try:
                with storage.faults_named(storage.join(self.url, relative)), self.open_file(relative) as f:
                    rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
            except FileNotFoundError:
                raise ReleaseError(f"{relative}: not found", relative) from None
            if rows and column not in rows[0]:
                raise ReleaseError(f"{relative}: no column {column}", relative)
            return [device_ns(r[column]) for r in rows]

        times = self._cached(("timesync", relative, column), load)[start + 1:end]
        if len(times) < 2 or None in times or any(b <= a for a, b in zip(times, times[1:])):
            raise ReleaseError(f"{relative}: rows {start + 1}..{end - 1} of {column} are not increasing device "
                               f"times for take {take.take_name}", relative)
        return times
