"""Synthetic studies for the tests: the generator lives in bench/ so the benchmark shares it."""
from bench.synth import *  # noqa: F401,F403
from bench.synth import make_study, make_tiny  # noqa: F401  (explicit for type checkers)
