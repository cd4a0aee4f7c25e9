"""Pretraining on clips streamed from the shards, on Ray Train's TorchTrainer.

The driver plans the run (steps, each worker's slice of the data order) and hands every worker
its own Ray Dataset of decoded clips (``train_<rank>``, decoded on CPU tasks and kept in order)
and the validation clips (``val``). Workers run DDP, or with ``parallel: fsdp`` FSDP2 (the
parameters, gradients and optimizer state sharded across them), with gradient accumulation,
bf16 autocast on GPUs, and every ``checkpoint_every`` steps and at every epoch's end report a
checkpoint holding the model, optimizer (full, unsharded tensors keyed by parameter name, the
same in both modes, so a run may resume under the other), scheduler, step, data position and
the metrics so far, to ``OUT/ray`` (any fsspec URL). Rerunning the same command resumes: Ray Train
restores the last checkpoint, and each worker's stream starts at the row it had reached
(``progress.json`` names the last two checkpointed steps, and the driver starts the streams at
the earlier one: Ray Train records a checkpoint a moment after the worker writes progress.json,
so a driver killed in between restores the earlier; a worker that restored the later skips the
rows between).

Outputs under OUT: ``ray/`` (Ray Train's run and checkpoints), ``metrics.jsonl`` (one line per
step: loss, clips/s, data-wait fraction, learning rate), ``encoder.pt`` and ``encoder.json``
(the trained encoder, a feature model as ``pretrained:OUT``), ``result.json`` (cross-view
retrieval on the val split, before and after training, against chance).
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import numpy as np

from engine import storage
from engine.features import models
from engine.pretrain import data
from engine.pretrain.objectives import objective
from engine.train.loop import fit_recovering, prompt_reports, ray_storage, restored_state

PROGRESS = "progress.json"


def _torch_modules():
    """The network: the feature model's encoder plus the objective's heads, taking uint8 clips."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, encoder: nn.Module, heads: nn.Module, goal, spec: models.ModelSpec):
            super().__init__()
            self.encoder, self.heads, self.goal, self.video = encoder, heads, goal, spec.kind == "video"
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1, 1), persistent=False)

        def encode(self, clips: torch.Tensor) -> torch.Tensor:
            """Features of uint8 clips [B, T, H, W, 3]."""
            x = clips.permute(0, 4, 1, 2, 3).float().div_(255).sub_(self.mean).div_(self.std)   # [B, 3, T, H, W]
            return self.encoder(x if self.video else x[:, :, 0]).flatten(1)

        def forward(self, ego: torch.Tensor, exo: torch.Tensor | None = None, *,
                    is_ego: torch.Tensor | None = None) -> torch.Tensor:
            """The loss of a batch of moments (``ego[i]`` and ``exo[i]`` show the same one); or,
            as ``net(clips, is_ego=mask)``, the clips' unit embeddings, each through its view's
            head. Both go through forward: FSDP gathers the root's parameters (the heads) there."""
            if is_ego is not None:
                features = self.encode(ego)
                return torch.where(is_ego[:, None], self.goal.embed(self.heads, features, True),
                                   self.goal.embed(self.heads, features, False))
            features = self.encode(torch.cat([ego, exo]))    # one encoder pass for both views
            return self.goal.loss(self.heads, features[:len(ego)], features[len(ego):])

    return Net


def build_net(config, spec: models.ModelSpec):
    """The network, its encoder's feature size; the heads drawn from ``config.seed``."""
    import torch

    torch.manual_seed(config.seed)        # a user's factory initializes from torch's generator
    encoder = models.build(spec)
    with torch.no_grad():
        probe = torch.zeros(2, config.clip_frames, config.size, config.size, 3, dtype=torch.uint8)
        x = probe.permute(0, 4, 1, 2, 3).float()
        dim = encoder(x if spec.kind == "video" else x[:, :, 0]).flatten(1).shape[1]
    goal = objective(config.objective)
    return _torch_modules()(encoder.train(), goal.heads(dim), goal, spec), dim


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ----------------------------------------------------------------------------- evaluation

def embed(net, batches, device) -> dict[str, np.ndarray]:
    """Projected embeddings of evaluation rows: {"z", "sample", "is_ego"}."""
    import torch

    net.eval()
    zs, samples, is_ego = [], [], []
    with torch.no_grad():
        for batch in batches:
            ego = batch["is_ego"].bool()
            z = net(batch["clip"].to(device), is_ego=ego.to(device))
            zs.append(z.float().cpu().numpy())
            samples.append(batch["sample"].numpy())
            is_ego.append(ego.numpy())
    net.train()
    return {"z": np.concatenate(zs), "sample": np.concatenate(samples), "is_ego": np.concatenate(is_ego)}


