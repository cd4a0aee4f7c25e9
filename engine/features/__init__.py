"""Features from shards: decode on CPU tasks, embed on an actor pool, write the official layout.

The names below load on first use, so that ``engine.features.store`` (file names and reading,
used by the benchmarks) can be imported without torch and the model zoo.
"""
import importlib

_EXPORTS = {
    "FeatureConfig": ("engine.features.job", "FeatureConfig"),
    "run": ("engine.features.job", "run"),
    "FeatureStore": ("engine.features.store", "FeatureStore"),
    "load": ("engine.features.store", "load_tensor"),
    "ModelError": ("engine.features.models", "ModelError"),
    "ModelSpec": ("engine.features.models", "ModelSpec"),
    "resolve": ("engine.features.models", "resolve"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine.features' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(module), attr)
