"""The pretraining stage: an encoder trained on clips streamed from the shards (Ray Data into Ray
Train), evaluated by cross-view retrieval, and left as a feature model (``pretrained:OUT``).
``ee4d pretrain SHARDS OUT`` runs it on its own; in a graph it is the ``pretrain`` section.
"""
from __future__ import annotations

import dataclasses
import html
import json

from engine import params as P
from engine import stage as stages
from engine import storage

PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class PretrainConfig(P.Params):
    objective: str = P.setting("ego_exo_contrastive", "training objective (engine.pretrain.objectives)")
    model: str = P.setting("tiny_video", "encoder: a trainable feature model name (tiny_video, torchvision:NAME, "
                                         "timm:NAME, package.module:factory, pretrained:RUN)")
    weights: str | None = P.setting(None, "initial weights of the encoder (a state_dict; path or URL)")
    weights_sha256: str | None = P.setting(None, "expected sha256 of the weights")
    views: tuple[str, ...] | None = P.setting(None, "exo cameras an ego clip is paired with (default: all)")
    clip_frames: int = P.setting(8, "frames per clip")
    frame_stride: int = P.setting(4, "source frames between a clip's frames")
    size: int = P.setting(64, "clip frames are size x size")
    epochs: int = P.setting(2, "passes over the train split (when steps is not given)")
    steps: int | None = P.setting(None, "optimizer steps (default: from epochs)")
    batch_size: int = P.setting(32, "global batch of moments per step, split across workers")
    accumulate: int = P.setting(1, "micro-batches per step (gradient accumulation)")
    lr: float = P.setting(1e-3, "peak learning rate (AdamW, linear warm-up then cosine decay)")
    warmup: float = P.setting(0.05, "share of the steps spent warming up")
    weight_decay: float = P.setting(0.05, "AdamW weight decay")
    precision: str = P.setting("auto", "bf16 autocast, fp32, or auto (bf16 on GPUs)", choices=PRECISIONS)
    seed: int = P.setting(0, "random seed (data order, crops, initialisation)")
    train_split: str = P.setting("train", "split to train on")
    eval_split: str = P.setting("val", "split for the cross-view retrieval evaluation")
    evaluate: bool = P.setting(True, "evaluate retrieval before and after training")
    workers: int = P.setting(1, "Ray Train workers (data order and batches depend on it)")
    parallel: str = P.setting("ddp", "how workers share the model: ddp (a full copy each) or fsdp (parameters, "
                                     "gradients and optimizer state sharded across workers, for encoders that do "
                                     "not fit one device)", choices=("ddp", "fsdp"),
                              fingerprint=False)
    cpus_per_worker: float = P.setting(1.0, "CPUs per worker, also torch's thread count", fingerprint=False)
    use_gpu: bool | None = P.setting(None, "train on GPUs (default: when the cluster has them)", fingerprint=False)
    gpus_per_worker: float = P.setting(1.0, "GPUs per worker when training on GPUs", fingerprint=False)
    prefetch_batches: int = P.setting(2, "batches each worker's loader keeps ready", fingerprint=False)
    checkpoint_every: int = P.setting(50, "steps between checkpoints (epoch ends and the last step get one too)",
                                      fingerprint=False)
    max_failures: int = P.setting(2, "worker failures Ray Train recovers from, from the last checkpoint",
                                  fingerprint=False)

    def model_spec(self):
        """The encoder's spec, checked: a model must be trainable (not a TorchScript or export file)."""
        from engine.features import models

        if self.model.startswith(("torchscript:", "export:")):
            raise models.ModelError(f"{self.model}: a compiled model cannot be trained; name an architecture")
        return models.resolve(self.model, self.weights, frames=self.clip_frames, size=self.size,
                              sha256=self.weights_sha256)

    def clip_spec(self, crop: str = "random"):
        from engine.pretrain.data import ClipSpec
        return ClipSpec(self.clip_frames, self.frame_stride, self.size, crop, self.views)


def _check(config: PretrainConfig) -> None:
    from engine.pretrain.objectives import objective
    objective(config.objective)
    config.model_spec()


def run(shards_url: str, out: str, config: PretrainConfig, storage_options: dict | None = None,
        address: str | None = None, progress: bool = True) -> dict:
    """Run the pretraining stage on its own (Ray, local by default); return its result."""
    return stages.run_one("pretrain", config, {"shard": shards_url}, out, storage_options=storage_options,
                          address=address, progress=progress)["result"]


