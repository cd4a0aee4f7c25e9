"""The probe stage: what pretraining bought. It trains benchmarks on the pretrained encoder's
features and, with the same settings, on the features of the encoder pretraining started from
(random init for the built-ins), and the report puts the two side by side.

Both feature sets take the graph's ``features`` settings (window, stride, views, splits) with the
encoder swapped, each encoder fed the pretraining clips' frame count and size. Every feature set
and benchmark run inside is a stage of its own, with its record, kept where the graph keeps
such a stage: one the graph already ran with the same settings is reused, and a killed probe
resumes where it stopped.
``ee4d probe PRETRAIN FEATURES OUT`` runs it on its own.
"""
from __future__ import annotations

import dataclasses
import html

import numpy as np

from engine import params as P
from engine import stage as stages
from engine import storage

SIDES = ("start", "pretrained")     # the encoder before pretraining, and after


@dataclasses.dataclass(frozen=True)
class ProbeConfig(P.Params):
    tasks: tuple[str, ...] = P.setting(("keystep_recognition", "demonstrator_proficiency"),
                                       "benchmarks to train on both feature sets (ones that read features)")
    epochs: int = P.setting(40, "epochs at most, per benchmark run")
    seeds: int = P.setting(1, "runs per benchmark and feature set (seeds 0..N-1); the report shows their mean and range")

    def __post_init__(self):
        super().__post_init__()
        if self.epochs < 1 or self.seeds < 1 or not self.tasks:
            raise ValueError("probe needs at least one task, one epoch and one seed")


def _check(config: ProbeConfig) -> None:
    from engine.tasks import TASKS

    for name in config.tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
        if not TASKS[name]().reads_features:
            raise ValueError(f"{name} does not read features (it learns from frames or sensors): "
                             "pretrained features would change nothing")


def feature_settings(features, pretrain):
    """(settings, extra inputs) of each side's feature stage: the graph's feature settings (window,
    stride, views, splits) with the encoder swapped, each fed the pretraining clips' frame count
    and size. Those are left unset where they are the model's default, so that a side can be
    the graph's own features stage."""
    from engine.features import models
    from engine.features.job import GRAPH_PRETRAINED

    default = models.resolve(pretrain.model, pretrain.weights, sha256=pretrain.weights_sha256)
    start = dataclasses.replace(
        features, model=pretrain.model, weights=pretrain.weights, weights_sha256=pretrain.weights_sha256,
        input=None, frames=None if pretrain.clip_frames == default.frames else pretrain.clip_frames,
        size=None if pretrain.size == default.size else pretrain.size)
    # The trained encoder's defaults are its pretraining clips' (encoder.json).
    pretrained = dataclasses.replace(features, model=GRAPH_PRETRAINED, weights=None, weights_sha256=None,
                                     input=None, frames=None, size=None)
    return {"start": (start, ()), "pretrained": (pretrained, ("pretrain",))}


