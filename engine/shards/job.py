"""The shard job: a Ray Data pipeline over a release's takes, writing WebDataset tar shards.

Unit of work: one shard (a fixed, planned list of takes). Each unit writes its tar under a
temporary name and publishes it whole (a rename on local disk, one object PUT on S3), then
its stats JSON. A rerun skips shards whose stats exist and redoes the rest with the same
plan, keys and tar headers; remuxed clips come out byte for byte the same (libx264's
transcoded bytes were seen to vary between runs).

Outputs under OUT:
  <split>/<split>-NNNNNN.tar          samples, a sample's members adjacent
  <split>/<split>-NNNNNN.stats.json   samples, bytes, seconds, takes, failures, per-sample rows
  <split>/<split>-NNNNNN.progress.json  only while a shard is written: where its worker is (so a
                                      retry after the worker died knows where; see _Progress)
  <split>/index.json                  wids-shard-index-v1 for random access
  manifest.parquet                    one row per sample (key, take_uid, split, t0, t1, shard, views, sha256,
                                      bytes, and offset/size: where its members lie in the tar, so a
                                      reader fetches one sample with one range read)
  rejects.json                        take_uid, split and reason of every take left out
  problems.json                       file and reason of every annotation file that could not be read
                                      (each takes only its own annotations away: takes keep the rest)
  stage.json                          the stage record (engine.stage): claimed first, marked done last
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import socket
import tarfile
import tempfile
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine import errors, storage
from engine import stage as stages
from engine.errors import ContentError
from engine.release import Release
from engine.shards.plan import ShardConfig, ShardSpec, plan_shards, select_views
from engine.shards.sample import TakeSource, build_samples

_RELEASES: dict[str, Release] = {}


def _release(url: str, storage_options: dict | None, job: str) -> Release:
    """One Release per worker process and job, so annotation files are parsed once, not once per
    shard. Ray keeps worker processes from job to job: a later job opens the release afresh, as
    it may have changed under the same URL."""
    key = json.dumps([job, url, storage_options], sort_keys=True)
    if key not in _RELEASES:
        _RELEASES.clear()
        _RELEASES[key] = Release.open(url, storage_options)
    return _RELEASES[key]


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member with fixed metadata, so the same bytes always give the same archive."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


TAR_END = b"\0" * (2 * tarfile.BLOCKSIZE)


def _shard_paths(out: str, spec: ShardSpec) -> tuple[str, str, str]:
    """The shard's tar, its stats and, while it is written, its progress record."""
    base = storage.join(out, spec.split, spec.name)
    return base + ".tar", base + ".stats.json", base + ".progress.json"


def _finished(fs, out: str, spec: ShardSpec) -> dict | None:
    """A shard's stats when both its files are in storage and agree (the tar has the size the
    stats give), else None: it is to be written (again)."""
    tar_path, stats_path, _ = _shard_paths(out, spec)
    try:
        stats = storage.read_json(fs, stats_path)
        return stats if fs.info(tar_path)["size"] == stats["bytes"] else None
    except FileNotFoundError:
        return None


def write_shard(spec: ShardSpec, release_url: str, out_url: str, config: ShardConfig,
                storage_options: dict | None = None, job: str = "") -> dict:
    """Write one shard and its stats; return the stats. Plain Python: Ray only schedules it."""
    fs, out = storage.filesystem(out_url, storage_options)
    tar_path, stats_path, progress_path = _shard_paths(out, spec)
    progress = _Progress(fs, progress_path, spec, job)
    try:
        stats = _write_shard(spec, release_url, config, storage_options, job, fs, tar_path, progress)
        storage.write_json_atomic(fs, stats_path, stats)
    except Exception:
        # An error, not a death: a retry must not count it as one. (A worker stopped by
        # SIGTERM leaves through SystemExit: that is a death and keeps its record.)
        progress.clear()
        raise
    progress.clear()
    return stats


