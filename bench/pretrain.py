"""Pretraining throughput: the clip loader, the Ray Train loop and 1 against 2 workers, each
against a reference run in the same command.

1. loader: pairs/s that ``train_stream`` (Ray Data, decode tasks on all --cpus) delivers through
   ``iter_torch_batches``, no model, against
   a) the decode stage alone: ``read_sample`` + ``decode_pair`` (and the same stacking into
      batches) in a plain loop in this process over the same rows. One process is one core, so
      the comparison is per core: Ray's pairs/s divided by its CPUs against the loop's pairs/s;
   b) a torch DataLoader over the same shards with webdataset, as users read them today, with as
      many worker processes as Ray has CPUs, each calling ``decode_pair`` on webdataset's
      members. The shard list is repeated once per epoch (links named by epoch, split over the
      workers by shard as webdataset does), so every row gets the crop the Ray stream draws for
      it from (seed, epoch, sample): all three decode exactly the same clips (checked).
   Each is also given in pairs per CPU-second of every process it used (the loop: this process;
   the DataLoader: this process and its workers; Ray: the driver and every process Ray started,
   its daemons included), which other load on a shared machine moves less than wall time.
   Wall times include each one's start-up (Ray's workers already started and warm).
   Goals: per core >= 0.9x the decode stage alone, >= 1.0x the DataLoader.
2. trainer: the pretrain stage (``engine.pretrain.stage.run``: 1 Ray Train worker of 1 CPU, Ray
   Data decoding on the other CPUs) for --steps steps. The data-wait goal assumes a model step
   slower than decoding: on 2 cores the defaults (--size 128, 16 frames at stride 4) decode more
   slowly on the one CPU left than the step runs; --clip-frames 32 --frame-stride 1 make the step
   the slower part. From its metrics.jsonl the median data-wait fraction (goal < 10%)
   and clips/s, against a plain torch loop in this process with the same network (build_net),
   optimizer and thread count on batches of the same rows decoded beforehand (step time only).
   Ratio Ray Train / plain (goal >= 0.9x). Where the difference goes: the compute part of a Ray
   Train step (its time less its wait for data) against the plain step; the plain loop again
   with a process decoding beside it (the cores shared with decoding, as under any loader); the
   plain loop fed by ``train_stream`` in this process (no Ray Train; Ray Data on the CPUs Train
   leaves it, an idle actor holding the worker's); ``iter_torch_batches`` alone over the same
   batches already in the object store. The plain loop runs before and after the stage (the
   machine's load drifts).
3. scaling: the stage with 1 and 2 workers on a two-node local cluster (``ray.cluster_utils.
   Cluster``, --node-cpus logical CPUs a node, --worker-cpus a worker: sized so that the two
   workers land on different nodes, each with one torch thread), same global batch: clips/s
   of each and the ratio. Both "nodes" share this machine's cores, so this shows the path works
   and what it costs, not how it scales.

    python bench/pretrain.py [--root /tmp/bench_pretrain] [--sections loader trainer scaling]
                             [--loader-sets transcode:2 remux:2] [--repeats 3] [--batch-size 16]
                             [--size 128] [--clip-frames 16] [--steps 16] [--plain-steps 6]
                             [--scaling-steps 8] [--node-cpus 3] [--worker-cpus 1.6]

--root holds the miniature release and its two shard sets; when missing they are made (about
4 minutes on 2 cores), as by:

    python -c "from engine.miniature import synth; synth.generate('ROOT/release', preset='tiny', takes=24, seconds=8.0, seed=7)"
    ee4d shard ROOT/release ROOT/remux --window 4 --shard-mb 20
    ee4d shard ROOT/release ROOT/transcode --window 4 --shard-mb 20 --mode transcode --short-side 128 --gop 8
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

from engine.pretrain import data, loop
from engine.pretrain.stage import PretrainConfig, run


def make_shards(root: Path) -> None:
    from engine.miniature import synth
    from engine.shards import job as shard_job
    from engine.shards.plan import ShardConfig

    if not (root / "release").exists():
        synth.generate(root / "release", preset="tiny", takes=24, seconds=8.0, seed=7)
    for name, config in (("remux", ShardConfig(window=4.0, shard_mb=20)),
                         ("transcode", ShardConfig(window=4.0, shard_mb=20, mode="transcode", short_side=128, gop=8))):
        if not (root / name / "stage.json").exists():
            shard_job.run(str(root / "release"), str(root / name), config, progress=False)
    ray.shutdown()     # the shard job's Ray: the bench starts its own with its CPUs


# ----------------------------------------------------------------------------- CPU time

def cpu_seconds(descendants: bool) -> dict:
    """CPU seconds (user + system) so far of this process, of its reaped children, and with
    ``descendants`` of every live process below it (Ray's daemons and workers)."""
    me = psutil.Process()
    times = {me.pid: sum(me.cpu_times()[:2])}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    times["reaped"] = children.ru_utime + children.ru_stime
    if descendants:
        for p in me.children(recursive=True):
            try:
                times[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
    return times


def timed(fn, descendants: bool = False) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds, fn's result)."""
    before, start = cpu_seconds(descendants), time.perf_counter()
    out = fn()
    wall, after = time.perf_counter() - start, cpu_seconds(descendants)
    return wall, sum(v - before.get(k, 0.0) for k, v in after.items()), out


def idle_rate(seconds: float = 2.0) -> float:
    """CPU seconds a second that the processes below this one (Ray's) use while nothing runs."""
    before = cpu_seconds(True)
    time.sleep(seconds)
    after = cpu_seconds(True)
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k != os.getpid()) / seconds


# ----------------------------------------------------------------------------- 1. loader

def to_batch(rows: list[dict]) -> dict:
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def seen(batch: dict) -> list[tuple[int, int]]:
    return list(zip(batch["epoch"].tolist(), batch["sample"].tolist()))


def decode_alone(index, spec, rows: int, seed: int, batch_size: int) -> list:
    """The decode stage alone: rank 0's rows of a 1-worker run, in this process, in batches."""
    orders, pending, out = {}, [], []
    for row in range(rows):
        epoch, sample = data.row_sample(row, len(index), 1, 0, seed, orders)
        pending.append(data.decode_pair(data.read_sample(index[sample]), spec, seed, epoch, sample))
        if len(pending) == batch_size or row == rows - 1:
            out += seen(to_batch(pending))
            pending = []
    return out


def ray_loader(index, spec, rows: int, seed: int, batch_size: int) -> list:
    stream = data.train_stream(index, spec, workers=1, rank=0, seed=seed, start=0, rows=rows)
    out = []
    for batch in stream.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
        out += seen(batch)
    return out


class DecodeMembers:
    """webdataset's sample -> ``decode_pair``'s row; the epoch is the name of the link's folder."""

    def __init__(self, index, spec, seed: int):
        self.number = {ref.key: i for i, ref in enumerate(index)}
        self.spec, self.seed = spec, seed

    def __call__(self, sample: dict) -> dict:
        epoch = int(Path(sample["__url__"]).parent.name.removeprefix("epoch-"))
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        return data.decode_pair(members, self.spec, self.seed, epoch, self.number[sample["__key__"]])


def epoch_links(index, epochs: int, work: Path) -> list[str]:
    """The split's shards once per epoch, as links under ``work/epoch-E/``."""
    urls = []
    for epoch in range(epochs):
        folder = work / f"epoch-{epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        for url in sorted({ref.url for ref in index}):
            link = folder / Path(url).name
            if not link.exists():
                link.symlink_to(url)
            urls.append(str(link))
    return urls


def dataloader(urls: list[str], decode: DecodeMembers, workers: int, batch_size: int) -> list:
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode)
    out = []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        out += seen(batch)
    return out