def retrieval(embedded: dict[str, np.ndarray], takes: list[str]) -> dict[str, float]:
    """Ego clip queries against every exo clip of the split (all cameras, all takes): a hit at k
    when one of the k nearest exo clips shows the query's moment. Chance: the expected hit rate
    of a random ranking, from each query's count of positives. ``same_take``: the gallery
    restricted to the query's own take (telling moments apart, not takes)."""
    z, sample, ego = embedded["z"], embedded["sample"], embedded["is_ego"].astype(bool)
    q, qs = z[ego], sample[ego]
    g, gs = z[~ego], sample[~ego]
    if not len(q) or not len(g):
        return {}
    take_of = np.asarray(takes)
    scores = q @ g.T
    out = {}
    for name, allowed in (("", np.ones_like(scores, bool)), ("_same_take", take_of[qs][:, None] == take_of[gs][None])):
        ranked = np.argsort(-np.where(allowed, scores, -np.inf), axis=1, kind="stable")
        for k in (1, 5):
            hits, chance = [], []
            for i in range(len(q)):
                size, positives = int(allowed[i].sum()), int((gs[allowed[i]] == qs[i]).sum())
                if size <= positives:       # nothing to tell apart (a take with one moment)
                    continue
                hits.append(bool((gs[ranked[i, :min(k, size)]] == qs[i]).any()))
                chance.append(1 - math.comb(size - positives, min(k, size)) / math.comb(size, min(k, size)))
            if hits:
                out[f"top{k}{name}"] = float(np.mean(hits))
                out[f"chance_top{k}{name}"] = float(np.mean(chance))
    out["queries"], out["gallery"] = int(len(q)), int(len(g))
    return out


# ----------------------------------------------------------------------------- the worker