def _write_shard(spec, release_url, config, storage_options, job, fs, tar_path, progress) -> dict:
    progress.at(OPENING)
    release = _release(release_url, storage_options, job)
    started = time.time()
    rows, rejects, problems, seconds = [], [], [], 0.0
    # Staged on local disk: beside the target for a local output (then renamed), in the temp
    # dir for an object store (then uploaded in one PUT). The name is fixed per shard, so a
    # retry after a crash overwrites it instead of leaving a second one behind.
    if storage.is_local(fs):
        fs.makedirs(os.path.dirname(tar_path), exist_ok=True)
        staging = tar_path + ".partial"
    else:
        staging = os.path.join(tempfile.gettempdir(), f"ee4d-{hashlib.sha1(tar_path.encode()).hexdigest()[:16]}.partial")
    with open(staging, "wb") as shard:
        for uid in spec.take_uids:
            take = release.take(uid)
            if progress.deaths.get(uid, 0) >= WORKER_DEATHS:
                rejects.append({"take_uid": uid, "take_name": take.take_name, "split": spec.split,
                                "reason": f"the worker writing shard {spec.name} died {WORKER_DEATHS} times on this "
                                          "take (killed: out of memory, or a crash in a decoder); the shard's "
                                          "other takes were written"})
                continue
            progress.at(uid)
            # A take joins the shard whole or not at all: on a bad take the file is cut back
            # to where the take began, so no half of it is left behind.
            take_rows, base = [], shard.tell()
            try:
                src = TakeSource.load(release, take, spec.split, config)
                problems += [p for p in src.problems if p not in problems]
                for key, members, row in build_samples(release, src, config):
                    digest, start = hashlib.sha256(), shard.tell()
                    for ext, data in members:
                        name = f"{key}.{ext}"
                        digest.update(name.encode() + b"\0" + data)
                        shard.write(tar_member(name, data))
                    row.update(shard=spec.name, sha256=digest.hexdigest(), bytes=sum(len(d) for _, d in members),
                               offset=start, size=shard.tell() - start)
                    take_rows.append(row)
            except ContentError as e:    # anything else fails the shard: Ray retries it
                shard.seek(base)
                shard.truncate()
                rejects.append({"take_uid": uid, "take_name": take.take_name, "split": spec.split,
                                "reason": str(e)})
                continue
            rows += take_rows
            seconds += sum(r["t1"] - r["t0"] for r in take_rows) * len(src.views)
        shard.write(TAR_END)
    progress.at(PUBLISHING)
    size = os.path.getsize(staging)
    if storage.is_local(fs):
        os.replace(staging, tar_path)
    else:
        with storage.faults_named(storage.url(fs, tar_path)):
            fs.put_file(staging, tar_path)
        os.unlink(staging)
    return {"shard": spec.name, "split": spec.split, "samples": len(rows), "bytes": size,
            "video_seconds": round(seconds, 3), "takes": sorted({r["take_uid"] for r in rows}),
            "failures": rejects, "problems": problems, "rows": rows, "node_id": _node_id(), "host": socket.gethostname(),
            "wall_seconds": round(time.time() - started, 3)}


WORKER_DEATHS = 3            # a take its shard's worker died on this many times is rejected
OPENING, PUBLISHING = "<opening the release>", "<publishing the shard>"


class _Progress:
    """What a shard's writer is doing, kept in storage beside the shard while it works, so that
    the attempt Ray Data starts after the worker died (killed by the OS or by Ray's memory
    monitor, or crashed in native code) knows where the one before died. Ray Data retries a
    dead worker's task without limit; this bounds it: a take the worker died on WORKER_DEATHS
    times is rejected and the shard's other takes are written, and dying as often outside any
    take fails the shard. Deaths count within one run of the stage (``job``)."""

    def __init__(self, fs, path: str, spec: ShardSpec, job: str):
        self.fs, self.path, self.spec, self.job = fs, path, spec, job
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        fs.invalidate_cache(path)        # a listing cached in this worker must not hide the record
        try:
            left = storage.read_json(fs, path)       # only a dead attempt leaves its record
        except FileNotFoundError:
            left = None
        self.deaths: dict[str, int] = {}
        # A record of this very process is an attempt whose clean-up failed, not a death.
        if left and left["job"] == job and {"host": left["host"], "pid": left["pid"]} != self.me:
            self.deaths = left["deaths"]
            self.deaths[left["at"]] = self.deaths.get(left["at"], 0) + 1

    def at(self, what: str) -> None:
        if what in (OPENING, PUBLISHING) and self.deaths.get(what, 0) >= WORKER_DEATHS:
            raise RuntimeError(f"shard {self.spec.split}/{self.spec.name}: its worker died {WORKER_DEATHS} times "
                               f"{what[1:-1]} (killed: out of memory, or a crash in native code)")
        storage.write_json_atomic(self.fs, self.path, {"job": self.job, "at": what, "deaths": self.deaths, **self.me})

    def clear(self) -> None:
        """Best effort: a record left costs at most one miscounted death (finalize removes one
        left on local disk), and the error at hand, if any, is the one to report."""
        with contextlib.suppress(Exception):
            self.fs.rm(self.path)


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