def loader_section(args, name: str, epochs: int, work: Path) -> dict:
    index = data.sample_index(str(args.root / name), "train")
    spec = data.ClipSpec(frames=args.loader_frames, stride=args.frame_stride, size=args.loader_size)
    rows, seed, b = epochs * len(index), 0, args.batch_size
    if epochs * len({ref.url for ref in index}) % args.cpus:
        print(f"  loader {name}: {epochs} epoch(s) of shards do not split evenly over {args.cpus} DataLoader "
              "workers: some of them idle for part of the run")
    urls = epoch_links(index, epochs, work / f"links-{name}")
    decode = DecodeMembers(index, spec, seed)
    ray_loader(index, spec, 4 * args.cpus, seed, b)            # warm: Ray's workers import the engine once
    decode_alone(index, spec, 1, seed, b)
    idle = idle_rate()
    methods = {"decode alone": (lambda: decode_alone(index, spec, rows, seed, b), 1, False),
               "ray loader": (lambda: ray_loader(index, spec, rows, seed, b), args.cpus, True),
               "dataloader": (lambda: dataloader(urls, decode, args.cpus, b), args.cpus, False)}
    figures = {m: {"pairs_per_s": [], "per_core": [], "per_cpu_s": [], "cores": cores}
               for m, (_, cores, _) in methods.items()}
    reference = None
    for repeat in range(args.repeats):
        for method, (fn, cores, descendants) in methods.items():
            wall, cpu, rows_seen = timed(fn, descendants)
            got = collections.Counter(rows_seen)
            if reference is None:
                reference = got
            if got != reference:
                raise AssertionError(f"{method} decoded other rows than the others")
            f = figures[method]
            f["pairs_per_s"].append(len(rows_seen) / wall)
            f["per_core"].append(len(rows_seen) / wall / cores)
            f["per_cpu_s"].append(len(rows_seen) / cpu)
            print(f"  loader {name} #{repeat}: {method:12s} {len(rows_seen)} pairs in {wall:5.2f} s, "
                  f"{cpu:5.2f} CPU-s", flush=True)
    return {"set": name, "epochs": epochs, "rows": rows, "spec": spec, "figures": figures, "ray_idle": idle}


