"""``ee4d``: the Ego-Exo4D data engine's command line (also ``python -m engine``)."""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

from engine import params as P
from engine import stage as stages
from engine.errors import ContentError, storage_fault


def _evaluate(args) -> int:
    import json

    from engine.release import Release
    from engine.tasks import TASKS

    cls = TASKS[args.task]
    if args.perceptual and "perceptual" not in P.keys(cls.Options):
        print(f"ee4d evaluate: {args.task} has no perceptual metrics (--perceptual)", file=sys.stderr)
        return 2
    task = cls(cls.Options(perceptual=args.perceptual) if args.perceptual else None)
    try:
        submission = task.read_submission(args.predictions)
    except (OSError, ValueError) as e:      # JSONDecodeError is a ValueError
        print(f"ee4d evaluate: cannot read {args.predictions}: {e}", file=sys.stderr)
        return 2
    truth = task.truth(Release.open(args.release), args.split)
    try:
        print(json.dumps(task.evaluate(submission, truth, lenient=args.lenient), indent=1))
    except ValueError as e:          # the submission lacks what the official script requires
        print(f"ee4d evaluate: {args.predictions}: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args) -> int:
    from engine.graph import run as graph
    from engine.graph.spec import load

    try:
        spec = load(args.spec, args.set, out=args.out)
        if args.dry_run:
            _print_plan(graph.dry_run(spec))
            return 0
        result = graph.run(spec, address=args.address)
    except (ValueError, ContentError) as e:   # a bad spec or config, an unreadable release
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


def _print_plan(rows: list[dict]) -> None:
    """The plan of ``ee4d run --dry-run``: one block per stage."""
    for row in rows:
        print(f"{row['stage']}: {row['status']} ({row['fingerprint']})")
        print(f"  what       {row['about']}")
        print(f"  output     {row['output']}")
        if row["inputs"]:
            print(f"  inputs     {', '.join(sorted(set(row['inputs'].values())))}")
        print(f"  resources  {row['resources']}")
    counts = collections.Counter(row["status"] for row in rows)
    print(f"{len(rows)} stages: {', '.join(f'{n} {status}' for status, n in counts.items())}")


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

    # local:///PATH: the code is already at PATH on every node (an image built from
    # cluster/Dockerfile); nothing is uploaded, and the spec is read there at its path relative
    # to the current directory.
    in_place = args.working_dir.startswith("local://")
    working_dir = args.working_dir if in_place else os.path.abspath(args.working_dir)
    base = os.getcwd() if in_place else working_dir
    spec_path = os.path.abspath(args.spec)
    if not spec_path.startswith(base + os.sep):
        where = "the current directory" if in_place else "the working dir"
        print(f"ee4d submit: {args.spec} is outside {where} {base}, which is what the job receives", file=sys.stderr)
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
    entrypoint = " ".join(["python -m engine run", shlex.quote(os.path.relpath(spec_path, base)),
                           "--out", shlex.quote(out)] + [f"--set {shlex.quote(s)}" for s in args.set or []])
    client = _jobs_client(args.address)
    submission = dict(
        entrypoint=entrypoint, submission_id=args.job_id, metadata={"ee4d_spec": spec.name, "out": out},
        runtime_env={"working_dir": working_dir,
                     **({} if in_place else {"excludes": [".venv/", "runs/", ".git/", "__pycache__/", "*.pyc",
                                                          ".pytest_cache/"]}),
                     # the job registers the same plugin stages and benchmarks as this spec was checked with
                     "env_vars": {k: os.environ[k] for k in (stages.PLUGINS_ENV,) if os.environ.get(k)}})
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(**submission)
            break
        except RuntimeError as e:
            # A cluster just started has no job agent yet; Ray says to try again later.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
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


def _add_stage_command(sub, kind: stages.StageKind) -> None:
    """``ee4d NAME``: the kind's own command, or by default a run of the stage on its own."""
    command = kind.command
    p = sub.add_parser(command.name, help=command.help, description=command.help)
    if command.main:
        for name, text in command.args:
            p.add_argument(name, help=text)
        cls = command.params or kind.params
        P.add_flags(p, cls)
        p.set_defaults(func=lambda args: _with_params(cls, args, command.name, lambda params: command.main(args, params)))
    elif kind.variants:
        variants = p.add_subparsers(dest="variant", required=True, metavar=kind.name.upper())
        for variant, cls in kind.variants().items():
            _add_stage_args(variants.add_parser(variant, help=f"{command.help}: {variant}"), kind, cls)
    else:
        _add_stage_args(p, kind, kind.params)


def _add_stage_args(p: argparse.ArgumentParser, kind: stages.StageKind, cls: type) -> None:
    for name in kind.inputs:
        p.add_argument(name, metavar=name.upper(), help=f"the {name} stage's output (a release: its root), a path "
                                                        "or an fsspec URL such as s3://bucket/prefix")
    p.add_argument("out", metavar="OUT", help="output location, a path or an fsspec URL; rerunning with the same one "
                                              "resumes")
    for name in kind.optional_inputs:
        p.add_argument(f"--{name}", help=f"the {name} to read (default: the one its inputs were made from)")
    P.add_flags(p, cls)
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=lambda args: _run_stage(kind, cls, args))


