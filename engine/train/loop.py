"""One training loop for every benchmark, on Ray Train's TorchTrainer.

Train examples travel as a Ray Dataset and reach each worker through ``get_dataset_shard``
(read once, then reshuffled in memory each epoch: they are small, pooled features, pose windows
or thumbnail frames, so a split must fit in a worker's memory); the global batch
is split across workers and DDP averages gradients, so one worker and two train the same model
up to data order. After every epoch each worker scores the validation split with the task's
official metric (same weights on every rank, so every rank takes the same early-stopping
decision) and reports; rank 0 attaches a checkpoint holding the model, the optimizer, the
history and the best weights so far. Rerunning the same command with the same OUT resumes from
the last checkpoint (Ray Train restores a run by its storage path and name).

Outputs under OUT: ``ray/`` (Ray Train's run and checkpoints), ``metrics.jsonl`` (one line per
epoch), ``model.pt`` (the best head's state_dict), ``submission_<split>.json`` for val and
test, ``result.json`` (metrics of the best epoch, baselines, history summary).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import posixpath
import tempfile
import time
import zipfile

import numpy as np

from engine import storage
from engine.tasks.base import Examples, Task, TrainConfig, example_scale

RAY_RUN = "run"     # Ray Train's run name: its checkpoints live in OUT/ray/run


def predict(model, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    import torch
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = [model(torch.from_numpy(x[i:i + batch]).to(device)).float().cpu().numpy()
               for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def train_epoch(model, optimizer, loss_fn, x, y, batch_size: int, seed: int) -> tuple[int, float]:
    """One pass over (x, y) in a seeded random order; returns (samples, summed loss).

    Dropout draws from torch's global generator, seeded here per epoch too, so a run resumed
    from a checkpoint continues exactly as the uninterrupted run would have."""
    import torch
    torch.manual_seed(seed)
    model.train()
    seen, loss_sum = 0, 0.0
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(x.device)
    starts = list(range(0, len(y), batch_size))
    if len(starts) > 1 and len(y) - starts[-1] == 1:
        starts.pop()        # a lone last example joins the batch before it: batch norm cannot train on one
    for start, end in zip(starts, starts[1:] + [len(y)]):
        idx = order[start:end]
        loss = loss_fn(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum = loss_sum + loss.detach() * len(idx)   # no per-step device sync
        seen += len(idx)
    return seen, float(loss_sum)


def train_loop(cfg: dict) -> None:
    """The per-worker function (plain torch plus ray.train calls)."""
    import ray.train
    import ray.train.torch
    import torch

    task: Task = cfg["task"]
    config: TrainConfig = cfg["config"]
    val: Examples = cfg["val"]
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    head = task.head(cfg["scale"], cfg["outputs"], config.hidden, config.dropout)
    model = ray.train.torch.prepare_model(head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = {"epoch": 0, "history": [], "best": None, "best_state": None, "bad_epochs": 0, "resumed_from": []}
    saved = restored_state(cfg["recovered"])
    if saved:
        head.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = saved
        state["resumed_from"].append(state["epoch"])
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    loss_fn = task.loss()
    x = y = None
    batch_size = max(1, config.batch_size // world)
    for epoch in range(state["epoch"], config.epochs):
        if x is None:
            # Examples are small (pooled features, pose windows, thumbnails): each worker reads its
            # shard once and reshuffles it in memory every epoch, instead of a dataset pass each.
            y_type = torch.float32 if cfg["regression"] else torch.int64
            parts = list(shard.iter_torch_batches(batch_size=8192, dtypes={"x": torch.float32, "y": y_type,
                                                                             "i": torch.int64}))
            # Blocks may arrive in any order: put the examples back in theirs, so a run
            # repeats exactly.
            order = torch.argsort(torch.cat([p["i"] for p in parts]))
            x = torch.cat([p["x"] for p in parts])[order].to(device)
            y = torch.cat([p["y"] for p in parts])[order].to(device)
        started = time.perf_counter()
        seen, loss_sum = train_epoch(model, optimizer, loss_fn, x, y, batch_size,
                                     seed=config.seed * 100_003 + epoch * 101 + rank)
        seconds = time.perf_counter() - started
        metrics = task.evaluate(task.submission(predict(head, val.x), val, "val"), cfg["truth"])
        value = metrics[task.metric]
        if state["best"] is None or (value > state["best"] if task.maximize else value < state["best"]):
            state.update(best=value, best_epoch=epoch, best_state=copy.deepcopy(head.state_dict()), bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        row = {"epoch": epoch, "loss": loss_sum / seen if seen else None, "samples": seen * world,
               "samples_per_s": seen * world / seconds if seconds else None, **metrics}
        state["history"].append(row)
        stop = state["bad_epochs"] >= config.patience or state["epoch"] >= config.epochs
        save = rank == 0 and (stop or state["epoch"] % config.checkpoint_every == 0)
        with tempfile.TemporaryDirectory() as d:
            if save:
                torch.save(dict(state, model=head.state_dict(), optimizer=optimizer.state_dict()),
                           os.path.join(d, "state.pt"))
            ray.train.report({"epoch": epoch, task.metric: value},
                             checkpoint=ray.train.Checkpoint.from_directory(d) if save else None)
        if stop:
            break


def fit(task: Task, train: Examples, val: Examples, truth: dict, outputs: int, out: str,
        config: TrainConfig, address: str | None = None, log=print) -> dict:
    """Train on Ray Train; return the final state (history, best weights, resume marks)."""
    import ray
    import ray.data
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = train.subset(train.labelled())
    if not len(train) or not len(val):
        raise ValueError(f"{task.name}: {len(train)} train and {len(val)} val examples; both are needed")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    prompt_reports()
    regression = train.y.dtype.kind == "f"
    dataset = ray.data.from_items([{"x": x, "y": y if regression else int(y), "i": i}
                                   for i, (x, y) in enumerate(zip(train.x, train.y))])
    result = fit_recovering(lambda recovered: TorchTrainer(
        train_loop,
        train_loop_config={"task": task, "config": config, "val": val, "truth": truth, "recovered": recovered,
                           "scale": example_scale(train), "outputs": outputs, "regression": regression},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(**ray_storage(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
        datasets={"train": dataset}), out, None, log)
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), weights_only=False)


def prompt_reports() -> None:
    """Ray Train's controller takes a worker's report when it polls it, every 2 s by default, and
    the worker's next report waits for that. Our trainers report every epoch (benchmarks: an
    epoch lasts milliseconds to seconds; 40 of keystep recognition took 97 s at 2 s, 16-20 s at
    0.1 s) or checkpoint (pretraining): poll every 0.1 s. Ray Train hands RAY_TRAIN_* variables
    from the driver to its controller; a value the user set stays."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def fit_recovering(make_trainer, out: str, storage_options: dict | None, log):
    """``make_trainer(recovered).fit()``, ``recovered`` as ``recover_killed_run`` finds it. A
    process of a killed run can outlive the kill for a moment and cut the checkpoint list again
    after that check; Ray Train's controller then dies refusing the list. Then, and only when the
    list is found cut (the file decides, not the error's text), check again and retry once."""
    import ray.exceptions

    for attempt in (1, 2):
        try:
            return make_trainer(recover_killed_run(out, storage_options, log)).fit()
        except ray.exceptions.ActorDiedError:
            if attempt == 2 or _cut_checkpoint_list(out, storage_options) is None:
                raise


