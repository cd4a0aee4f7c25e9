"""``ee4d``: the Ego-Exo4D data engine's command line (also ``python -m engine``)."""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time


def _synth(args) -> int:
    from engine.release import synth

    start = time.time()
    plans = synth.generate(args.out, preset=args.preset, takes=args.takes, seconds=args.seconds, seed=args.seed,
                           faults=args.faults, scenarios=args.scenarios.split(",") if args.scenarios else None,
                           workers=args.workers)
    seconds = sum(p.seconds for p in plans)
    print(f"wrote {len(plans)} takes ({seconds:.0f} s of video in 5 views each) to {args.out} "
          f"in {time.time() - start:.1f} s")
    if args.faults:
        for p in plans:
            for kind, what in p.faults.items():
                print(f"  fault {kind}: {p.take_name} {what}")
    return 0


def _validate(args) -> int:
    from engine import storage
    from engine.release import ReleaseError
    from engine.release.validate import validate

    try:
        report = validate(args.root, resolution=args.resolution, workers=args.workers)
    except ReleaseError as e:
        print(f"ee4d validate: cannot read the release: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        fs, path = storage.filesystem(args.json)
        storage.write_json_atomic(fs, path, report.to_json())
        print(f"report: {args.json}")
    return 0


def _shard(args) -> int:
    from engine.release import ReleaseError
    from engine.shards import job
    from engine.shards.plan import ShardConfig

    try:
        config = ShardConfig(splits=tuple(args.split), views=args.views, window=args.window, stride=args.stride,
                             mode=args.mode, resolution=args.resolution, short_side=args.short_side, fps=args.fps,
                             gop=args.gop, shard_bytes=int(args.shard_mb * 1e6))
        manifest = job.run(args.release, args.out, config, address=args.address)
    except (ValueError, ReleaseError) as e:
        print(f"ee4d shard: {e}", file=sys.stderr)
        return 2
    print(f"{manifest['samples']} samples in {sum(map(len, manifest['shards'].values()))} shards, "
          f"{manifest['rejects']} rejected takes (see rejects.json) -> {args.out}")
    return 0


def _features(args) -> int:
    from engine.features import job, models

    try:
        spec = models.resolve(args.model, args.weights, kind=args.input, frames=args.frames, size=args.size)
        config = job.FeatureConfig(model=spec, window=args.window, stride=args.stride, fps=args.fps,
                                   views=args.views, splits=tuple(args.split) if args.split else None,
                                   batch_size=args.batch_size, precision=args.precision,
                                   gpus_per_actor=args.gpus_per_actor, actors=args.actors,
                                   cpus_per_actor=args.cpus_per_actor)
        manifest = job.run(args.shards, args.out, config, address=args.address)
    except ValueError as e:
        print(f"ee4d features: {e}", file=sys.stderr)
        return 2
    print(f"{manifest['take_views']} take views of {manifest['dim']}-d features ({manifest['written_this_run']} "
          f"written now), {manifest['rejects']} rejected (see rejects.json) -> {args.out}")
    return 0


def _train(args) -> int:
    from engine.tasks import TASKS
    from engine.train.loop import TrainConfig, run

    try:
        task = TASKS[args.task](train_views=args.train_views) if args.task == "keystep_recognition" else TASKS[args.task]()
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                             seed=args.seed, workers=args.workers, hidden=args.hidden)
        result = run(task, args.features, args.out, config, release_url=args.release, address=args.address)
    except ValueError as e:
        print(f"ee4d train: {e}", file=sys.stderr)
        return 2
    print(f"result: {args.out}/result.json (val {result['metric']} {result['val'][result['metric']]:.4f})")
    return 0


def _evaluate(args) -> int:
    import json

    from engine import storage
    from engine.release import Release
    from engine.tasks import TASKS

    task = TASKS[args.task]()
    fs, path = storage.filesystem(args.predictions)
    try:
        submission = storage.read_json(fs, path)
    except (OSError, json.JSONDecodeError) as e:
        print(f"ee4d evaluate: cannot read {args.predictions}: {e}", file=sys.stderr)
        return 2
    truth = task.truth(Release.open(args.release), args.split)
    print(json.dumps(task.evaluate(submission, truth), indent=1))
    return 0


def _run(args) -> int:
    from engine.graph import run as graph
    from engine.graph.spec import load
    from engine.release import ReleaseError

    try:
        spec = load(args.spec, args.set, out=args.out)
        result = graph.run(spec, address=args.address)
    except (ValueError, ReleaseError) as e:   # a bad spec or config, an unreadable release
        print(f"ee4d run: {e}", file=sys.stderr)
        return 2
    except graph.GraphError as e:
        print(f"ee4d run: {e}", file=sys.stderr)
        return 1
    counts = collections.Counter(s["status"] for s in result["stages"])
    print(f"run {spec.name}: {', '.join(f'{n} {status}' for status, n in counts.items())} in {result['seconds']:.1f} s")
    if result["report"]:
        print(f"report: {result['report']}")
    return 0


