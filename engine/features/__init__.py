"""Features from shards: decode on CPU tasks, embed on an actor pool, write the official layout."""
from engine.features.job import FeatureConfig, load, run
from engine.features.models import ModelError, ModelSpec, resolve

__all__ = ["FeatureConfig", "ModelError", "ModelSpec", "load", "resolve", "run"]
