"""Job specs: one YAML file picks the release, the stages, their parameters and resources.

A spec is checked whole before anything runs; a wrong key or value fails at once with the
key's dotted path and the reason (``tasks.keystep_recognition.epochs: expected an integer``).

    name: demo
    out: runs/demo                   # local path or s3://; relative paths are taken from the cwd
    ray: {address: null}             # null: a local Ray; "auto", "ray://HEAD:10001", ...
    release: {synth: {preset: default, seed: 0}}    # or {url: s3://bucket/egoexo4d}
    validate: {resolution: "448"}
    shard: {views: all, window: 8, shard_mb: 1000}
    features: {model: tiny_video, batch_size: 16}
    tasks:
      keystep_recognition: {epochs: 40, workers: 1}
    report: {}

Every other section is a registered stage kind's (``engine.stage``): its keys are the fields of
the kind's params dataclass. A section that is absent (or ``false``) is a stage that does not
run, and so is one variant set to ``false`` (``--set tasks.ego_hand_pose=false``); a stage whose
inputs are absent is an error.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from engine import params as P
from engine import stage as stages
from engine.params import SpecError

RUN_KEYS = ("name", "out", "ray")

__all__ = ["Spec", "SpecError", "load", "parse"]


@dataclasses.dataclass(frozen=True)
class RayParams(P.Params):
    address: str | None = P.setting(None, "Ray address: null starts a local Ray; auto, ray://HEAD:10001, ...")


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    out: str
    address: str | None
    # section -> params; a kind with variants: section -> {variant: params}. In spec order.
    sections: dict[str, Any]
    source: dict          # the spec as read, after --set overrides: recorded with the run


def load(path: str, overrides: list[str] | None = None, out: str | None = None, local: bool = True) -> Spec:
    """Read a YAML spec, apply ``key.path=value`` overrides (values parsed as YAML), and check it.

    ``local=False`` (a spec about to be submitted) skips the checks that need this machine to
    see the job's files, such as a model's weights path; the job checks them when it starts."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping of sections ({', '.join(sections())})")
    for item in overrides or []:
        apply_override(raw, item, path)
    if out is not None:
        raw["out"] = out
    return parse(raw, path, local)


def sections() -> list[str]:
    return list(RUN_KEYS) + [k.key for k in stages.kinds().values()]


def apply_override(raw: dict, item: str, where: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected key.path=value")
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{where}: --set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value else None


def parse(raw: dict, where: str = "spec", local: bool = True) -> Spec:
    by_key = {k.key: k for k in stages.kinds().values()}
    unknown = set(raw) - set(RUN_KEYS) - set(by_key)
    if unknown:
        raise SpecError(f"{where}: unknown section {sorted(unknown)[0]!r}; sections are {', '.join(sections())}")
    name = P.typed(raw.get("name", "run"), str, f"{where}: name")
    out = P.typed(raw.get("out", f"runs/{name}"), str, f"{where}: out")
    address = P.build(RayParams, raw.get("ray"), f"{where}: ray").address
    if "release" not in raw:
        raise SpecError(f"{where}: release: missing; give release.url or release.synth")
    parsed: dict[str, Any] = {}
    for key, kind in by_key.items():
        if key not in raw or raw[key] is False:
            continue
        at = f"{where}: {key}"
        if kind.variants:
            known = kind.variants()
            parsed[key] = {}
            for variant, values in P.mapping(raw[key], at).items():
                if variant not in known:
                    raise SpecError(f"{at}.{variant}: unknown {kind.name}; known: {', '.join(sorted(known))}")
                if values is not False:
                    parsed[key][variant] = P.build(known[variant], values, f"{at}.{variant}")
        else:
            parsed[key] = P.build(kind.params, raw[key], at)
    for key, kind in by_key.items():
        if key not in parsed:
            continue
        every = list(parsed[key].values()) if kind.variants else [parsed[key]]
        needed = kind.inputs + tuple(i for params in every for i in kind.inputs_for(params))
        missing = [i for i in needed if by_key_of(i) not in parsed]
        if missing:
            raise SpecError(f"{where}: {key}: needs a {by_key_of(missing[0])} section "
                            f"({kind.name} reads {missing[0]})")
        if local and kind.check:
            for params in every:
                try:
                    kind.check(params)      # e.g. a model's weights file: fail before any stage runs
                except ValueError as e:
                    raise SpecError(f"{where}: {key}: {e}") from None
    return Spec(name=name, out=out, address=address, sections=parsed, source=raw)


def by_key_of(kind_name: str) -> str:
    return stages.kind(kind_name).key
