"""The miniature Ego-Exo4D release: a deterministic generator (``engine.miniature.synth``) of
the real layout and schemas with real H.264 video and learnable labels, for tests, benchmarks
and demos. It writes what ``engine.release`` reads."""
