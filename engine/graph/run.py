"""The graph: release -> validate -> shard -> features -> each benchmark -> report.

Each stage writes under ``<out>/<kind>/<fingerprint>/`` and, last, a ``lineage.json`` there:
that file is the commit marker. A stage's fingerprint hashes its kind, a format version, its
config and its inputs' fingerprints, so

- a rerun finds every lineage.json and skips every stage,
- a changed parameter gives that stage (and everything downstream) a new fingerprint, hence a
  new folder; the others are found and skipped, and the old folder stays as a cache,
- a run killed inside a stage reruns that stage in the same folder, where the stage's own
  resume (finished shards, finished take views, Ray Train checkpoints) picks up.

``<out>/run.json`` records which folders make up the latest run; ``<out>/report.html`` is its
report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import traceback
from typing import Callable

from engine import storage
from engine.graph.spec import Spec

# Bump a kind's version when its output format changes: old outputs then stop matching.
VERSIONS = {"release": 1, "validate": 1, "shard": 1, "features": 1, "task": 1, "report": 1}
FOLDERS = {"shard": "shards", "task": "tasks"}


@dataclasses.dataclass
class Stage:
    name: str                         # release, validate, shard, features, task/<name>, report
    kind: str
    config: dict                      # recorded in lineage.json
    inputs: dict[str, str]            # upstream stage name -> fingerprint
    work: Callable[["Context", "Stage"], dict] | None   # writes ctx.urls[stage.name], returns counts; None: nothing to run
    needs_ray: bool = False
    url: str | None = None            # fixed output (a given release); otherwise <out>/<kind>/<fingerprint>
    # What the fingerprint hashes, when not the whole config: settings that only change how
    # fast a stage runs (actors, retries, probe threads) must not invalidate its output.
    identity: dict | None = None
    fingerprint: str = ""

    @property
    def folder(self) -> str:
        """Where the stage writes, under the run's output: e.g. shards/<fp>, tasks/<name>/<fp>."""
        return storage.join(FOLDERS.get(self.kind, self.kind), *self.name.split("/")[1:], self.fingerprint)

    def __post_init__(self):
        identity = self.config if self.identity is None else self.identity
        blob = json.dumps({"kind": self.kind, "version": VERSIONS[self.kind], "config": identity,
                           "inputs": self.inputs}, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Context:
    spec: Spec
    out: str                          # the run's output URL
    urls: dict[str, str]              # stage name -> output URL
    records: dict[str, dict]          # stage name -> lineage record of this run
    log: Callable[..., None]


class GraphError(RuntimeError):
    """One or more stages failed; the message names them. Finished stages stay done."""


# ----------------------------------------------------------------------------- the plan

def plan(spec: Spec, out: str | None = None) -> tuple[list[Stage], dict[str, str]]:
    """The stages of a spec in run order, with fingerprints, and each one's output URL."""
    out = (out or spec.out).rstrip("/")
    stages: list[Stage] = []
    if spec.release.url:
        stages.append(Stage("release", "release", {"url": spec.release.url,
                                                   "listing": release_listing(spec.release.url)},
                            {}, None, url=spec.release.url))
    else:
        stages.append(Stage("release", "release", {"synth": dataclasses.asdict(spec.release.synth)}, {}, _synth))
    release = stages[0]
    if spec.validate:
        stages.append(Stage("validate", "validate", dataclasses.asdict(spec.validate),
                            {"release": release.fingerprint}, _validate,
                            identity={"resolution": spec.validate.resolution}))
    if spec.shard:
        stages.append(Stage("shard", "shard", spec.shard.to_json(), {"release": release.fingerprint},
                            _shard, needs_ray=True))
    if spec.features:
        from engine.features import models
        config = spec.features.config()
        digest = models.weights_digest(config.model)
        stages.append(Stage("features", "features",
                            {"model": config.model.to_json(), "weights_sha256": digest,
                             **{k: v for k, v in dataclasses.asdict(config).items() if k != "model"}},
                            {"shard": stages[-1].fingerprint}, _features, needs_ray=True,
                            # model, weights, windows, precision, views, splits; not batch size or actors
                            identity={"features": config.fingerprint(digest), "views": config.views,
                                      "splits": config.splits}))
    features = stages[-1]
    for name, params in spec.tasks.items():
        config = {"task": name, "options": params.options, "train": dataclasses.asdict(params.train)}
        identity = {**config, "train": {k: v for k, v in config["train"].items()
                                        if k not in ("max_failures", "checkpoint_every")}}
        stages.append(Stage(f"task/{name}", "task", config,
                            {"features": features.fingerprint, "release": release.fingerprint},
                            _task, needs_ray=True, identity=identity))
    if spec.report:
        stages.append(Stage("report", "report", dataclasses.asdict(spec.report),
                            {s.name: s.fingerprint for s in stages}, _report))
    urls = {s.name: s.url or storage.join(out, s.folder) for s in stages}
    return stages, urls


def release_listing(url: str) -> list:
    """What identifies a given release without reading its videos: the names, sizes and
    modification stamps of its metadata and annotation files."""
    fs, root = storage.filesystem(url)
    try:
        files = fs.find(root, maxdepth=1, detail=True)
        files.update(fs.find(storage.join(root, "annotations"), detail=True))
    except FileNotFoundError:
        raise ValueError(f"release {url}: not found") from None
    stamp_keys = ("mtime", "LastModified", "ETag", "etag", "last_modified")
    return sorted((os.path.relpath(path, root), info.get("size"),
                   str(next((info[k] for k in stamp_keys if info.get(k) is not None), "")))
                  for path, info in files.items() if info.get("type") == "file")


# ----------------------------------------------------------------------------- running

def run(spec: Spec, out: str | None = None, address: str | None = None, progress: bool = True) -> dict:
    """Run the graph; return the run record (also written to ``<out>/run.json``)."""
    log = print if progress else (lambda *a, **k: None)
    out = (out or spec.out).rstrip("/")
    stages, urls = plan(spec, out)
    fs, out_path = storage.filesystem(out)
    ctx = Context(spec, out, urls, {}, log)
    started, failed = time.time(), []
    log(f"run {spec.name}: {len(stages)} stages -> {out}")
    for i, stage in enumerate(stages, 1):
        upstream_failed = [n for n in stage.inputs if n in failed]
        if upstream_failed and stage.kind != "report":     # the report shows the failures
            failed.append(stage.name)
            ctx.records[stage.name] = _record(stage, urls, "blocked", 0.0, {},
                                              error=f"not run: {', '.join(upstream_failed)} failed")
            log(f"[{i}/{len(stages)}] {stage.name}: not run ({', '.join(upstream_failed)} failed)")
            continue
        stage_fs, stage_path = storage.filesystem(urls[stage.name])
        lineage = storage.join(stage_path, "lineage.json")
        if stage.work is None:
            ctx.records[stage.name] = _record(stage, urls, "given", 0.0, {})
            log(f"[{i}/{len(stages)}] {stage.name}: {urls[stage.name]}")
            continue
        if stage_fs.exists(lineage):
            ctx.records[stage.name] = {**storage.read_json(stage_fs, lineage), "status": "reused"}
            log(f"[{i}/{len(stages)}] {stage.name}: done before, reused ({stage.fingerprint})")
            continue
        log(f"[{i}/{len(stages)}] {stage.name}: running ({stage.fingerprint}) -> {urls[stage.name]}")
        if stage.needs_ray:
            _ensure_ray(address or spec.address)
        t0 = time.time()
        try:
            counts = stage.work(ctx, stage)
        except Exception as e:   # noqa: BLE001 - one stage's failure must not lose the others' work
            if stage.kind not in ("task", "report"):
                raise
            failed.append(stage.name)
            ctx.records[stage.name] = _record(stage, urls, "failed", time.time() - t0, {},
                                              error=f"{type(e).__name__}: {e}")
            log(f"[{i}/{len(stages)}] {stage.name}: FAILED: {type(e).__name__}: {e}")
            log(traceback.format_exc(limit=4))
            continue
        record = _record(stage, urls, "ran", time.time() - t0, counts)
        # The report of a run with failed stages is written (it shows the failures) but not
        # committed, so the next run retries them and rewrites it.
        if not (stage.kind == "report" and failed):
            storage.write_json_atomic(stage_fs, lineage, {k: v for k, v in record.items() if k != "status"})
        ctx.records[stage.name] = record
        log(f"[{i}/{len(stages)}] {stage.name}: done in {record['seconds']:.1f} s {_brief(counts)}")
    result = {"name": spec.name, "out": out, "spec": spec.source, "seconds": round(time.time() - started, 3),
              "failed": failed, "stages": [ctx.records[s.name] for s in stages],
              "report": storage.join(out, "report.html") if spec.report else None}
    storage.write_json_atomic(fs, storage.join(out_path, "run.json"), result)
    if failed:
        raise GraphError(f"run {spec.name}: failed stages: {', '.join(failed)} (see {out}/run.json); "
                         "the others are done and a rerun retries only what failed")
    return result


def _record(stage: Stage, urls: dict, status: str, seconds: float, counts: dict, error: str | None = None) -> dict:
    record = {"stage": stage.name, "kind": stage.kind, "fingerprint": stage.fingerprint, "inputs": stage.inputs,
              "config": stage.config, "output": urls[stage.name], "status": status, "seconds": round(seconds, 3),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "counts": counts}
    if error:
        record["error"] = error
    return record


def _brief(counts: dict) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return f"({', '.join(shown)})" if shown else ""


def _ensure_ray(address: str | None) -> None:
    import ray
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)


