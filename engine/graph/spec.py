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

A section that is absent is a stage that does not run (``validate``, ``features``, ``tasks``,
``report``); ``features`` needs ``shard`` and ``tasks`` need ``features``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from engine.features.job import FeatureConfig
from engine.shards.plan import ShardConfig
from engine.train.loop import TrainConfig

SECTIONS = ("name", "out", "ray", "release", "validate", "shard", "features", "tasks", "report")


class SpecError(ValueError):
    """A malformed spec: the message starts with the file and the key."""


@dataclasses.dataclass(frozen=True)
class RayParams:
    address: str | None = None


@dataclasses.dataclass(frozen=True)
class SynthParams:
    preset: str = "default"
    takes: int | None = None
    seconds: float | None = None
    seed: int = 0
    scenarios: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ReleaseParams:
    url: str | None = None
    synth: SynthParams | None = None


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    resolution: str = "448"
    workers: int = 8


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """The model as on the command line (name, weights, input, frames, size) plus FeatureConfig's fields."""
    model: str = "tiny_video"
    weights: str | None = None
    input: str | None = None
    frames: int | None = None
    size: int | None = None
    window: int = 32
    stride: int = 16
    fps: float | None = None
    views: str = "all"
    splits: tuple[str, ...] | None = None
    batch_size: int = 16
    precision: str = "auto"
    gpus_per_actor: float = 1.0
    actors: int | None = None
    cpus_per_actor: float = 1.0

    def config(self) -> FeatureConfig:
        from engine.features import models
        spec = models.resolve(self.model, self.weights, kind=self.input, frames=self.frames, size=self.size)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(FeatureConfig) if f.name != "model"}
        return FeatureConfig(model=spec, **fields)


@dataclasses.dataclass(frozen=True)
class TaskParams:
    """TrainConfig's fields plus the options a task takes (keystep recognition: train_views)."""
    train: TrainConfig = TrainConfig()
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ReportParams:
    take: str | None = None         # take_name or take_uid for the strip of frames (default: one with masks)
    time: float | None = None       # seconds into that take (default: a frame with keypoints)


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    out: str
    address: str | None
    release: ReleaseParams
    validate: ValidateParams | None
    shard: ShardConfig | None
    features: FeatureParams | None
    tasks: dict[str, TaskParams]
    report: ReportParams | None
    source: dict          # the spec as read, after --set overrides: recorded with the run


# ----------------------------------------------------------------------------- loading

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
        raise SpecError(f"{path}: a spec is a mapping of sections ({', '.join(SECTIONS)})")
    for item in overrides or []:
        apply_override(raw, item, path)
    if out is not None:
        raw["out"] = out
    return parse(raw, path, local)


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
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise SpecError(f"{where}: unknown section {sorted(unknown)[0]!r}; sections are {', '.join(SECTIONS)}")
    name = _typed(raw.get("name", "run"), str, f"{where}: name")
    out = _typed(raw.get("out", f"runs/{name}"), str, f"{where}: out")
    ray_section = _mapping(raw.get("ray"), f"{where}: ray")
    address = _build(RayParams, ray_section, f"{where}: ray").address

    release_raw = _mapping(raw.get("release"), f"{where}: release")
    if (release_raw.get("url") is None) == (release_raw.get("synth") is None):
        raise SpecError(f"{where}: release: give exactly one of url (an existing release) or synth (generate one)")
    synth = None
    if release_raw.get("synth") is not None:
        synth = _build(SynthParams, _mapping(release_raw["synth"], f"{where}: release.synth"), f"{where}: release.synth")
        from engine.release.synth import PRESETS
        if synth.preset not in PRESETS:
            raise SpecError(f"{where}: release.synth.preset: unknown preset {synth.preset!r}; "
                            f"known: {', '.join(PRESETS)}")
    release = ReleaseParams(url=_typed(release_raw.get("url"), str | None, f"{where}: release.url"), synth=synth)
    extra = set(release_raw) - {"url", "synth"}
    if extra:
        raise SpecError(f"{where}: release.{sorted(extra)[0]}: unknown key; keys are url, synth")

    def section(key, build):
        if key not in raw or raw[key] is False:
            return None
        return build(_mapping(raw[key], f"{where}: {key}"), f"{where}: {key}")

    validate, shard, features, report = (
        section("validate", lambda v, w: _build(ValidateParams, v, w)), section("shard", _shard_config),
        section("features", lambda v, w: _build(FeatureParams, v, w)),
        section("report", lambda v, w: _build(ReportParams, v, w)))
    tasks = _tasks(_mapping(raw.get("tasks"), f"{where}: tasks"), where)
    if features and not shard:
        raise SpecError(f"{where}: features: needs a shard section (features are computed from shards)")
    if tasks and not features:
        raise SpecError(f"{where}: tasks: need a features section (benchmarks train on features)")
    # Resolve the model now, so a wrong name or a missing weights file fails before any
    # stage runs.
    if features and local:
        try:
            features.config()
        except ValueError as e:
            raise SpecError(f"{where}: features: {e}") from None
    return Spec(name=name, out=out, address=address, release=release, validate=validate, shard=shard,
                features=features, tasks=tasks, report=report, source=raw)


def _shard_config(values: dict, where: str) -> ShardConfig:
    """ShardConfig's fields, with the shard size also accepted in MB as on the command line."""
    values = dict(values)
    if "shard_mb" in values:
        values["shard_bytes"] = int(_typed(values.pop("shard_mb"), float, f"{where}.shard_mb") * 1e6)
    return _build(ShardConfig, values, where, extra_keys={"shard_mb"})


def _tasks(raw: dict, where: str) -> dict[str, TaskParams]:
    from engine.tasks import TASKS
    out = {}
    for name, params in raw.items():
        if name not in TASKS:
            raise SpecError(f"{where}: tasks.{name}: unknown benchmark; known: {', '.join(TASKS)}")
        params = _mapping(params, f"{where}: tasks.{name}")
        option_names = set(typing.get_type_hints(TASKS[name].__init__)) - {"return"}
        options = {k: v for k, v in params.items() if k in option_names}
        train_keys = {k: v for k, v in params.items() if k not in option_names}
        train = _build(TrainConfig, train_keys, f"{where}: tasks.{name}", extra_keys=option_names)
        try:
            TASKS[name](**options)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{where}: tasks.{name}: {e}") from None
        out[name] = TaskParams(train=train, options=options)
    return out


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping of keys to values, got {type(value).__name__}")
    return value


def _build(cls, values: dict, where: str, extra_keys: set[str] = frozenset()):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields | set(extra_keys)))
            raise SpecError(f"{where}.{key}: unknown key; keys are {allowed}")
        kwargs[key] = _typed(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def _typed(value: Any, hint, where: str):
    """Check (and lightly convert: int -> float, list -> tuple) a YAML value against a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        errors = []
        for kind in kinds:
            try:
                return _typed(value, kind, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, _mapping(value, where), where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if hint is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)      # resolution: 448 written without quotes
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    raise SpecError(f"{where}: expected {names.get(hint, hint)}, got {value!r}")
