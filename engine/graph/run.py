"""The graph: every stage a spec declares, planned, run and recorded the same way.

Each stage writes under ``<out>/<folder>/[<variant>/]<fingerprint>/`` and commits there with
its ``stage.json`` (``engine.stage``). So

- a rerun finds every committed stage and skips it,
- a changed parameter gives that stage (and everything downstream) a new fingerprint, hence a
  new folder; the others are found and skipped, and the old folder stays as a cache,
- a run killed inside a stage reruns that stage in the same folder, where the stage's own
  resume (finished shards, finished take views, Ray Train checkpoints) picks up.

A failed stage blocks the stages that read it; the others still run, and the report shows the
failure. ``<out>/run.json`` records which folders make up the latest run.
"""
from __future__ import annotations

import time
import traceback

from engine import stage as stages
from engine import storage
from engine.errors import storage_fault
from engine.graph.report import publish as publish_report
from engine.graph.spec import Spec


class GraphError(RuntimeError):
    """One or more stages failed; the message names them. Finished stages stay done."""


def plan(spec: Spec, out: str | None = None, storage_options: dict | None = None) -> list[stages.Stage]:
    """The stages of a spec in run order (inputs first, the report last), with fingerprints
    and output URLs. ``Stage.inputs`` maps each input kind to the stage name that provides it."""
    out = storage.absolute(out or spec.out).rstrip("/")
    planned: list[stages.Stage] = []
    by_kind: dict[str, stages.Stage] = {}
    ordered = sorted(stages.kinds().values(), key=lambda k: k.uses_all_stages)     # the report last
    for kind in ordered:
        section = spec.sections.get(kind.key)
        if section is None:
            continue
        for variant, params in (section.items() if kind.variants else [(None, section)]):
            if kind.uses_all_stages:
                inputs = {s.name: s.name for s in planned}
            else:
                wanted = kind.inputs + kind.inputs_for(params) + kind.optional_inputs
                inputs = {k: by_kind[k].name for k in wanted if k in by_kind}
            named = {s.name: s for s in planned}
            fingerprints = {k: named[n].fingerprint for k, n in inputs.items()}
            given = kind.given_url(params) and storage.absolute(kind.given_url(params))
            fingerprint = (kind.given(given, storage_options) if given else
                           stages.fingerprint(kind, params, fingerprints, variant))
            stage = stages.Stage(f"{kind.name}/{variant}" if variant else kind.name, kind, params, inputs,
                                 fingerprint, given or stages.output_url(out, kind, variant, fingerprint))
            planned.append(stage)
            by_kind.setdefault(kind.name, stage)
    return planned


def dry_run(spec: Spec, out: str | None = None) -> list[dict]:
    """What ``run`` would do, without doing it: per stage, reused or run, where, with what."""
    rows = []
    for stage in plan(spec, out):
        if stage.kind.given_url(stage.params):
            status = "given"
        else:
            record = stages.read_record(stage.url)
            status = "reuse" if record and record.get("status") == "done" else (
                "resume" if record else "run")
        rows.append({"stage": stage.name, "about": stage.kind.help, "status": status, "fingerprint": stage.fingerprint,
                     "inputs": dict(stage.inputs), "output": stage.url,
                     "resources": stage.kind.resources(stage.params)})
    return rows


def run(spec: Spec, out: str | None = None, address: str | None = None, progress: bool = True) -> dict:
    """Run the graph; return the run record (also written to ``<out>/run.json``)."""
    out = storage.absolute(out or spec.out).rstrip("/")
    planned = plan(spec, out)
    ctx = stages.Context(progress=progress, address=address or spec.address, run_out=out, run_name=spec.name,
                         urls={s.name: s.url for s in planned})
    log = ctx.log
    named = {s.name: s for s in planned}
    started, failed = time.time(), []
    log(f"run {spec.name} ({ctx.run_id}): {len(planned)} stages -> {out}")
    for i, stage in enumerate(planned, 1):
        at = f"[{i}/{len(planned)}] {stage.name}"
        input_urls = {k: named[n].url for k, n in stage.inputs.items()}
        input_fps = {k: named[n].fingerprint for k, n in stage.inputs.items()}
        blocked = [n for n in stage.inputs.values() if n in failed]
        if blocked and not stage.kind.uses_all_stages:     # the report runs: it shows the failures
            failed.append(stage.name)
            ctx.records[stage.name] = stage.record("blocked", input_urls, input_fps, seconds=0.0,
                                                   error=f"not run: {', '.join(blocked)} failed")
            log(f"{at}: not run ({', '.join(blocked)} failed)")
            continue
        if stage.kind.given_url(stage.params):
            ctx.records[stage.name] = stage.record("given", input_urls, input_fps, seconds=0.0)
            log(f"{at}: {stage.url}")
            continue
        log(f"{at}: ({stage.fingerprint}) -> {stage.url}")
        t0 = time.time()
        try:
            # The report of a run with failed stages is written (it shows them) but not
            # committed, so the next run retries them and rewrites it.
            record = stages.execute(stage, input_urls, input_fps, ctx,
                                    commit=not (stage.kind.uses_all_stages and failed))
        except Exception as e:   # noqa: BLE001 - one stage's failure must not lose the others' work
            failed.append(stage.name)
            fault = storage_fault(e)     # a storage fault: its one line says it all
            error = f"StorageFault: {fault}" if fault else f"{type(e).__name__}: {e}"
            ctx.records[stage.name] = stage.record("failed", input_urls, input_fps,
                                                   seconds=round(time.time() - t0, 3), error=error)
            log(f"{at}: FAILED: {error}")
            if not fault:
                log(traceback.format_exc(limit=4))
            continue
        ctx.records[stage.name] = record
        if record["status"] == "reused" and stage.kind.uses_all_stages:
            publish_report(stage.url, out)      # the run folder shows this run's report
        if record["status"] == "reused":
            log(f"{at}: done before, reused ({stage.fingerprint})")
        else:
            log(f"{at}: done in {record['seconds']:.1f} s {_brief(record.get('result', {}))}")
    report = next((s for s in planned if s.kind.uses_all_stages), None)
    result = {"name": spec.name, "run_id": ctx.run_id, "out": out, "spec": spec.source,
              "seconds": round(time.time() - started, 3),
              "failed": failed, "stages": [ctx.records[s.name] for s in planned],
              "report": storage.join(out, "report.html") if report else None}
    fs, out_path = storage.filesystem(out)
    storage.write_json_atomic(fs, storage.join(out_path, "run.json"), result)
    if failed:
        raise GraphError(f"run {spec.name}: failed stages: {', '.join(failed)} (see {out}/run.json); "
                         "the others are done and a rerun retries only what failed")
    return result


def _brief(result: dict) -> str:
    shown = [f"{k} {v}" for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"({', '.join(shown)})" if shown else ""