def _jobs_client(address: str):
    """A Jobs API client, or SystemExit with one line saying why not."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SystemExit(f"ee4d: {address} wants a token: run with RAY_AUTH_MODE=token and the cluster's token in "
                         "~/.ray/auth_token (or RAY_AUTH_TOKEN)") from None
    except ConnectionError as e:
        raise SystemExit(f"ee4d: cannot reach the Ray Jobs API at {address}: {e}") from None


def _submit(args) -> int:
    import shlex

    from engine import storage
    from engine.graph.spec import SpecError, load

    working_dir = os.path.abspath(args.working_dir)
    spec_path = os.path.abspath(args.spec)
    if not spec_path.startswith(working_dir + os.sep):
        print(f"ee4d submit: {args.spec} is outside the working dir {working_dir}, which is what the job receives",
              file=sys.stderr)
        return 2
    try:
        spec = load(spec_path, args.set, out=args.out, local=False)   # a malformed spec fails here, not on the cluster
    except SpecError as e:
        print(f"ee4d submit: {e}", file=sys.stderr)
        return 2
    out = spec.out
    if storage.is_local(storage.filesystem(out)[0]):
        # The job runs in a copy of the working dir; a relative path would land in that copy.
        out = os.path.abspath(out)
        print(f"ee4d submit: out is the local path {out}: every node of the cluster must see it (use s3:// on "
              "a real cluster)")
    entrypoint = " ".join(["python -m engine run", shlex.quote(os.path.relpath(spec_path, working_dir)),
                           "--out", shlex.quote(out)] + [f"--set {shlex.quote(s)}" for s in args.set or []])
    client = _jobs_client(args.address)
    job_id = client.submit_job(
        entrypoint=entrypoint, submission_id=args.job_id, metadata={"ee4d_spec": spec.name, "out": out},
        runtime_env={"working_dir": working_dir,
                     "excludes": [".venv/", "runs/", ".git/", "__pycache__/", "*.pyc", ".pytest_cache/"]})
    print(f"submitted {job_id} to {args.address}: {entrypoint}")
    print(f"  ee4d status {job_id} --address {args.address}\n  ee4d logs {job_id} --address {args.address} --follow")
    if not args.wait:
        return 0
    _follow(client, job_id)
    status = client.get_job_status(job_id)
    print(f"{job_id}: {status}")
    return 0 if str(status) == "SUCCEEDED" else 1


def _follow(client, job_id: str) -> None:
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)
    asyncio.run(tail())


def _status(args) -> int:
    client = _jobs_client(args.address)
    if args.job_id:
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0
    for info in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)) if info.start_time else "-"
        print(f"{info.submission_id or info.job_id}  {str(info.status):<9}  {started}  {info.entrypoint}")
    return 0


def _stop(args) -> int:
    client = _jobs_client(args.address)
    client.stop_job(args.job_id)
    while not client.get_job_status(args.job_id).is_terminal():
        time.sleep(0.5)
    print(f"{args.job_id}: {client.get_job_status(args.job_id)}")
    return 0


def _logs(args) -> int:
    client = _jobs_client(args.address)
    if args.follow:
        _follow(client, args.job_id)
    else:
        print(client.get_job_logs(args.job_id), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ee4d", description="Ego-Exo4D data engine on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a job spec's graph (release -> ... -> report), skipping finished stages")
    p.add_argument("spec", help="job spec (YAML), e.g. jobs/demo.yaml")
    p.add_argument("--out", help="output location, a path or s3:// (default: the spec's out)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set tasks.keystep_recognition.epochs=10 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: the spec's ray.address, else a local Ray)")
    p.set_defaults(func=_run)

    jobs_address = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster through the Jobs API")
    p.add_argument("spec", help="job spec (YAML) inside the working dir")
    p.add_argument("--address", default=jobs_address,
                   help="the cluster's dashboard / Jobs API (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    p.add_argument("--out", help="output location the cluster writes (default: the spec's out)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec value (repeatable)")
    p.add_argument("--working-dir", default=".", help="code shipped with the job (default: the current directory)")
    p.add_argument("--job-id", help="submission id (default: one Ray makes up)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit 1 unless it succeeded")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="status of a submitted job, or of every job on the cluster")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", default=jobs_address, help="the cluster's Jobs API (default: %(default)s)")
    p.set_defaults(func=_status)

    p = sub.add_parser("stop", help="stop a submitted job (a later submit of the same spec and out resumes it)")
    p.add_argument("job_id")
    p.add_argument("--address", default=jobs_address, help="the cluster's Jobs API (default: %(default)s)")
    p.set_defaults(func=_stop)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--address", default=jobs_address, help="the cluster's Jobs API (default: %(default)s)")
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=_logs)

    p = sub.add_parser("synth", help="write a miniature Ego-Exo4D release (real layout, real H.264)")
    p.add_argument("out", help="output directory (must be empty or absent)")
    p.add_argument("--preset", default="default", choices=["default", "tiny", "large"])
    p.add_argument("--takes", type=int, help="number of takes (default: the preset's)")
    p.add_argument("--seconds", type=float, help="seconds per take (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", help="comma-separated scenario names to draw from (default: all 8)")
    p.add_argument("--faults", action="store_true",
                   help="inject a truncated video, a missing view, a short view and an unknown-take annotation")
    p.add_argument("--workers", type=int, help="takes rendered in parallel (default: up to 2)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("validate", help="check a release (local path or s3://) and report problems per take")
    p.add_argument("root", help="release root: a path or an fsspec URL such as s3://bucket/prefix")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--resolution", default="full", choices=["full", "448"], help="which video files to probe")
    p.add_argument("--workers", type=int, default=8, help="videos probed concurrently")
    p.set_defaults(func=_validate)

    p = sub.add_parser("shard", help="write time-aligned multi-view WebDataset shards of a release (Ray Data)")
    p.add_argument("release", help="release root: a path or an fsspec URL")
    p.add_argument("out", help="output location: a path or an fsspec URL such as s3://bucket/shards")
    p.add_argument("--split", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    p.add_argument("--views", default="all", choices=["ego", "ego+best_exo", "all"])
    p.add_argument("--window", type=float, default=8.0, help="window length in seconds (default 8)")
    p.add_argument("--stride", type=float, help="window stride in seconds (default: the window)")
    p.add_argument("--mode", default="remux", choices=["remux", "transcode", "frames"],
                   help="remux: copy packets (fast, cuts snap to keyframes); transcode: re-encode exact "
                        "windows; frames: JPEG frames")
    p.add_argument("--resolution", default="448", choices=["full", "448"], help="which source videos to read")
    p.add_argument("--short-side", type=int, help="transcode/frames: output short side")
    p.add_argument("--fps", type=float, help="transcode/frames: output frame rate")
    p.add_argument("--gop", type=int, default=30, help="transcode: keyframe interval in frames")
    p.add_argument("--shard-mb", type=float, default=1000.0, help="target shard size in MB (default 1000)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=_shard)

    p = sub.add_parser("features", help="compute features from shards (Ray Data; GPU actors when present)")
    p.add_argument("shards", help="a finished shard stage: a path or an fsspec URL")
    p.add_argument("out", help="output location, e.g. <release>/features/<model>")
    p.add_argument("--model", required=True,
                   help="tiny_video, tiny_image, torchscript:PATH, export:PATH, torchvision:NAME, timm:NAME "
                        "or package.module:factory")
    p.add_argument("--weights", help="weights file (a state_dict); nothing is downloaded")
    p.add_argument("--input", choices=["video", "image"], help="model input kind (built-ins know theirs)")
    p.add_argument("--frames", type=int, help="video models: frames fed per window (default 32; tiny_video 8)")
    p.add_argument("--size", type=int, help="input side in pixels (default 224; built-ins 64)")
    p.add_argument("--window", type=int, default=32, help="window in frames at 30 fps (official: 32)")
    p.add_argument("--stride", type=int, default=16, help="stride in frames (official: 16)")
    p.add_argument("--fps", type=float, help="image models: features per second (default: every frame)")
    p.add_argument("--views", default="all", choices=["ego", "all"])
    p.add_argument("--split", nargs="+", choices=["train", "val", "test"], help="default: every split in the shards")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="fractions pack several actors per GPU")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU share, or 1 without GPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="without GPUs: CPUs (torch threads) per actor")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=_features)

    tasks = ["keystep_recognition", "demonstrator_proficiency", "demonstration_proficiency"]
    p = sub.add_parser("train", help="train and evaluate a benchmark on features (Ray Train)")
    p.add_argument("task", choices=tasks)
    p.add_argument("--features", required=True, help="a finished feature stage (ee4d features)")
    p.add_argument("--out", required=True, help="run directory; rerunning with the same one resumes")
    p.add_argument("--release", help="release root for the labels (default: the one the features came from)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split across workers")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--patience", type=int, default=8, help="epochs without a better val metric before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (GPUs when the cluster has them)")
    p.add_argument("--train-views", default="ego", choices=["ego", "ego+exo"],
                   help="keystep recognition: views used for training (evaluation is ego only)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score a submission file in the official format")
    p.add_argument("task", choices=tasks)
    p.add_argument("--predictions", required=True, help="submission JSON (a path or an fsspec URL)")
    p.add_argument("--release", required=True, help="release root holding the split's annotations")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