@dataclasses.dataclass
class ShardPlan:
    specs: list[ShardSpec]
    rejects: list[dict]          # takes left out before any shard ran (no video file, bad entry)


def plan(release: Release, config: ShardConfig) -> ShardPlan:
    """Assign takes to shards by the size of their source files; reject takes that cannot be read."""
    splits = release.splits()
    takes = {t.take_uid: t for t in release.takes()}
    specs, rejects = [], []
    for p in release.problems:   # takes.json entries that did not parse
        if p.file == "takes.json":
            rejects.append({"take_uid": p.take_uid or p.entry, "take_name": None, "split": None, "reason": p.reason})

    def source_bytes(take) -> int:
        views = select_views(take, config.views, config.resolution)
        with storage.faults_named(f"{release.url} (sizes of take {take.take_name}'s videos)"):
            return sum(release.fs.size(release.path(v.path)) for _, v in views)

    for split in config.splits:
        members = []
        for uid in splits.split_to_take_uids.get(split, []):
            if uid in takes:
                members.append(takes[uid])
            else:
                rejects.append({"take_uid": uid, "take_name": None, "split": split,
                                "reason": "in splits.json but not in takes.json"})
        # Sizes come from file listings; on an object store that is one request per file.
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(source_bytes, take) for take in members]
        sized = []
        for take, future in zip(members, futures):
            try:
                sized.append((take.take_uid, future.result()))
            except FileNotFoundError as e:
                rejects.append({"take_uid": take.take_uid, "take_name": take.take_name, "split": split,
                                "reason": f"video file not found: {e}"})
        specs += plan_shards(split, sized, config.shard_bytes)
    return ShardPlan(specs, rejects)


def run(release_url: str, out_url: str, config: ShardConfig, storage_options: dict | None = None,
        address: str | None = None, progress: bool = True) -> dict:
    """Run the shard stage on its own (Ray, local by default); return its result."""
    record = stages.run_one("shard", config, {"release": release_url}, out_url, storage_options=storage_options,
                            address=address, progress=progress)
    return record["result"]