# ----------------------------------------------------------------------------- 2. trainer

def first_batches(index, config: PretrainConfig, count: int) -> list[dict]:
    """The run's first ``count`` batches (rank 0 of 1 worker), decoded here."""
    spec, orders, out = config.clip_spec(), {}, []
    for k in range(count):
        rows = []
        for row in range(k * config.batch_size, (k + 1) * config.batch_size):
            epoch, sample = data.row_sample(row, len(index), 1, 0, config.seed, orders)
            rows.append(data.decode_pair(data.read_sample(index[sample]), spec, config.seed, epoch, sample))
        out.append(to_batch(rows))
    return out


def plain_loop(config: PretrainConfig, batches, steps: int) -> tuple[list[float], list[float], float]:
    """The Ray Train loop's step (1 worker, no accumulation) in this process: (step seconds,
    seconds waiting for the next batch) per step, and the share of a core the loop's thread got
    (torch runs the model in it with one thread). ``batches`` is a list (cycled) or an iterator."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(config.cpus_per_worker))   # as train_loop does
    try:
        net, _ = loop.build_net(config, config.model_spec())
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: loop.lr_factor(step, steps, 1))
        source = iter(batches) if not isinstance(batches, list) else None
        times, waits, cpu = [], [], time.thread_time()
        for step in range(steps):
            started = time.perf_counter()
            batch = next(source) if source else batches[step % len(batches)]
            waited = time.perf_counter() - started
            optimizer.zero_grad(set_to_none=True)
            loss = net(batch["ego"], batch["exo"])
            loss.backward()
            optimizer.step()
            scheduler.step()
            float(loss.detach())
            times.append(time.perf_counter() - started)
            waits.append(waited)
        return times, waits, (time.thread_time() - cpu) / sum(times)
    finally:
        torch.set_num_threads(threads)


def decode_beside(shards: str, spec, started, stop) -> None:
    """Decode the split's rows over and over until ``stop``: the load Ray Data's decode task puts
    on the machine while the model steps (run in its own process)."""
    index, orders, row = data.sample_index(shards, "train"), {}, 0
    while not stop.is_set():
        epoch, sample = data.row_sample(row, len(index), 1, 0, 0, orders)
        data.decode_pair(data.read_sample(index[sample]), spec, 0, epoch, sample)
        started.set()
        row += 1


def plain_loop_beside_decoding(config: PretrainConfig, batches, steps: int, shards: str) -> tuple:
    import multiprocessing as mp

    context = mp.get_context("spawn")
    started, stop = context.Event(), context.Event()
    decoder = context.Process(target=decode_beside, args=(shards, config.clip_spec(), started, stop), daemon=True)
    decoder.start()
    try:
        started.wait(120)
        return plain_loop(config, batches, steps)
    finally:
        stop.set()
        decoder.join()


def iter_overhead(batches: list[dict], batch_size: int, passes: int) -> float:
    """Seconds per batch of ``iter_torch_batches`` over batches already in the object store."""
    rows = [{k: v[i].numpy() for k, v in b.items()} for b in batches for i in range(len(b["ego"]))]
    ds = ray.data.from_items(rows, override_num_blocks=len(batches)).materialize()
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for _ in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
            count += 1
    return (time.perf_counter() - start) / count


@ray.remote
class CpuHolder:
    """Holds the CPUs it is given and does nothing: stands in for Ray Train's worker."""

    def ready(self) -> bool:
        return True


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def trainer_section(args, work: Path) -> dict:
    shards = args.root / args.train_set
    index = data.sample_index(str(shards), "train")
    config = PretrainConfig(clip_frames=args.clip_frames, frame_stride=args.frame_stride, size=args.size,
                            steps=args.steps, batch_size=args.batch_size, workers=1, cpus_per_worker=1,
                            evaluate=False, checkpoint_every=args.steps)
    batches = first_batches(index, config, 3)
    step = config.batch_size
    plain, _, plain_share = plain_loop(config, batches, args.plain_steps)
    print(f"  trainer: plain loop {args.plain_steps} steps, median {statistics.median(plain):.3f} s", flush=True)

    # The plain loop fed by train_stream in this process: Ray Data without Ray Train, on the CPUs
    # Train leaves it. An idle actor holds the worker's CPUs as Train's worker does (a resource
    # limit on the stream's context did not hold: Ray Data decoded on both CPUs, 1.9 tasks at a time).
    holder = CpuHolder.options(num_cpus=config.cpus_per_worker).remote()
    ray.get(holder.ready.remote())
    try:
        stream = data.train_stream(index, config.clip_spec(), workers=1, rank=0, seed=config.seed, start=0,
                                   rows=args.plain_steps * step)
        fed, fed_wait, _ = plain_loop(config, stream.iter_torch_batches(batch_size=step, prefetch_batches=2,
                                                                     drop_last=True), args.plain_steps)
    finally:
        ray.kill(holder)
    print(f"  trainer: fed by train_stream, median {statistics.median(fed):.3f} s", flush=True)

    started = time.perf_counter()
    result = run(str(shards), str(work / "trainer"), config, progress=False)
    wall = time.perf_counter() - started
    history = read_metrics(work / "trainer")
    print(f"  trainer: Ray Train {result['steps']} steps in {wall:.1f} s (start-up included)", flush=True)

    plain_after, _, share_after = plain_loop(config, batches, args.plain_steps)   # the machine's load may have moved
    plain += plain_after
    beside, _, beside_share = plain_loop_beside_decoding(config, batches, args.plain_steps, str(shards))
    print(f"  trainer: plain loop beside a decode process, median {statistics.median(beside):.3f} s", flush=True)
    overhead = iter_overhead(batches, step, passes=4)
    # Medians over every step: the first steps wait for the pipeline to fill.
    return {"config": config, "plain": plain, "beside": beside, "fed": fed, "fed_wait": [w / s for w, s in zip(fed_wait, fed)],
            "history": history, "wall": wall, "iter_overhead": overhead, "result": result,
            "shares": {"plain": (plain_share + share_after) / 2, "beside": beside_share}}