def _run(config: PretrainConfig, inputs: dict, out: str, ctx: stages.Context) -> dict:
    from engine.pretrain.loop import pretrain
    return pretrain(inputs["shard"], out, config, address=ctx.address, progress=ctx.progress,
                    storage_options=ctx.storage_options)


def _summary(record: dict) -> str:
    r = record["result"]
    after = r["retrieval"] or {}
    top1 = f", val top-1 {after['top1']:.3f} (chance {after['chance_top1']:.3f})" if "top1" in after else ""
    return f"{r['steps']} steps, final loss {r['final_loss']:.4f}{top1}; feature model {r['feature_model']}"


def _resources(config: PretrainConfig) -> str:
    gpu = {True: f", {config.gpus_per_worker:g} GPU each", False: "", None: " (GPUs when the cluster has them)"}
    fsdp = ", the model sharded across them (FSDP)" if config.parallel == "fsdp" else ""
    return (f"Ray Train: {config.workers} worker(s) x {config.cpus_per_worker:g} CPU{gpu[config.use_gpu]}{fsdp}; "
            "Ray Data decodes clips on the other CPUs")


def _report(records: list[dict], ctx: stages.Context) -> str:
    import matplotlib.pyplot as plt

    from engine.graph.report import fmt, link, png

    rows = ["<tr><th>stage</th><th>steps</th><th>final loss</th><th>ego&rarr;exo top-1 / top-5 (val)</th>"
            "<th>chance</th><th>random init</th><th>same take top-1 (chance)</th><th>clips/s, data wait "
            "(medians)</th><th>files</th></tr>"]
    runs = []
    for record in records:
        if record["status"] in ("failed", "blocked"):
            rows.append(f"<tr><td>{record['stage']}</td><td colspan='8' class='bad'>"
                        f"{html.escape(str(record.get('error')))}</td></tr>")
            continue
        fs, path = storage.filesystem(record["output"], ctx.storage_options)
        res = storage.read_json(fs, storage.join(path, "result.json"))
        with fs.open(storage.join(path, "metrics.jsonl"), "rb") as f:
            history = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        runs.append((record["stage"], history))
        after, before = res["retrieval"] or {}, res["retrieval_random_init"] or {}
        files = " ".join(link(storage.join(record["output"], n), ctx.run_out, n)
                         for n in ("result.json", "metrics.jsonl", "encoder.pt", "encoder.json"))
        rows.append(
            f"<tr><td>{record['stage']}</td><td>{res['steps']}</td><td>{fmt(res['final_loss'])}</td>"
            f"<td><b>{fmt(after.get('top1'))}</b> / {fmt(after.get('top5'))}</td>"
            f"<td>{fmt(after.get('chance_top1'))} / {fmt(after.get('chance_top5'))}</td>"
            f"<td>{fmt(before.get('top1'))} / {fmt(before.get('top5'))}</td>"
            f"<td>{fmt(after.get('top1_same_take'))} ({fmt(after.get('chance_top1_same_take'))})</td>"
            f"<td>{fmt(res['clips_per_s_median'])}, {fmt(res['data_wait_median'])}</td><td>{files}</td></tr>")
    section = "<h2>Pretraining</h2><table>" + "".join(rows) + "</table>"
    if not runs:
        return section
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, history in runs:
        steps = [h["step"] for h in history]
        axes[0].plot(steps, [h["loss"] for h in history], label=name)
        axes[1].plot(steps, [h["clips_per_s"] for h in history], label=f"{name} clips/s")
        axes[1].plot(steps, [100 * h["data_wait"] for h in history], linestyle=":", label=f"{name} % waiting for data")
    axes[0].set(xlabel="step", ylabel="train loss")
    axes[1].set(xlabel="step", ylabel="clips/s, % of step time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return section + png(fig)


KIND = stages.register(stages.StageKind(
    # Version 2: checkpoints hold the optimizer keyed by parameter name (the same under DDP and FSDP).
    name="pretrain", params=PretrainConfig, run=_run, inputs=("shard",), needs_ray=True, check=_check, version=2,
    help="pretrain an encoder on clips streamed from the shards (Ray Data into Ray Train)",
    resources=_resources, report=_report,
    command=stages.Command("pretrain", "pretrain an encoder on clips streamed from the shards (Ray Train)",
                           summary=_summary)))