def _run(config: ProbeConfig, inputs: dict, out: str, ctx: stages.Context) -> dict:
    from engine.features.job import FeatureConfig
    from engine.pretrain.stage import PretrainConfig
    from engine.tasks import TASKS

    _check(config)
    so = ctx.storage_options
    # Inside a graph, each run goes where the graph would keep that stage: one the graph already
    # has (its features, a benchmark with the same settings) is reused, and a later graph that
    # asks for one of these (features.model: pretrained) finds it done.
    root = ctx.run_out or out

    def run(kind_name: str, settings, given: dict[str, str], variant: str | None = None) -> dict:
        kind = stages.kind(kind_name)
        fingerprints = {k: stages.input_fingerprint(k, url, so) for k, url in given.items()}
        url = stages.output_url(root, kind, variant, stages.fingerprint(kind, settings, fingerprints, variant))
        return stages.run_one(kind_name, settings, given, url, variant=variant, storage_options=so,
                              address=ctx.address, progress=ctx.progress)

    features = P.build(FeatureConfig, stages.finished(inputs["features"], "features", so)["config"], "features")
    pretrain = P.build(PretrainConfig, stages.finished(inputs["pretrain"], "pretrain", so)["config"], "pretrain")
    urls = {"shard": stages.upstream(inputs["features"], "shard", so), "pretrain": inputs["pretrain"]}
    feature_urls = {side: run("features", settings, {k: urls[k] for k in ("shard", *extra)})["output"]
                    for side, (settings, extra) in feature_settings(features, pretrain).items()}
    results = {}
    for name in config.tasks:
        task = TASKS[name]
        runs = {side: [] for side in SIDES}
        for side in SIDES:
            given = {"features": feature_urls[side], **({"release": inputs["release"]} if "release" in inputs else {})}
            for seed in range(config.seeds):
                record = run("task", task.Options(epochs=config.epochs, seed=seed), given, variant=name)
                runs[side].append({"value": record["result"]["value"], "output": record["output"]})
        results[name] = {"metric": task.metric, "maximize": task.maximize, **runs}
        ctx.log(f"probe: {name} {task.metric}: " + ", ".join(
            f"{side} {np.mean([r['value'] for r in runs[side]]):.4f}" for side in SIDES))
    return {"features": feature_urls, "start_model": pretrain.model, "start_weights": pretrain.weights,
            "seeds": config.seeds, "epochs": config.epochs, "tasks": results}


def _summary(record: dict) -> str:
    r = record["result"]["tasks"]
    return "; ".join(f"{name} {t['metric']}: start {np.mean([x['value'] for x in t['start']]):.4f}, pretrained "
                     f"{np.mean([x['value'] for x in t['pretrained']]):.4f}" for name, t in r.items())


def _resources(config: ProbeConfig) -> str:
    return (f"up to one feature job and {2 * len(config.tasks) * config.seeds} benchmark runs "
            "(Ray Train, 1 worker each)")


def _report(records: list[dict], ctx: stages.Context) -> str:
    from engine.graph.report import link

    def cell(runs: list[dict]) -> str:
        values = [r["value"] for r in runs]
        spread = f" ({min(values):.4f} to {max(values):.4f})" if len(values) > 1 else ""
        return f"{np.mean(values):.4f}{spread}"

    out = ["<h2>Benchmarks on pretrained features</h2>"]
    for record in records:
        if record["status"] in ("failed", "blocked"):
            out.append(f"<p class='bad'>{record['stage']}: {html.escape(str(record.get('error')))}</p>")
            continue
        r = record["result"]
        start = html.escape(r["start_model"]) + ("" if r["start_weights"] else ", random init")
        features = " ".join(link(storage.join(u, "stage.json"), ctx.run_out, f"{side} features")
                            for side, u in r["features"].items())
        rows = [f"<tr><th>benchmark</th><th>metric (val)</th><th>before pretraining ({start})</th>"
                f"<th>pretrained</th><th>change</th></tr>"]
        for name, t in r["tasks"].items():
            change = np.mean([x["value"] for x in t["pretrained"]]) - np.mean([x["value"] for x in t["start"]])
            rows.append(f"<tr><td>{name}</td><td>{t['metric']} ({'higher' if t['maximize'] else 'lower'} is better)"
                        f"</td><td>{cell(t['start'])}</td><td><b>{cell(t['pretrained'])}</b></td>"
                        f"<td>{change:+.4f}</td></tr>")
        out.append(f"<p>{record['stage']}: {r['epochs']} epochs, {r['seeds']} seed(s) per cell (mean, and range "
                   f"over seeds); {features}.</p><table>{''.join(rows)}</table>")
    return "".join(out)


KIND = stages.register(stages.StageKind(
    name="probe", params=ProbeConfig, run=_run, inputs=("pretrain", "features"), optional_inputs=("release",),
    needs_ray=True, check=_check, resources=_resources, report=_report,
    help="benchmarks on the pretrained encoder's features beside those of the encoder it started from",
    command=stages.Command("probe", "train benchmarks on pretrained and starting-encoder features, side by side",
                           summary=_summary)))