def _with_params(cls: type, args, command: str, main) -> int:
    """``main(params)`` with the settings from the flags; a bad setting or input: one line, exit 2."""
    try:
        return main(P.from_flags(cls, args))
    except (ValueError, ContentError) as e:
        print(f"ee4d {command}: {e}", file=sys.stderr)
        return 2
    except stages.StageBusy as e:
        print(f"ee4d {command}: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        fault = storage_fault(e)
        if fault is None:
            raise
        print(f"ee4d {command}: {fault}; nothing was committed: run the same command again to finish",
              file=sys.stderr)
        return 1


def _run_stage(kind: stages.StageKind, cls: type, args) -> int:
    def main(params) -> int:
        inputs = {name: getattr(args, name) for name in kind.inputs + kind.optional_inputs if getattr(args, name)}
        record = stages.run_one(kind.name, params, inputs, args.out, variant=getattr(args, "variant", None),
                                address=args.address)
        print(kind.command.summary(record))
        return 0
    return _with_params(cls, args, kind.command.name, main)


def build_parser() -> argparse.ArgumentParser:
    from engine.tasks import TASKS

    parser = argparse.ArgumentParser(prog="ee4d", description="Ego-Exo4D data engine on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a job spec's graph (release -> ... -> report), skipping finished stages")
    p.add_argument("spec", help="job spec (YAML), e.g. jobs/demo.yaml")
    p.add_argument("--out", help="output location, a path or s3:// (default: the spec's out)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set tasks.keystep_recognition.epochs=10 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: the spec's ray.address, else a local Ray)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (each stage: reused or run, fingerprint, inputs, output, resources) "
                        "and run nothing")
    p.set_defaults(func=_run)

    jobs_address = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster through the Jobs API")
    p.add_argument("spec", help="job spec (YAML) inside the working dir")
    p.add_argument("--address", default=jobs_address,
                   help="the cluster's dashboard / Jobs API (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    p.add_argument("--out", help="output location the cluster writes (default: the spec's out)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec value (repeatable)")
    p.add_argument("--working-dir", default=".",
                   help="code shipped with the job (default: the current directory), or local:///PATH when every "
                        "node already has it at PATH (an image from cluster/Dockerfile): nothing is uploaded")
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

    for kind in stages.kinds().values():
        if kind.command:
            _add_stage_command(sub, kind)

    p = sub.add_parser("evaluate", help="score a submission file in the official format")
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--predictions", required=True,
                   help="submission JSON, or the official predictions folder of PNGs (translation); "
                        "a path or an fsspec URL")
    p.add_argument("--release", required=True, help="release root holding the split's annotations")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--perceptual", help="translation_exo_ego_generation: folder of the LPIPS, DISTS and CLIP networks "
                                        "(lpips.pt2, dists.pt2, clip_score.pt2, saved by torch.export)")
    p.add_argument("--lenient", action="store_true",
                   help="score a partial submission: where the official script stops at a missing prediction "
                        "(ego pose), leave it out and count it under 'missing'")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
