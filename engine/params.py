"""Settings declared once.

Every stage and every benchmark takes its settings as one frozen dataclass whose fields are
declared with ``setting(...)``: a default, a line of help, the allowed values, and whether the
setting changes the output (``fingerprint=False`` for those that only change speed: batch
sizes, actor counts, retries). From that one declaration come

- the check of a YAML spec section (``build``: unknown keys, wrong types, disallowed values,
  each reported with the dotted key),
- the command-line flags, their ``choices`` and ``--help`` text (``add_flags``, ``from_flags``),
- what a stage's fingerprint covers (``Params.identity``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


class SpecError(ValueError):
    """A setting that cannot be used: the message starts with where it came from and the key."""


def setting(default: Any = None, help: str = "", *, choices: tuple | None = None,
            fingerprint: bool = True) -> Any:
    """A dataclass field with its help text, allowed values and fingerprint role."""
    metadata = {"help": help, "choices": choices, "fingerprint": fingerprint}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or None for a collection default")
    return dataclasses.field(default=default, metadata=metadata)


class Params:
    """Base of every settings dataclass: checks allowed values after construction."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if not choices or value is None:
                continue
            for v in value if isinstance(value, tuple) else (value,):
                if v not in choices:
                    raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")

    def to_json(self) -> dict:
        return json_value(self)

    def identity(self) -> dict:
        """The settings that fix the output: the fingerprint hashes these and nothing else."""
        return {f.name: json_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("fingerprint", True)}


def json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    return value


def keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------- YAML

def build(cls, values: dict | None, where: str):
    """An instance of ``cls`` from a mapping (a YAML section or flags), every key checked."""
    values = mapping(values, where)
    hints = typing.get_type_hints(cls)
    fields = keys(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise SpecError(f"{where}.{key}: unknown key; keys are {', '.join(sorted(fields))}")
        kwargs[key] = typed(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping of keys to values, got {type(value).__name__}")
    return value


def typed(value: Any, hint, where: str):
    """Check (and lightly convert: int -> float, list -> tuple) a YAML value against a type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for kind in (a for a in args if a is not type(None)):
            try:
                return typed(value, kind, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        return tuple(typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)      # resolution: 448 written without quotes
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    raise SpecError(f"{where}: expected {names.get(hint, hint)}, got {value!r}")


# ----------------------------------------------------------------------------- flags

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field of ``cls``, typed, with its choices and help (default shown)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, many = _scalar(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if default is not None:
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        options = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **options)
            continue
        parser.add_argument(flag(f.name), type=kind, nargs="+" if many else None,
                            choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                            f.name.upper(), **options)


def from_flags(cls, args: argparse.Namespace):
    """An instance of ``cls`` from the flags given (the others keep their defaults)."""
    given = {name: getattr(args, name) for name in keys(cls) if hasattr(args, name)}
    return build(cls, given, "flags")


def _scalar(hint) -> tuple[type, bool]:
    """(the type argparse converts to, whether the flag takes several values)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _scalar(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return _scalar(args[0])[0], True
    return hint, False
