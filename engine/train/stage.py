"""The benchmark stage: one per registered benchmark (``engine.tasks``), trained and evaluated on
features with the Ray Train loop; its section of the report is the metrics table and the
training curves. ``ee4d train TASK FEATURES OUT`` runs one on its own.
"""
from __future__ import annotations

import html
import json

from engine import stage as stages
from engine import storage
from engine.tasks import TASKS, Task, TrainConfig


def _run(options: TrainConfig, inputs: dict, out: str, ctx: stages.Context) -> dict:
    from engine.train.loop import run as train

    task = TASKS[ctx.stage.split("/", 1)[1]](options)
    result = train(task, inputs["features"], out, options, release_url=inputs.get("release"), address=ctx.address,
                   progress=ctx.progress)
    return {"metric": result["metric"], "value": round(result["val"][result["metric"]], 6),
            "train_examples": result["train_examples"], "val_examples": result["val_examples"],
            "best_epoch": result["best_epoch"]}


def _summary(record: dict) -> str:
    result = record["result"]
    return f"result: {record['output']}/result.json (val {result['metric']} {result['value']:.4f})"


def _resources(options: TrainConfig) -> str:
    gpu = {True: ", 1 GPU each", False: "", None: " (GPUs when the cluster has them)"}[options.use_gpu]
    return f"Ray Train: {options.workers} worker(s) x {options.cpus_per_worker:g} CPU{gpu}"


# ----------------------------------------------------------------------------- report

def _result(record: dict) -> dict:
    out = {"task": record["stage"].split("/", 1)[1], "record": record}
    if record["status"] in ("failed", "blocked"):
        return {**out, "error": record.get("error")}
    fs, path = storage.filesystem(record["output"])
    res = storage.read_json(fs, storage.join(path, "result.json"))
    with fs.open(storage.join(path, "metrics.jsonl"), "rb") as f:
        history = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    submissions = [n for n in ("submission_val.json", "submission_test.json", "official_submission_val.json",
                               "official_ground_truth_val.json", "official_submission_test.json")
                   if fs.exists(storage.join(path, n))]
    return {**out, "metric": res["metric"], "value": res["val"][res["metric"]], "val": res["val"],
            "baselines": res["baselines"], "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
            "val_examples": res["val_examples"], "train_examples": res["train_examples"], "history": history,
            "files": submissions + ["result.json", "model.pt", "metrics.jsonl"]}


def _report(records: list[dict], ctx: stages.Context) -> str:
    tasks = [_result(r) for r in records]
    return _metrics_section(tasks, ctx.run_out) + _curves_section(tasks) + _showcase_section(tasks, ctx.urls.get("release"))


def _metrics_section(tasks: list[dict], out: str) -> str:
    from engine.graph.report import fmt, link

    rows = ["<tr><th>benchmark</th><th>metric (val)</th><th>value</th><th>baselines</th><th>other metrics</th>"
            "<th>best epoch / run</th><th>train / val examples</th><th>files</th></tr>"]
    for t in tasks:
        if "error" in t:
            rows.append(f"<tr><td>{t['task']}</td><td colspan='7' class='bad'>{html.escape(str(t['error']))}</td></tr>")
            continue
        base = "<br>".join(f"{k} {v:.4f}" for k, v in t["baselines"].items())
        other = "<br>".join(f"{k} {fmt(v)}" for k, v in t["val"].items() if k != t["metric"])
        files = " ".join(link(storage.join(t["record"]["output"], n), out, n) for n in t["files"])
        task = TASKS.get(t["task"])
        better = "" if task is None else f" ({'higher' if task.maximize else 'lower'} is better)"
        rows.append(f"<tr><td>{t['task']}</td><td>{t['metric']}{better}</td><td><b>{t['value']:.4f}</b></td><td>{base}</td>"
                    f"<td>{other}</td><td>{t['best_epoch']} / {t['epochs_run']}</td>"
                    f"<td>{t['train_examples']} / {t['val_examples']}</td><td>{files}</td></tr>")
    return "<h2>Benchmarks</h2><table>" + "".join(rows) + "</table>"


def _curves_section(tasks: list[dict]) -> str:
    import matplotlib.pyplot as plt

    from engine.graph.report import png

    done = [t for t in tasks if t.get("history")]
    if not done:
        return ""
    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 3.2), squeeze=False)
    for ax, t in zip(axes[0], done):
        epochs = [row["epoch"] for row in t["history"]]
        ax.plot(epochs, [row["loss"] for row in t["history"]], color="tab:blue", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss", color="tab:blue")
        ax.set_title(t["task"], fontsize=10)
        ax2 = ax.twinx()
        ax2.plot(epochs, [row.get(t["metric"]) for row in t["history"]], color="tab:orange", label=t["metric"])
        ax2.set_ylabel(f"val {t['metric']}", color="tab:orange")
        ax2.axvline(t["best_epoch"], color="gray", linestyle=":", linewidth=1)
    fig.tight_layout()
    return "<h2>Training curves</h2>" + png(fig) + _tradeoff_section(done)


def _tradeoff_section(tasks: list[dict]) -> str:
    """Benchmarks with operating points (online keystep: mcAP against power) get a plot each."""
    import matplotlib.pyplot as plt

    from engine.graph.report import png

    out = ""
    for t in tasks:
        task = TASKS.get(t["task"])
        curve = task().tradeoff(t["val"]) if task else None
        if not curve:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for name, (x, y) in curve["points"].items():
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        for name, x in curve["limits"].items():
            ax.axvline(x, color="gray", linestyle=":", linewidth=1)
            ax.annotate(name, (x, 0), fontsize=8, color="gray", xycoords=("data", "axes fraction"))
        ax.set_xscale("log")
        ax.set_xlabel(curve["x"])
        ax.set_ylabel(curve["y"])
        ax.set_title(t["task"], fontsize=10)
        fig.tight_layout()
        out += f"<h3>{t['task']}: {curve['y']} against {curve['x']}</h3>" + png(fig)
    return out


def _showcase_section(tasks: list[dict], release_url: str | None) -> str:
    """Benchmarks that predict images (correspondence: masks) show one val prediction beside its truth."""
    from engine.graph.report import png
    from engine.release import Release

    out = ""
    for t in tasks:
        task = TASKS.get(t["task"])
        if task is None or task.showcase is Task.showcase or "submission_val.json" not in t.get("files", []) \
                or not release_url:
            continue
        fs, path = storage.filesystem(t["record"]["output"])
        shown = task().showcase(storage.read_json(fs, storage.join(path, "submission_val.json")), Release.open(release_url))
        if shown:
            figure, caption = shown
            out += f"<h3>{t['task']}: one val prediction</h3>" + png(figure) + f"<p>{html.escape(caption)}</p>"
    return out


KIND = stages.register(stages.StageKind(
    name="task", section="tasks", folder="tasks", params=TrainConfig, run=_run, inputs=("features",),
    optional_inputs=("release",), needs_ray=True, variants=lambda: {n: t.Options for n, t in TASKS.items()},
    help="train and evaluate a benchmark on features (Ray Train)", resources=_resources, report=_report,
    command=stages.Command("train", "train and evaluate a benchmark on features (Ray Train)", summary=_summary)))
