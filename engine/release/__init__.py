"""Ego-Exo4D releases: reading (local or s3://) and validating. Miniature ones come from ``engine.miniature``."""
from engine.release.reader import Problem, Release, ReleaseError

__all__ = ["Problem", "Release", "ReleaseError"]