def shard(net, mesh) -> None:
    """FSDP2 over ``mesh``. Every parameter-holding member of an nn.Sequential or nn.ModuleList
    inside the encoder (a transformer's blocks, a ResNet stage's blocks, tiny_video's layers) is
    a unit of its own, gathered only around its forward, so one block at a time is whole; the
    root unit holds the rest (heads, stem, norms). Such members must be called through forward.
    0-d parameters (the contrastive temperature), which fully_shard refuses, stay whole on every
    rank: the loop averages their gradients itself."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in net.parameters() if p.dim() == 0}
    blocks = {id(child) for m in net.encoder.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))
              for child in m.children() if next(child.parameters(), None) is not None}
    for m in reversed(list(net.encoder.modules())):      # innermost first, as fully_shard requires
        if id(m) in blocks:
            fully_shard(m, mesh=mesh, ignored_params=scalars)
    fully_shard(net, mesh=mesh, ignored_params=scalars)


def param_groups(net) -> list[dict]:
    """The optimizer's groups: 0-d parameters apart, so that under FSDP a foreach step never
    mixes its DTensors with plain tensors; the same in both modes, and so are checkpoints."""
    groups = [[p for p in net.parameters() if p.dim()], [p for p in net.parameters() if not p.dim()]]
    return [{"params": g} for g in groups if g]


def train_loop(cfg: dict) -> None:
    """The per-worker function (plain torch plus ray.train calls)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    config, plan = cfg["config"], cfg["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    device = ray.train.torch.get_device()
    net, _ = build_net(config, cfg["spec"])
    fsdp = config.parallel == "fsdp"
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        net.to(device)                        # first: the mesh then keeps Ray Train's device
        shard(net, init_device_mesh(device.type, (world,)))
        model = net                            # fully_shard turned net itself into the FSDP module
    else:
        model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(param_groups(net), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, plan["steps"], plan["warmup"]))
    state = {"step": 0, "rows": 0, "history": [], "resumed_from": [], "before": None, "after": None}
    saved = restored_state(cfg["recovered"], cfg["storage_options"])
    if saved:
        # Full tensors keyed by name, whichever mode wrote them; every rank reads the file and
        # keeps its own part (set_state_dict's broadcast_from_rank0 hangs when the other ranks
        # pass empty dicts, torch 2.13).
        set_state_dict(net, optimizer, model_state_dict=saved.pop("model"), optim_state_dict=saved.pop("optimizer"),
                       options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(saved.pop("scheduler"))
        state = saved
        state["resumed_from"].append(state["step"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if plan["bf16"] and device.type == "cuda"
                else torch.autocast("cpu", dtype=torch.bfloat16) if plan["bf16"] else contextlib.nullcontext())

    # DDP: rank 0 evaluates alone, on net (no collectives). FSDP: every rank runs the same
    # batches (each block's gathering is collective); rank 0 keeps the result.
    evaluates = cfg["evaluate"] and (fsdp or rank == 0)

    def evaluate() -> dict | None:
        with autocast:
            rows = embed(net, ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=32), device)
        return retrieval(rows, cfg["val_takes"]) if rank == 0 else None

    if evaluates and state["before"] is None:
        state["before"] = evaluate()      # the random-init encoder, for the report

    micro, accumulate = plan["micro_batch"], config.accumulate
    step_rows = micro * accumulate
    # This worker's stream starts at the earlier of the last two checkpointed steps; Ray Train
    # restored that one or the later one: skip to it.
    skip = state["step"] - plan["start_step"]
    if skip < 0:
        raise RuntimeError(f"{PROGRESS} says step {plan['start_step']} was checkpointed, but the checkpoint "
                           f"Ray Train restored is at step {state['step']}")
    checkpointed = state["step"]
    batches = iter(ray.train.get_dataset_shard(f"train_{rank}").iter_torch_batches(
        batch_size=micro, prefetch_batches=config.prefetch_batches, drop_last=True))
    for _ in range(skip * accumulate):
        next(batches)
    ddp = world > 1 and not fsdp
    while state["step"] < plan["steps"]:
        started, waited, loss_sum = time.perf_counter(), 0.0, 0.0
        optimizer.zero_grad(set_to_none=True)
        for part in range(accumulate):
            t = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t
            sync = part == accumulate - 1          # gradients cross workers on the last part only
            if fsdp:
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or not ddp else model.no_sync():
                with autocast:
                    loss = model(batch["ego"].to(device), batch["exo"].to(device)) / accumulate
                loss.backward()
            loss_sum += loss.detach()
        if fsdp and world > 1:
            for p in net.parameters():
                if not p.dim() and p.grad is not None:     # outside FSDP (see shard): averaged here
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world
        loss_value = float(loss_sum)       # waits for the step's device work, so the timing is whole
        seconds = time.perf_counter() - started
        state["step"] += 1
        state["rows"] += step_rows
        epoch = state["rows"] / plan["rows_per_epoch"]
        state["history"].append({"step": state["step"], "epoch": round(epoch, 4), "loss": loss_value,
                                 "clips_per_s": step_rows * world / seconds, "data_wait": waited / seconds,
                                 "lr": lr, "seconds": seconds})
        last = state["step"] == plan["steps"]
        epoch_end = int(epoch) > int((state["rows"] - step_rows) / plan["rows_per_epoch"])
        if not (last or epoch_end or state["step"] % config.checkpoint_every == 0):
            continue
        if last and evaluates:
            state["after"] = evaluate()
        # Collective under FSDP (the shards gathered); rank 0 gets full tensors on CPU, the
        # other ranks empty dicts. The same names and tensors under DDP.
        weights, optimizer_state = get_state_dict(net, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save(dict(state, model=weights, optimizer=optimizer_state,
                                scheduler=scheduler.state_dict()), os.path.join(d, "state.pt"))
            ray.train.report({"step": state["step"], "loss": loss_value},
                             checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        if rank == 0:
            fs, out = storage.filesystem(cfg["out"], cfg["storage_options"])
            storage.write_json_atomic(fs, storage.join(out, PROGRESS), {"step": state["step"], "previous": checkpointed})
        checkpointed = state["step"]


# ----------------------------------------------------------------------------- the driver

def plan_run(config, train_samples: int) -> dict:
    """Batches per worker, steps and warm-up, from the settings and the split's size."""
    per_worker, rest = divmod(config.batch_size, config.workers)
    micro, rest2 = divmod(per_worker, config.accumulate)
    if rest or rest2 or micro < 2:
        raise ValueError(f"batch_size {config.batch_size} must split evenly over {config.workers} worker(s) and "
                         f"{config.accumulate} accumulation step(s), at least 2 clips per part")
    rows_per_epoch = data.rows_per_epoch(train_samples, config.workers)
    steps = config.steps or config.epochs * math.ceil(rows_per_epoch / per_worker)
    return {"micro_batch": micro, "rows_per_epoch": rows_per_epoch, "steps": steps,
            "warmup": max(1, round(steps * config.warmup)), "bf16": config.precision == "bf16"}


def pretrain(shards_url: str, out: str, config, address: str | None = None, progress: bool = True,
             storage_options: dict | None = None) -> dict:
    """Pretrain, write the encoder, metrics and result; return the result."""
    import ray
    import torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log = print if progress else (lambda *a, **k: None)
    spec = config.model_spec()
    train_index = data.sample_index(shards_url, config.train_split, storage_options)
    val_index = data.sample_index(shards_url, config.eval_split, storage_options) if config.evaluate else []
    if not train_index:
        raise ValueError(f"{shards_url}: no {config.train_split} samples to pretrain on")
    plan = plan_run(config, len(train_index))
    fs, out_path = storage.filesystem(out, storage_options)
    progress_path = storage.join(out_path, PROGRESS)
    # The earlier of the last two checkpoints: the one Ray Train restores may lag progress.json
    # (whose "previous" older runs did not write).
    saved = storage.read_json(fs, progress_path) if fs.exists(progress_path) else {"step": 0}
    plan["start_step"] = min(saved.get("previous", saved["step"]), plan["steps"])
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if config.precision == "auto":
        plan["bf16"] = use_gpu
    clip = config.clip_spec()
    step_rows = plan["micro_batch"] * config.accumulate
    rows = (plan["steps"] - plan["start_step"]) * step_rows
    datasets = {f"train_{rank}": data.train_stream(train_index, clip, workers=config.workers, rank=rank,
                                                   seed=config.seed, start=plan["start_step"] * step_rows, rows=rows,
                                                   storage_options=storage_options)
                for rank in range(config.workers)}
    if val_index:
        datasets["val"] = data.eval_stream(val_index, config.clip_spec(crop="centre"), storage_options)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True        # each worker's rows in their planned order
    log(f"pretrain: {len(train_index)} train and {len(val_index)} val samples, {plan['steps']} steps of "
        f"{config.batch_size} clips on {config.workers} worker(s), from step {plan['start_step']}")
    prompt_reports()
    result = fit_recovering(lambda recovered: TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "plan": plan, "spec": spec, "out": out, "storage_options": storage_options,
                           "recovered": recovered,
                           "evaluate": bool(val_index),
                           "val_takes": [ref.take_uid for ref in val_index]},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **({"GPU": config.gpus_per_worker} if use_gpu else {})}),
        run_config=RunConfig(**ray_storage(out, storage_options),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=[], execution_options=options)),
        out, storage_options, log)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")
    return _write_outputs(fs, out_path, out, config, spec, plan, state, len(train_index), len(val_index), log)


