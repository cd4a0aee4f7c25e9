"""The pretraining step on one accelerator: do clips decoded on this machine's CPUs keep it busy?

Prepared for a GPU machine and untested on one: written and run on a 2-core machine without a
GPU, with ``--device cpu`` and tiny sizes only (which checks that it runs, not its figures).

Decoding runs on the CPUs, either a torch DataLoader (``--loader dataloader``, the default:
--decoders worker processes, each calling ``read_sample`` + ``decode_pair`` over the seeded
order of a 1-worker run) or Ray Data (``--loader ray``: ``train_stream`` on --decoders CPUs, read
with ``iter_torch_batches``). It feeds the pretraining network (``build_net``: the encoder plus
the objective's heads) on --device with bf16 autocast on cuda (--precision), AdamW, one
optimizer step per batch. Printed, as JSON:

- ``fed_clips_per_s``: clips/s of the loop fed by the loader (after --warmup steps), and
  ``data_wait``: the share of its time spent waiting for the next batch (goal < 10%);
- ``model_clips_per_s``: the same loop on random clips already on the device, run first with no
  loader running (the model's own throughput), and ``fed_over_model`` (goal >= 0.9x);
- ``gpu_utilization``: median of ``torch.cuda.utilization()`` sampled every 0.1 s during the fed
  loop when pynvml is installed; otherwise ``busy_share``, the share of the fed loop's time in
  model steps (each step ends with the loss read back, which waits for the device);
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over the fed loop.

    python bench/pretrain_gpu.py SHARDS [--model tiny_video] [--size 224] [--clip-frames 16]
                                 [--batch-size 32] [--steps 50] [--decoders 8] [--loader dataloader|ray]
                                 [--device cuda] [--precision auto|bf16|fp32]

SHARDS is a finished shard stage (``ee4d shard``; transcode shards cut for training decode
fastest). Checked here with:

    python bench/pretrain_gpu.py /tmp/bench_pretrain/transcode --device cpu --size 32 --clip-frames 4 \\
        --batch-size 4 --steps 6 --warmup 2 --decoders 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import threading
import time

import torch

from engine.pretrain import data, loop
from engine.pretrain.stage import PretrainConfig


class Rows(torch.utils.data.Dataset):
    """Row ``i`` of rank 0 of a 1-worker run: the clip pair ``train_stream`` would give."""

    def __init__(self, index, spec, seed: int, rows: int):
        self.index, self.spec, self.seed, self.rows = index, spec, seed, rows
        self.orders = {}      # each DataLoader worker keeps its own epoch permutation

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> dict:
        epoch, sample = data.row_sample(row, len(self.index), 1, 0, self.seed, self.orders)
        return data.decode_pair(data.read_sample(self.index[sample]), self.spec, self.seed, epoch, sample)


def batches(args, index, config: PretrainConfig, device: torch.device):
    rows = (args.warmup + args.steps) * args.batch_size
    if args.loader == "ray":
        import ray
        ray.init(address="local", num_cpus=args.decoders, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        ray.data.DataContext.get_current().execution_options.preserve_order = True   # as under Ray Train
        stream = data.train_stream(index, config.clip_spec(), workers=1, rank=0, seed=config.seed, start=0, rows=rows)
        # The iterator's own thread copies each batch to the device, as under Ray Train (device "auto").
        return stream.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=args.prefetch,
                                         drop_last=True, device=str(device))
    return torch.utils.data.DataLoader(
        Rows(index, config.clip_spec(), config.seed, rows), batch_size=args.batch_size, num_workers=args.decoders,
        prefetch_factor=args.prefetch if args.decoders else None, pin_memory=device.type == "cuda", drop_last=True)


class Utilization:
    """torch.cuda.utilization() every 0.1 s in a thread, when pynvml is there."""

    def __init__(self, device: torch.device):
        self.samples, self.ok = [], False
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
                self.ok = True
            except Exception:        # no pynvml (or no NVML): fall back to the busy share
                pass
        self.stop, self.device = threading.Event(), device
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self):
        if self.ok:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.ok:
            self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", default="tiny_video")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--frame-stride", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--decoders", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--prefetch", type=int, default=4, help="batches each loader keeps ready (per worker)")
    parser.add_argument("--loader", choices=["dataloader", "ray"], default="dataloader")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = PretrainConfig(model=args.model, clip_frames=args.clip_frames, frame_stride=args.frame_stride,
                            size=args.size, batch_size=args.batch_size, seed=args.seed)
    index = data.sample_index(args.shards, args.split)
    net, dim = loop.build_net(config, config.model_spec())
    net = net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = net(batch["ego"].to(device, non_blocking=True), batch["exo"].to(device, non_blocking=True))
        loss.backward()
        optimizer.step()
        float(loss.detach())          # waits for the device, as the Ray Train loop's metrics do

    # The model alone first, on random clips already on the device (kernels and allocator warmed
    # here), with no loader process running beside it.
    shape = (args.batch_size, args.clip_frames, args.size, args.size, 3)
    resident = {k: torch.randint(0, 256, shape, dtype=torch.uint8, device=device) for k in ("ego", "exo")}
    for _ in range(args.warmup):
        step(resident)
    started = time.perf_counter()
    for _ in range(args.steps):
        step(resident)
    model_seconds = time.perf_counter() - started
    del resident

    # The fed loop: decoding on the CPUs, the model on the device.
    source = iter(batches(args, index, config, device))
    for _ in range(args.warmup):      # process start-up, pipeline fill
        step(next(source))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    waits, steps = [], []
    with Utilization(device) as utilization:
        started = time.perf_counter()
        for _ in range(args.steps):
            t = time.perf_counter()
            batch = next(source)
            waits.append(time.perf_counter() - t)
            step(batch)
            steps.append(time.perf_counter() - t)
        fed_seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    fed = args.steps * args.batch_size / fed_seconds
    model = args.steps * args.batch_size / model_seconds
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
              "model": args.model, "dim": dim, "clip": [args.clip_frames, args.size, args.size],
              "batch_size": args.batch_size, "bf16": bf16, "loader": args.loader, "decoders": args.decoders,
              "steps": args.steps, "fed_clips_per_s": round(fed, 2), "model_clips_per_s": round(model, 2),
              "fed_over_model": round(fed / model, 3),
              "data_wait": round(sum(waits) / fed_seconds, 4),
              "step_seconds_median": round(statistics.median(steps), 4),
              "wait_seconds_median": round(statistics.median(waits), 4),
              "peak_memory_gib": round(peak, 3) if peak is not None else None}
    if utilization.samples:
        result["gpu_utilization"] = statistics.median(utilization.samples) / 100
    else:
        result["busy_share"] = round(1 - sum(waits) / fed_seconds, 4)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
