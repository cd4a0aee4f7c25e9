"""``ee4d validate``: check a release before spending cluster hours on it.

Every problem carries a short machine code and a human reason, and names its take and
file. Nothing here raises on bad content: only a release whose takes.json cannot be read at
all is unusable (``ReleaseError``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
from collections.abc import Callable

from engine import params as P
from engine import stage as stages
from engine import storage
from engine.release import records as rec
from engine.release.reader import Problem, Release, ReleaseError
from engine.video import VideoError, probe

METADATA_FILES = ("captures.json", "participants.json", "physical_setting.json", "visual_objects.json",
                  "metadata.json")


def _uids(items) -> list[str]:
    return list(items.keys()) if isinstance(items, dict) else [x.take_uid for x in items]


# (file under annotations/, the split it belongs to, how to load it)
def _annotation_files() -> list[tuple[str, str, Callable[[Release], object]]]:
    out = []
    for split in ("train", "val"):
        out += [
            (f"keystep_{split}.json", split, lambda r, s=split: r.keystep(s)),
            (f"proficiency_demonstrator_{split}.json", split, lambda r, s=split: r.demonstrator_proficiency(s)),
            (f"proficiency_demonstration_{split}.json", split, lambda r, s=split: r.demonstration_proficiency(s)),
            (f"atomic_descriptions_{split}.json", split, lambda r, s=split: r.atomic_descriptions(s)),
            (f"expert_commentary_{split}.json", split, lambda r, s=split: r.expert_commentary(s)),
        ]
    for split in ("train", "val", "test"):
        name = "test_unannotated" if split == "test" else split
        out += [
            (f"keystep_benchmark/keystep_segment_{name}.json", split, lambda r, s=split: r.keystep_segments(s)),
            (f"procedure_understanding_{name}.json", split, lambda r, s=split: r.procedure_understanding(s)),
            (f"relations_{split}.json", split, lambda r, s=split: r.relations(s)),
        ]
    return out


@dataclasses.dataclass
class Report:
    release: str
    resolution: str
    takes: dict[str, dict]              # take_uid -> {take_name, scenario, views, problems}
    problems: list[Problem]             # not tied to a known take
    files: dict[str, str]               # annotation file -> "ok" | "absent" | "malformed"

    def take_problems(self) -> list[Problem]:
        return [p for t in self.takes.values() for p in t["problems"]]

    def all_problems(self) -> list[Problem]:
        return self.problems + self.take_problems()

    def to_json(self) -> dict:
        return {
            # An unusable release raises ReleaseError before a Report exists.
            "release": self.release, "resolution": self.resolution, "usable": True,
            "summary": {"takes": len(self.takes), "takes_ok": sum(not t["problems"] for t in self.takes.values()),
                        "problems": len(self.all_problems())},
            "files": self.files,
            "problems": [p.to_json() for p in self.problems],
            "takes": {uid: {"take_name": t["take_name"], "scenario": t["scenario"],
                            "status": "ok" if not t["problems"] else "problems",
                            "views": t["views"], "problems": [p.to_json() for p in t["problems"]]}
                      for uid, t in self.takes.items()},
        }

    def table(self) -> str:
        rows = [("take", "scenario", "views", "frames", "status")]
        for t in sorted(self.takes.values(), key=lambda t: t["take_name"]):
            frames = sorted({v["frames"] for v in t["views"].values() if "frames" in v})
            status = "ok" if not t["problems"] else ", ".join(sorted({p.code for p in t["problems"]}))
            rows.append((t["take_name"], t["scenario"] or "-", str(len(t["views"])),
                         "/".join(map(str, frames)) or "-", status))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for p in self.all_problems():
            where = " ".join(x for x in (p.take_uid and f"take {p.take_uid}", p.file, p.entry and f"[{p.entry}]") if x)
            lines.append(f"  {p.code:<18} {where}: {p.reason}")
        ok = sum(not t["problems"] for t in self.takes.values())
        lines.append(f"{ok}/{len(self.takes)} takes ok, {len(self.all_problems())} problems "
                     f"({self.resolution} resolution) in {self.release}")
        return "\n".join(lines)


def _probe_view(release: Release, view: rec.View) -> tuple[dict | None, Problem | None]:
    try:
        # A passing storage fault leaves as a StorageFault: storage, not the file, failed.
        with storage.faults_named(storage.join(release.url, view.path)):
            if not release.exists(view.path):
                return None, Problem("view_missing", f"{view.key}: file not found", view.path)
            with release.open_file(view.path) as f:
                info = probe(f)
        return ({"path": view.path, "codec": info.codec, "width": info.width, "height": info.height,
                 "fps": round(info.fps, 3), "frames": info.frames, "duration": round(info.duration, 3)}, None)
    except VideoError as e:
        return None, Problem("view_unreadable", f"{view.key}: {e}", view.path)
    except OSError as e:
        return None, Problem("view_unreadable", f"{view.key}: {e}", view.path)


def _check_take(release: Release, take: rec.Take, resolution: str) -> tuple[dict, list[Problem]]:
    views, problems = {}, []
    take_views = take.views(resolution)
    if not take_views:
        problems.append(Problem("no_views", "takes.json lists no ego or exo video stream", "takes.json", take.take_uid))
    for view in take_views:
        info, problem = _probe_view(release, view)
        if info:
            views[view.key] = info
        if problem:
            problems.append(dataclasses.replace(problem, take_uid=take.take_uid))
    counts = {k: v["frames"] for k, v in views.items()}
    if len(set(counts.values())) > 1:
        most = max(counts.values())
        drift = ", ".join(f"{k} {most - c} short" for k, c in sorted(counts.items()) if c != most)
        problems.append(Problem("frame_drift", f"views disagree on frame count ({drift}; others {most})",
                                take.root_dir, take_uid=take.take_uid))
    return views, problems


def validate(url: str, storage_options: dict | None = None, resolution: str = "full", workers: int = 8) -> Report:
    release = Release.open(url, storage_options)
    takes = release.takes()           # raises ReleaseError when takes.json is unreadable
    known = {t.take_uid for t in takes}
    problems: list[Problem] = []
    per_take: dict[str, list[Problem]] = {t.take_uid: [] for t in takes}

    for name in METADATA_FILES:
        try:
            release.read_json(name)
        except FileNotFoundError:
            problems.append(Problem("metadata_missing", "metadata file not found", name))
        except ReleaseError as e:
            problems.append(Problem("malformed_json", str(e), name))

    try:
        splits = release.splits()
    except FileNotFoundError:
        splits = None
        problems.append(Problem("metadata_missing", "no splits.json", "annotations/splits.json"))
    except (ReleaseError, rec.MalformedEntry) as e:
        splits = None
        problems.append(Problem("malformed_json", str(e), "annotations/splits.json"))
    if splits:
        seen: dict[str, str] = {}
        for split, uids in splits.split_to_take_uids.items():
            for uid in uids:
                if uid not in known:
                    problems.append(Problem("unknown_take", f"split {split!r} names a take not in takes.json",
                                            "annotations/splits.json", split, uid))
                elif uid in seen and seen[uid] != split:
                    per_take[uid].append(Problem("split_conflict", f"in both {seen[uid]!r} and {split!r}",
                                                 "annotations/splits.json", take_uid=uid))
                seen.setdefault(uid, split)
        for uid, split in splits.take_uid_to_split.items():
            if uid in seen and seen[uid] != split:
                per_take[uid].append(Problem("split_conflict", f"take_uid_to_split says {split!r}, "
                                             f"split_to_take_uids says {seen[uid]!r}", "annotations/splits.json",
                                             take_uid=uid))
        for uid in known - set(seen):
            per_take[uid].append(Problem("not_in_splits", "take is in no split", "annotations/splits.json",
                                         take_uid=uid))

    files: dict[str, str] = {}
    for name, split, load in _annotation_files():
        relative = f"annotations/{name}"
        try:
            uids = _uids(load(release))
            files[relative] = "ok"
        except FileNotFoundError:
            files[relative] = "absent"
            continue
        except ReleaseError as e:
            files[relative] = "malformed"
            problems.append(Problem("malformed_json", str(e), relative))
            continue
        for uid in dict.fromkeys(uids):
            if uid not in known:
                problems.append(Problem("unknown_take", "annotation names a take not in takes.json", relative,
                                        take_uid=uid))
            elif splits and splits.take_uid_to_split.get(uid) not in (None, split):
                per_take[uid].append(Problem("split_mismatch", f"annotated in the {split} file but the take is in "
                                             f"{splits.take_uid_to_split[uid]!r}", relative, take_uid=uid))
    problems += _check_ego_pose(release, known, per_take)
    for p in release.problems:   # malformed entries found while loading
        (per_take[p.take_uid] if p.take_uid in per_take else problems).append(p)

    report_takes = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda t: _check_take(release, t, resolution), takes)
        for take, (views, take_problems) in zip(takes, results):
            report_takes[take.take_uid] = {"take_name": take.take_name, "scenario": take.scenario, "views": views,
                                           "problems": per_take[take.take_uid] + take_problems}
    return Report(url, resolution, report_takes, problems, files)


def _check_ego_pose(release: Release, known: set[str], per_take: dict[str, list[Problem]]) -> list[Problem]:
    problems = []
    for split in ("train", "val", "test"):
        for part, kind in (("body", "annotation"), ("body", "automatic"), ("hand", "annotation"),
                           ("hand", "automatic"), ("camera_pose", "")):
            for uid in release.ego_pose_takes(split, part, kind):
                relative = f"annotations/ego_pose/{split}/{part}/{kind + '/' if kind else ''}{uid}.json"
                if uid not in known:
                    problems.append(Problem("unknown_take", "ego pose file for a take not in takes.json",
                                            relative, take_uid=uid))
                    continue
                try:
                    if part == "camera_pose":
                        release.camera_pose(split, uid)
                    else:
                        release.ego_pose(split, part, uid, kind)
                except (ReleaseError, rec.MalformedEntry, ValueError, TypeError) as e:
                    per_take[uid].append(Problem("malformed_entry", str(e), relative, take_uid=uid))
    return problems


# ----------------------------------------------------------------------------- the stage

RESOLUTIONS = ("full", "448")


@dataclasses.dataclass(frozen=True)
class ValidateParams(P.Params):
    resolution: str = P.setting("full", "which video files to probe", choices=RESOLUTIONS)
    workers: int = P.setting(8, "videos probed concurrently", fingerprint=False)


def _run(params: ValidateParams, inputs: dict, out: str, ctx: stages.Context) -> dict:
    report = validate(inputs["release"], ctx.storage_options, resolution=params.resolution,
                      workers=params.workers).to_json()
    fs, path = storage.filesystem(out, ctx.storage_options)
    storage.write_json_atomic(fs, storage.join(path, "report.json"), report)
    summary = report["summary"]
    ctx.log(f"  validate: {summary['takes_ok']}/{summary['takes']} takes ok, {summary['problems']} problems")
    return {**summary, "rejects": summary["takes"] - summary["takes_ok"]}


def _rejects(record: dict) -> list[tuple[str, str]]:
    fs, path = storage.filesystem(record["output"])
    report = storage.read_json(fs, storage.join(path, "report.json"))
    return [(p.get("take_uid") or p.get("file"), f"{p['code']}: {p['reason']}")
            for p in report["problems"] + [p for t in report["takes"].values() for p in t["problems"]]]


def _command(args, params: ValidateParams) -> int:
    try:
        report = validate(args.root, resolution=params.resolution, workers=params.workers)
    except ReleaseError as e:
        print(f"ee4d validate: cannot read the release: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        fs, path = storage.filesystem(args.json)
        storage.write_json_atomic(fs, path, report.to_json())
        print(f"report: {args.json}")
    return 0


KIND = stages.register(stages.StageKind(
    name="validate", params=ValidateParams, run=_run, inputs=("release",), rejects=_rejects,
    help="probe every view and parse every annotation; problems per take",
    resources=lambda params: f"driver: {params.workers} probe threads",
    command=stages.Command("validate", "check a release (local path or s3://) and report problems per take",
                           args=(("root", "release root: a path or an fsspec URL such as s3://bucket/prefix"),
                                 ("--json", "also write the report as JSON here")),
                           main=_command)))
