"""One declarative graph from a release to a report (see run.py), driven by a YAML job spec (spec.py)."""
