"""``ee4d``: the Ego-Exo4D data engine's command line (also ``python -m engine``)."""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ee4d", description="Ego-Exo4D data engine on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
