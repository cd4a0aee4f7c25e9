"""The release stage: a given release (local or s3://), or a miniature one generated here.

A given release is never written to: its fingerprint comes from a listing of its metadata and
annotation files (names, sizes, modification stamps), so no video is read to plan a run.
``ee4d synth OUT`` is this stage's command: it writes a miniature release directly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

from engine import params as P
from engine import stage as stages
from engine import storage
from engine.miniature.synth import PRESETS
from engine.miniature.synth import generate as generate_release


@dataclasses.dataclass(frozen=True)
class SynthParams(P.Params):
    preset: str = P.setting("default", "size of the miniature release", choices=tuple(PRESETS))
    takes: int | None = P.setting(None, "number of takes (default: the preset's)")
    seconds: float | None = P.setting(None, "seconds per take (default: the preset's)")
    seed: int = P.setting(0, "random seed: the same seed writes the same release")
    scenarios: tuple[str, ...] | None = P.setting(None, "scenario names to draw from (default: all 8)")
    faults: bool = P.setting(False, "inject a truncated video, a missing view, a short view and an "
                                    "unknown-take annotation")
    workers: int | None = P.setting(None, "takes rendered in parallel (default: up to 2)", fingerprint=False)


@dataclasses.dataclass(frozen=True)
class ReleaseParams(P.Params):
    url: str | None = P.setting(None, "an existing release: a path or s3://bucket/prefix")
    synth: SynthParams | None = P.setting(None, "generate a miniature release with these settings")

    def __post_init__(self):
        super().__post_init__()
        if (self.url is None) == (self.synth is None):
            raise ValueError("give exactly one of url (an existing release) or synth (generate one)")


def listing_fingerprint(url: str, storage_options: dict | None = None) -> str:
    """What identifies a given release without reading its videos: the URL plus the names,
    sizes and modification stamps of its top-level and annotation files."""
    fs, root = storage.filesystem(url, storage_options)
    try:
        files = fs.find(root, maxdepth=1, detail=True)
        files.update(fs.find(storage.join(root, "annotations"), detail=True))
    except FileNotFoundError:
        raise ValueError(f"release {url}: not found") from None
    if not files:
        raise ValueError(f"release {url}: not found")
    stamp_keys = ("mtime", "LastModified", "ETag", "etag", "last_modified")
    listing = sorted((os.path.relpath(path, root), info.get("size"),
                      str(next((info[k] for k in stamp_keys if info.get(k) is not None), "")))
                     for path, info in files.items() if info.get("type") == "file")
    blob = json.dumps({"url": url, "listing": listing}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _kwargs(params: SynthParams) -> dict:
    return {**{k: getattr(params, k) for k in P.keys(SynthParams)},
            "scenarios": list(params.scenarios) if params.scenarios else None}


def generate(params: SynthParams, url: str) -> int:
    """Write a miniature release at ``url`` (beside an existing stage record); return its takes."""
    fs, path = storage.filesystem(url)
    with tempfile.TemporaryDirectory(dir=path if storage.is_local(fs) else None) as tmp:
        plans = generate_release(os.path.join(tmp, "release"), **_kwargs(params))
        if storage.is_local(fs):
            for name in os.listdir(path):          # what a killed run left, except the record
                if name not in (stages.RECORD, os.path.basename(tmp)):
                    target = os.path.join(path, name)
                    shutil.rmtree(target) if os.path.isdir(target) else os.unlink(target)
            for name in os.listdir(os.path.join(tmp, "release")):
                os.replace(os.path.join(tmp, "release", name), os.path.join(path, name))
        else:
            fs.put(os.path.join(tmp, "release"), path, recursive=True)
    return len(plans)


def _run(params: ReleaseParams, inputs: dict, out: str, ctx: stages.Context) -> dict:
    started = time.time()
    takes = generate(params.synth, out)
    ctx.log(f"  release: {takes} takes generated in {time.time() - started:.1f} s")
    return {"takes": takes}


def _synth_command(args, params: SynthParams) -> int:
    start = time.time()
    plans = generate_release(args.out, **_kwargs(params))
    seconds = sum(p.seconds for p in plans)
    print(f"wrote {len(plans)} takes ({seconds:.0f} s of video in 5 views each) to {args.out} "
          f"in {time.time() - start:.1f} s")
    for p in plans if params.faults else []:
        for kind, what in p.faults.items():
            print(f"  fault {kind}: {p.take_name} {what}")
    return 0


KIND = stages.register(stages.StageKind(
    name="release", params=ReleaseParams, run=_run, help="the release every other stage reads",
    given_url=lambda params: params.url, given=listing_fingerprint,
    resources=lambda params: "given: nothing to run" if params.url else "driver: generates locally, 2 processes",
    command=stages.Command("synth", "write a miniature Ego-Exo4D release (real layout, real H.264)",
                           args=(("out", "output directory (must be empty or absent)"),),
                           main=_synth_command, params=SynthParams)))