# ----------------------------------------------------------------------------- 3. scaling

def train_worker_nodes() -> list[str]:
    """Nodes the last run's Ray Train workers ran on (from the GCS actor table)."""
    from ray._private import state

    actors = [a for a in state.actors().values() if a.get("ActorClassName", "").endswith("RayTrainWorker")]
    latest = max((a.get("StartTime", 0) for a in actors), default=0)
    return sorted(a["Address"]["NodeID"][:8] for a in actors if latest - a.get("StartTime", 0) < 5000)


def scaling_section(args, work: Path) -> dict:
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.node_cpus, "include_dashboard": False})
    cluster.add_node(num_cpus=args.node_cpus)
    runs = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        for workers in (1, 2):
            config = PretrainConfig(clip_frames=args.clip_frames, frame_stride=args.frame_stride, size=args.size,
                                    steps=args.scaling_steps, batch_size=args.batch_size, workers=workers,
                                    cpus_per_worker=args.worker_cpus, evaluate=False,
                                    checkpoint_every=args.scaling_steps)
            out = work / f"scaling-{workers}"
            started = time.perf_counter()
            run(str(args.root / args.train_set), str(out), config, progress=False)
            wall = time.perf_counter() - started
            nodes = train_worker_nodes()
            runs[workers] = {"history": read_metrics(out), "wall": wall, "nodes": nodes}
            print(f"  scaling: {workers} worker(s) on node(s) {', '.join(nodes)}: {args.scaling_steps} steps "
                  f"in {wall:.1f} s (start-up included)", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return runs


# ----------------------------------------------------------------------------- report

def med(values) -> float:
    return statistics.median(values)


def report(args, loaders: list[dict], trainer: dict | None, scaling: dict | None, loads: list[float]) -> None:
    print(f"\n{args.cpus} CPUs (this machine: {os.cpu_count()}), batch {args.batch_size}; medians of "
          f"{args.repeats} runs (loader) or over steps (trainer, scaling); 1-minute load average at the start "
          f"and after each section: {', '.join(f'{x:.1f}' for x in loads)}")
    for section in loaders:
        f, s = section["figures"], section["spec"]
        print(f"\n1. loader, {section['set']} shards: {section['rows']} pairs of {s.frames} frames at {s.size}px "
              f"({section['epochs']} epoch(s))")
        print(f"   {'':14s} {'pairs/s':>8s} {'cores':>6s} {'pairs/s/core':>13s} {'pairs/CPU-s':>12s}")
        for method, g in f.items():
            print(f"   {method:14s} {med(g['pairs_per_s']):8.1f} {g['cores']:6d} {med(g['per_core']):13.1f} "
                  f"{med(g['per_cpu_s']):12.1f}")
        ray_core, ray_cpu = med(f["ray loader"]["per_core"]), med(f["ray loader"]["per_cpu_s"])
        print(f"   ray loader / decode alone, per core: {ray_core / med(f['decode alone']['per_core']):.2f}x "
              f"(per CPU-s {ray_cpu / med(f['decode alone']['per_cpu_s']):.2f}x; goal >= 0.9x)")
        print(f"   ray loader / DataLoader+webdataset, same cores: "
              f"{med(f['ray loader']['pairs_per_s']) / med(f['dataloader']['pairs_per_s']):.2f}x "
              f"(per CPU-s {ray_cpu / med(f['dataloader']['per_cpu_s']):.2f}x; goal >= 1.0x)")
        print(f"   (Ray's processes use {section['ray_idle']:.2f} CPU-s a second when idle: counted in its CPU-s)")
    if trainer:
        c, h = trainer["config"], trainer["history"]
        step = {"plain": med(trainer["plain"]), "beside": med(trainer["beside"]), "fed": med(trainer["fed"]),
                "ray": med([r["seconds"] for r in h])}
        rate = {k: c.batch_size / v for k, v in step.items()}
        rate["ray"] = med([r["clips_per_s"] for r in h])
        compute = med([r["seconds"] * (1 - r["data_wait"]) for r in h])
        print(f"\n2. trainer: {c.model}, {c.clip_frames} frames at {c.size}px, batch {c.batch_size}, 1 worker of "
              f"{c.cpus_per_worker:g} CPU, {len(h)} steps (Ray Train wall {trainer['wall']:.0f} s with start-up)")
        print(f"   {'':40s} {'clips/s':>8s} {'step s':>7s} {'data wait':>9s}")
        for key, label, wait in (("plain", "plain loop, batches in memory", None),
                                 ("beside", "  the same, a decode process beside it", None),
                                 ("fed", "plain loop fed by train_stream", med(trainer["fed_wait"])),
                                 ("ray", "Ray Train stage (metrics.jsonl)", med([r["data_wait"] for r in h]))):
            print(f"   {label:40s} {rate[key]:8.2f} {step[key]:7.3f} {'' if wait is None else f'{100 * wait:8.1f}%'}")
        print(f"   Ray Train / plain loop: {rate['ray'] / rate['plain']:.2f}x (goal >= 0.9x; data wait goal < 10%)")
        print(f"   where it goes: Ray Train step less its data wait / plain step {compute / step['plain']:.2f}x; plain loop "
              f"beside decoding / plain {rate['beside'] / rate['plain']:.2f}x; Ray Train / plain beside decoding "
              f"{rate['ray'] / rate['beside']:.2f}x; fed by train_stream / plain {rate['fed'] / rate['plain']:.2f}x")
        print(f"   iter_torch_batches alone (batches in the object store): {1000 * trainer['iter_overhead']:.1f} ms "
              f"a batch, {100 * trainer['iter_overhead'] / step['plain']:.1f}% of a plain step")
        shares = trainer["shares"]
        print(f"   share of a core the plain loop's thread got: {shares['plain']:.2f} alone, {shares['beside']:.2f} "
              "beside decoding")
    if scaling:
        rates = {w: med([r["clips_per_s"] for r in s["history"]]) for w, s in scaling.items()}
        print(f"\n3. scaling: two-node local cluster, {args.node_cpus} logical CPUs a node, {args.worker_cpus:g} a "
              f"worker ({os.cpu_count()} cores in all), global batch {args.batch_size}, {args.scaling_steps} steps")
        for w, s in scaling.items():
            print(f"   {w} worker(s) on node(s) {', '.join(s['nodes'])}: {rates[w]:7.2f} clips/s, data wait "
                  f"{100 * med([r['data_wait'] for r in s['history']]):.1f}%, wall {s['wall']:.0f} s with start-up")
        print(f"   2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_pretrain"))
    parser.add_argument("--sections", nargs="+", default=["loader", "trainer", "scaling"],
                        choices=["loader", "trainer", "scaling"])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frame-stride", type=int, default=4)
    # NAME[:EPOCHS] under --root. The DataLoader's workers take whole shards, and each set has
    # one train shard: EPOCHS should be a multiple of --cpus to keep them all busy.
    parser.add_argument("--loader-sets", nargs="+", default=["transcode:2", "remux:2"])
    parser.add_argument("--loader-size", type=int, default=64)
    parser.add_argument("--loader-frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-set", default="transcode")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--plain-steps", type=int, default=6)
    parser.add_argument("--scaling-steps", type=int, default=8)
    # Ray Train places its workers with PACK: both go on one node when they fit. 1.6 CPUs a worker
    # on 3-CPU nodes keeps them on two nodes, with one CPU a node left for decoding; torch gets
    # int(1.6) = 1 thread, as in the trainer section.
    parser.add_argument("--node-cpus", type=int, default=3)
    parser.add_argument("--worker-cpus", type=float, default=1.6)
    args = parser.parse_args()
    args.root = args.root.resolve()     # the DataLoader's epoch links point at absolute paths

    # Ray's sessions and its "current cluster" file in a folder of the bench's own: a bare
    # ray.init() elsewhere on this machine (someone's tests) neither joins the bench's cluster
    # nor makes the bench join theirs.
    os.environ.setdefault("RAY_TMPDIR", str(args.root / "ray"))
    (args.root / "ray").mkdir(parents=True, exist_ok=True)
    make_shards(args.root)
    loaders, trainer, scaling = [], None, None
    loads = [os.getloadavg()[0]]     # the machine's load at each section's end: noise to read the figures with
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        work = Path(tmp)
        if {"loader", "trainer"} & set(args.sections):
            ray.init(address="local", num_cpus=args.cpus, log_to_driver=False, configure_logging=False)
            # The trainer's ingest keeps rows in order (DataConfig in loop.pretrain): so does the loader here.
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            ray.data.DataContext.get_current().enable_progress_bars = False
            if "loader" in args.sections:
                for item in args.loader_sets:
                    name, _, epochs = item.partition(":")
                    loaders.append(loader_section(args, name, int(epochs or 1), work))
                    loads.append(os.getloadavg()[0])
            if "trainer" in args.sections:
                trainer = trainer_section(args, work)
                loads.append(os.getloadavg()[0])
            ray.shutdown()
        if "scaling" in args.sections:
            scaling = scaling_section(args, work)
            loads.append(os.getloadavg()[0])
    report(args, loaders, trainer, scaling, loads)


if __name__ == "__main__":
    main()
