"""Ego-Exo4D releases: reading (local or s3://), validating, and generating miniature ones."""
from engine.release.reader import Problem, Release, ReleaseError

__all__ = ["Problem", "Release", "ReleaseError"]
