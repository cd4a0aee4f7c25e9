"""A stage kind and a benchmark from outside the engine, as a user would add them: this module
plus its name in ``EE4D_PLUGINS``. Nothing in ``engine/`` knows of either.

- ``sample_count``: counts a shard stage's samples per split (or per take) from its manifest;
  its own spec section, flags, fingerprint, report section and ``ee4d sample-count`` command.
- ``scenario_recognition``: the scenario of a take from its pooled ego features, with one
  option of its own (``pooling``), the official-style submission/evaluate round trip.
"""
from __future__ import annotations

import dataclasses
import html
import io

import numpy as np

from engine import params as P
from engine import stage as stages
from engine import storage
from engine.tasks import Examples, Task, TrainConfig, register
from engine.tasks.metrics import majority_class, top1_accuracy


@dataclasses.dataclass(frozen=True)
class CountParams(P.Params):
    by: str = P.setting("split", "what to count samples by", choices=("split", "take_uid"))
    verbose: bool = P.setting(False, "print each count", fingerprint=False)


def count(params: CountParams, inputs: dict, out: str, ctx: stages.Context) -> dict:
    import pyarrow.parquet as pq

    fs, shards = storage.filesystem(inputs["shard"])
    with fs.open(storage.join(shards, "manifest.parquet"), "rb") as f:
        column = pq.read_table(io.BytesIO(f.read()), columns=[params.by]).column(params.by).to_pylist()
    counts = {k: column.count(k) for k in sorted(set(column))}
    out_fs, path = storage.filesystem(out)
    storage.write_json_atomic(out_fs, storage.join(path, "counts.json"), counts)
    if params.verbose:
        ctx.log(counts)
    return {"groups": len(counts), "samples": sum(counts.values())}


def report(records: list[dict], ctx: stages.Context) -> str:
    rows = []
    for r in records:
        fs, path = storage.filesystem(r["output"])
        counts = storage.read_json(fs, storage.join(path, "counts.json"))
        rows += [f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in counts.items()]
    return "<h2>Sample counts</h2><table>" + "".join(rows) + "</table>"


stages.register(stages.StageKind(
    name="sample_count", params=CountParams, run=count, inputs=("shard",), report=report,
    help="samples per split or take", command=stages.Command(
        "sample-count", "count a shard stage's samples",
        summary=lambda record: f"{record['result']['samples']} samples in {record['result']['groups']} groups")))


def scenarios(release) -> list[str]:
    return sorted({t.scenario for t in release.takes() if t.scenario})


@register
class ScenarioRecognition(Task):
    name = "scenario_recognition"
    metric = "top1"

    @dataclasses.dataclass(frozen=True)
    class Options(TrainConfig):
        pooling: str = P.setting("mean", "how a take's feature windows are pooled", choices=("mean", "max"))

    def outputs(self, release) -> int:
        return len(scenarios(release))

    def examples(self, release, features, split: str, train: bool) -> Examples:
        classes = scenarios(release)
        scenario_of = {t.take_uid: t.scenario for t in release.takes()}
        xs, ys, meta = [], [], []
        for uid in release.splits().split_to_take_uids.get(split, []):
            ego, _ = features.views(uid)
            if ego is None or scenario_of.get(uid) not in classes:
                continue
            vectors = features.load(ego)[2]
            xs.append(vectors.mean(axis=0) if self.options.pooling == "mean" else vectors.max(axis=0))
            ys.append(classes.index(scenario_of[uid]))
            meta.append({"take_uid": uid})
        return Examples(np.asarray(xs, np.float32).reshape(-1, features.dim), np.asarray(ys, np.int64), meta)

    def truth(self, release, split: str) -> dict:
        classes, uids = scenarios(release), set(release.splits().split_to_take_uids.get(split, []))
        return {t.take_uid: classes.index(t.scenario) for t in release.takes() if t.take_uid in uids and t.scenario}

    def submission(self, logits: np.ndarray, examples: Examples, split: str) -> dict:
        return {"split": split, "takes": {m["take_uid"]: int(np.argmax(row)) for m, row in zip(examples.meta, logits)}}

    def evaluate(self, submission: dict, truth: dict, lenient: bool = False) -> dict:
        predicted = submission.get("takes", {})
        keys = sorted(truth)
        return {"top1": top1_accuracy([predicted.get(k, -1) for k in keys], [truth[k] for k in keys]),
                "takes": len(keys), "ignored": sum(k not in truth for k in predicted)}

    def baselines(self, train: Examples, evaluated: Examples, truth: dict, split: str) -> dict:
        majority = majority_class(train.y.tolist())
        return {"majority": top1_accuracy([majority] * len(truth), list(truth.values()))}