def _run(config: ShardConfig, inputs: dict, out_url: str, ctx: stages.Context) -> dict:
    release_url = inputs["release"]
    release = Release.open(release_url, ctx.storage_options)
    fs, out = storage.filesystem(out_url, ctx.storage_options)
    shard_plan = plan(release, config)
    todo = [s for s in shard_plan.specs if _finished(fs, out, s) is None]
    ctx.log(f"shard: {len(shard_plan.specs)} shards planned, {len(shard_plan.specs) - len(todo)} already done, "
            f"{len(todo)} to write")
    if todo:
        import ray.data
        data_context = ray.data.DataContext.get_current()
        data_context.enable_progress_bars = ctx.progress
        errors.retry_storage_faults(data_context)
        items = [{"spec": json.dumps(dataclasses.asdict(s))} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # One CPU per shard (decode and mux are single-threaded per stream); Ray Data spreads
        # tasks across nodes. A worker killed mid-shard is retried and rewrites the shard from
        # scratch; _Progress bounds how often.
        writer = _RayShardWriter(release_url, out_url, config, ctx.storage_options, uuid.uuid4().hex)
        ds = stages.without_cpu_reservation(ds.map(writer, num_cpus=1))
        for row in ds.iter_rows():
            ctx.log(f"  {row['shard']}: {row['samples']} samples, {row['failures']} rejected takes")
    return finalize(fs, out, shard_plan)


class _RayShardWriter:
    """The per-row function of the Ray Data map: decode the spec, write the shard, report briefly."""

    def __init__(self, release_url, out_url, config, storage_options, job):
        self.args = (release_url, out_url, config, storage_options, job)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(row["spec"])
        spec = ShardSpec(d["split"], d["index"], tuple(d["take_uids"]))
        stats = write_shard(spec, *self.args)
        return {"shard": stats["shard"], "samples": stats["samples"], "failures": len(stats["failures"])}


def finalize(fs, out: str, shard_plan: ShardPlan) -> dict:
    """Gather every shard's stats into the manifest, the wids indexes and the rejects; return the
    stage's result."""
    rows, rejects, problems, per_split = [], list(shard_plan.rejects), [], {}
    fs.invalidate_cache()            # what storage holds now, not a listing from earlier
    for spec in shard_plan.specs:
        tar_path, _, progress_path = _shard_paths(out, spec)
        # Storage that lost an object after the run wrote it (a store restarted without its data)
        # must not get a manifest naming it: the stage fails, and a rerun writes it again.
        stats = _finished(fs, out, spec)
        if stats is None:
            raise errors.StorageFault(f"{tar_path}: {errors.STORAGE_FAULT}: this run wrote it, and it is gone or "
                                      "cut short")
        rows += stats["rows"]
        rejects += stats["failures"]
        problems += [p for p in stats["problems"] if p not in problems]
        per_split.setdefault(spec.split, []).append(stats)
        # A run killed between a staging write and its rename leaves a .partial, and one
        # killed before clearing it a progress record; a later successful run of that shard
        # published it, so anything left is stale.
        for left in (tar_path + ".partial", progress_path):
            if storage.is_local(fs) and fs.exists(left):
                fs.rm(left)
    for split, shards in per_split.items():
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"ee4d-{split}",
                 "shardlist": [{"url": f"{s['shard']}.tar", "nsamples": s["samples"], "filesize": s["bytes"]}
                               for s in shards]}
        storage.write_json_atomic(fs, storage.join(out, split, "index.json"), index)
    table = pa.table({
        "key": [r["key"] for r in rows], "take_uid": [r["take_uid"] for r in rows],
        "split": [r["split"] for r in rows], "t0": [r["t0"] for r in rows], "t1": [r["t1"] for r in rows],
        "shard": [r["shard"] for r in rows], "views": [r["views"] for r in rows],
        "sha256": [r["sha256"] for r in rows], "bytes": [r["bytes"] for r in rows],
        "offset": [r["offset"] for r in rows], "size": [r["size"] for r in rows]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(fs, storage.join(out, "manifest.parquet"), buf.getvalue())
    storage.write_json_atomic(fs, storage.join(out, "rejects.json"), rejects)
    storage.write_json_atomic(fs, storage.join(out, "problems.json"), problems)
    return {
        "shards": {s: [x["shard"] for x in v] for s, v in per_split.items()},
        "samples": len(rows), "bytes": sum(x["bytes"] for v in per_split.values() for x in v),
        "video_seconds": round(sum(x["video_seconds"] for v in per_split.values() for x in v), 3),
        "rejects": len(rejects), "annotation_problems": len(problems),
        "nodes": sorted({x["node_id"] for v in per_split.values() for x in v if x.get("node_id")}),
    }


def _rejects(record: dict) -> list[tuple[str, str]]:
    """Takes left out, then annotation files that could not be read (the takes kept the rest)."""
    fs, path = storage.filesystem(record["output"])
    rejects = storage.read_json(fs, storage.join(path, "rejects.json"))
    problems = storage.read_json(fs, storage.join(path, "problems.json"))
    return [(r.get("take_uid"), r.get("reason")) for r in rejects] + [(p["file"], p["reason"]) for p in problems]


def _summary(record: dict) -> str:
    result = record["result"]
    return (f"{result['samples']} samples in {sum(map(len, result['shards'].values()))} shards, "
            f"{result['rejects']} rejected takes (see rejects.json) -> {record['output']}")


KIND = stages.register(stages.StageKind(
    name="shard", params=ShardConfig, run=_run, inputs=("release",), folder="shards", needs_ray=True, version=7,
    rejects=_rejects, help="time-aligned multi-view WebDataset shards of a release (Ray Data)",
    resources=lambda config: "Ray Data: one task (1 CPU) per shard, spread across nodes",
    command=stages.Command("shard", "write time-aligned multi-view WebDataset shards of a release (Ray Data)",
                           summary=_summary)))