def _write_outputs(fs, out_path, out, config, spec, plan, state, train_samples, val_samples, log) -> dict:
    import io
    import json

    import torch

    net, dim = build_net(config, spec)
    net.load_state_dict(state["model"])
    buf = io.BytesIO()
    torch.save(net.encoder.state_dict(), buf)
    storage.write_bytes_atomic(fs, storage.join(out_path, models.PRETRAINED_WEIGHTS), buf.getvalue())
    storage.write_json_atomic(fs, storage.join(out_path, models.PRETRAINED_SPEC), {
        "model": models.architecture_name(spec.name), "initial_weights": spec.weights, "kind": spec.kind,
        "frames": config.clip_frames, "size": config.size, "dim": dim, "mean": list(spec.mean), "std": list(spec.std),
        "objective": config.objective, "steps": state["step"]})
    storage.write_bytes_atomic(fs, storage.join(out_path, "metrics.jsonl"),
                               "".join(json.dumps(row) + "\n" for row in state["history"]).encode())
    history = state["history"]
    result = {"objective": config.objective, "model": spec.name, "steps": state["step"],
              "planned_steps": plan["steps"], "epochs": history[-1]["epoch"] if history else 0,
              "resumed_from": state["resumed_from"], "workers": config.workers, "train_samples": train_samples,
              "val_samples": val_samples,
              "retrieval": state["after"], "retrieval_random_init": state["before"],
              "final_loss": history[-1]["loss"] if history else None,
              "clips_per_s_median": float(np.median([h["clips_per_s"] for h in history])) if history else None,
              "data_wait_median": float(np.median([h["data_wait"] for h in history])) if history else None,
              "feature_model": f"pretrained:{out}"}
    storage.write_json_atomic(fs, storage.join(out_path, "result.json"), result)
    top1 = (state["after"] or {}).get("top1")
    log(f"pretrain: {state['step']} steps, final loss {result['final_loss']:.4f}"
        + (f", val ego->exo top-1 {top1:.3f} (chance {state['after']['chance_top1']:.3f})" if top1 is not None else ""))
    return result