def recover_killed_run(out: str, storage_options: dict | None = None, log=print) -> str | None:
    """Ray Train rewrites its list of checkpoints (``OUT/ray/run/checkpoint_manager_snapshot.json``)
    in place, and refuses to start from the empty or cut-off file a run killed mid-write leaves.
    Then drop that file and return the URL of the newest checkpoint folder whose ``state.pt`` is
    whole, for the workers to start from (see ``restored_state``); None when there is nothing
    to recover. Ray Train writes a checkpoint's folder before it lists it, and deletes old ones
    after, so the folders on disk hold the one it was listing. The other folders are removed:
    with the list gone, Ray Train would never delete them."""
    found = _cut_checkpoint_list(out, storage_options)
    if found is None:
        return None
    fs, snapshot = found
    run_dir = posixpath.dirname(snapshot)
    # Folder names are checkpoint_<date and time to the microsecond>: they sort in time order.
    folders = sorted((p for p in fs.ls(run_dir, detail=False)
                      if posixpath.basename(p).startswith("checkpoint_") and p != snapshot), reverse=True)
    newest = next((f for f in folders if _whole_torch_file(fs, storage.join(f, "state.pt"))), None)
    log(f"{storage.url(fs, snapshot)}: unreadable (the run was killed while Ray Train wrote it); "
        + (f"starting from {storage.url(fs, newest)}" if newest else "no whole checkpoint: starting afresh"))
    fs.rm(snapshot)
    for folder in folders:
        if folder != newest:
            fs.rm(folder, recursive=True)
    return storage.url(fs, newest) if newest else None


