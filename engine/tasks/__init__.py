"""Benchmarks: examples from features, official metrics and submission files (see base.py).

Each module below registers its benchmarks with ``@register``; importing it is its registry entry.
"""
from engine.tasks import correspondence, ego_pose, keystep, online, procedure, proficiency, translation  # noqa: F401 - registers the built-in benchmarks
from engine.tasks.base import TASKS, Examples, Task, TrainConfig, register

__all__ = ["TASKS", "Examples", "Task", "TrainConfig", "register"]
