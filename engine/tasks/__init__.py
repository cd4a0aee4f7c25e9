"""Benchmarks: examples from features, official metrics and submission files (see base.py)."""
from engine.tasks.base import Examples, FeatureStore, Task
from engine.tasks.keystep import KeystepRecognition
from engine.tasks.proficiency import DemonstrationProficiency, DemonstratorProficiency

TASKS = {t.name: t for t in (KeystepRecognition, DemonstratorProficiency, DemonstrationProficiency)}

__all__ = ["TASKS", "Examples", "FeatureStore", "Task"]