def _cut_checkpoint_list(out: str, storage_options: dict | None):
    """(fs, path) of Ray Train's checkpoint list under the run folder ``out`` when it is there
    but unreadable; None when it is whole or absent."""
    fs, path = storage.filesystem(out, storage_options)
    snapshot = storage.join(path, "ray", RAY_RUN, "checkpoint_manager_snapshot.json")
    if not fs.exists(snapshot):
        return None
    try:
        json.loads(fs.cat_file(snapshot))
        return None
    except ValueError:
        return fs, snapshot


def _whole_torch_file(fs, path: str) -> bool:
    # torch.save writes a zip, whose directory is at its end: a cut-off copy has none.
    try:
        with fs.open(path, "rb") as f:
            zipfile.ZipFile(f).close()
        return True
    except (OSError, zipfile.BadZipFile):
        return False


def restored_state(recovered: str | None, storage_options: dict | None = None) -> dict | None:
    """In a train loop: the state.pt of the checkpoint Ray Train restores, else of the folder
    ``recover_killed_run`` found, else None."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            return torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")
    if recovered:
        fs, path = storage.filesystem(recovered, storage_options)
        return torch.load(io.BytesIO(fs.cat_file(storage.join(path, "state.pt"))), weights_only=False,
                          map_location="cpu")
    return None


def ray_storage(out: str, storage_options: dict | None = None) -> dict:
    """RunConfig's name and checkpoint location under ``out`` (a path or an fsspec URL such as s3://)."""
    fs, path = storage.filesystem(out, storage_options)
    if storage.is_local(fs):
        return {"name": RAY_RUN, "storage_path": os.path.abspath(storage.join(path, "ray"))}
    import pyarrow.fs
    return {"name": RAY_RUN, "storage_path": storage.join(path, "ray"),
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def run(task: Task, features_url: str, out: str, config: TrainConfig, release_url: str | None = None,
        address: str | None = None, progress: bool = True) -> dict:
    """Build examples, train, write the best model, submissions and result.json; return the result."""
    import torch

    from engine.features.store import FeatureStore
    from engine.release import Release

    log = print if progress else (lambda *a, **k: None)
    features = FeatureStore(features_url)
    release = Release.open(release_url or features.release_url())
    train = task.examples(release, features, "train", train=True)
    val = task.examples(release, features, "val", train=False)
    truth = task.truth(release, "val")
    outputs = task.outputs(release)
    log(f"{task.name}: {len(train)} train and {len(val)} val examples, {train.x.shape[1]}-d inputs, {outputs} outputs")
    state = fit(task, train, val, truth, outputs, out, config, address, log)

    head = task.head(example_scale(train.subset(train.labelled())), outputs, config.hidden, config.dropout)
    head.load_state_dict(state["best_state"])
    fs, out_path = storage.filesystem(out)
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    storage.write_bytes_atomic(fs, storage.join(out_path, "model.pt"), buf.getvalue())
    storage.write_bytes_atomic(fs, storage.join(out_path, "metrics.jsonl"),
                               "".join(json.dumps(row) + "\n" for row in state["history"]).encode())
    submissions = {}
    for split in ("val", "test"):
        try:
            examples = val if split == "val" else task.examples(release, features, split, train=False)
        except FileNotFoundError as e:   # the release withholds this split's annotation file
            log(f"{task.name}: no {split} submission ({e})")
            continue
        if len(examples):
            submissions[split] = task.submission(predict(head, examples.x), examples, split)
            storage.write_json_atomic(fs, storage.join(out_path, f"submission_{split}.json"), submissions[split])
            for name, content in task.official_files(submissions[split], release, split).items():
                if isinstance(content, bytes):
                    storage.write_bytes_atomic(fs, storage.join(out_path, name), content)
                else:
                    storage.write_json_atomic(fs, storage.join(out_path, name), content)
    val_metrics = task.evaluate(submissions["val"], truth)
    result = {"task": task.name, "metric": task.metric, "val": val_metrics, "baselines": task.baselines(train, val, truth, "val"),
              "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "resumed_from": state["resumed_from"],
              "train_examples": len(train), "val_examples": len(val), "features": features_url,
              "config": dataclasses.asdict(config)}
    storage.write_json_atomic(fs, storage.join(out_path, "result.json"), result)
    log(f"{task.name}: val {task.metric} {val_metrics[task.metric]:.4f} at epoch {state['best_epoch']} "
        f"(baselines: {', '.join(f'{k} {v:.4f}' for k, v in result['baselines'].items())})")
    return result