# ----------------------------------------------------------------------------- stage work

def _synth(ctx: Context, stage: Stage) -> dict:
    url = ctx.urls[stage.name]
    from engine.release import synth

    params = ctx.spec.release.synth
    fs, path = storage.filesystem(url)
    kwargs = dict(preset=params.preset, takes=params.takes, seconds=params.seconds, seed=params.seed,
                  scenarios=list(params.scenarios) if params.scenarios else None)
    if storage.is_local(fs):
        # synth renames a finished release into place: an existing takes.json means complete.
        plans = None if fs.exists(storage.join(path, "takes.json")) else synth.generate(path, **kwargs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            plans = synth.generate(os.path.join(tmp, "release"), **kwargs)
            fs.put(os.path.join(tmp, "release"), path, recursive=True)
    from engine.release import Release
    takes = Release.open(url).takes()
    return {"takes": len(takes), "generated": plans is not None}


def _validate(ctx: Context, stage: Stage) -> dict:
    url = ctx.urls[stage.name]
    from engine.release.validate import validate

    params = ctx.spec.validate
    report = validate(ctx.urls["release"], resolution=params.resolution, workers=params.workers).to_json()
    fs, path = storage.filesystem(url)
    storage.write_json_atomic(fs, storage.join(path, "report.json"), report)
    ctx.log(f"  validate: {report['summary']['takes_ok']}/{report['summary']['takes']} takes ok, "
            f"{report['summary']['problems']} problems")
    return {**report["summary"], "rejects": report["summary"]["takes"] - report["summary"]["takes_ok"]}


def _shard(ctx: Context, stage: Stage) -> dict:
    url = ctx.urls[stage.name]
    from engine.shards import job

    manifest = job.run(ctx.urls["release"], url, ctx.spec.shard, progress=True)
    return {"samples": manifest["samples"], "shards": sum(map(len, manifest["shards"].values())),
            "bytes": manifest["bytes"], "video_seconds": manifest["video_seconds"], "rejects": manifest["rejects"]}


def _features(ctx: Context, stage: Stage) -> dict:
    url = ctx.urls[stage.name]
    from engine.features import job

    manifest = job.run(ctx.urls["shard"], url, ctx.spec.features.config(), progress=True)
    return {"take_views": manifest["take_views"], "dim": manifest["dim"], "rejects": manifest["rejects"]}


def _task(ctx: Context, stage: Stage) -> dict:
    url = ctx.urls[stage.name]
    from engine.tasks import TASKS
    from engine.train.loop import run as train

    name = stage.config["task"]
    params = ctx.spec.tasks[name]
    result = train(TASKS[name](**params.options), ctx.urls["features"], url, params.train,
                   release_url=ctx.urls["release"])
    return {"metric": result["metric"], "value": round(result["val"][result["metric"]], 6),
            "train_examples": result["train_examples"], "val_examples": result["val_examples"],
            "best_epoch": result["best_epoch"]}


def _report(ctx: Context, stage: Stage) -> dict:
    url = ctx.urls[stage.name]
    from engine.graph import report

    records = [ctx.records[name] for name in ctx.urls if name in ctx.records]
    return report.write(ctx.spec, ctx.out, url, records, ctx.urls)
