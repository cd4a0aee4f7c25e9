"""Ego-Exo4D data engine."""

__version__ = "0.1.0"
