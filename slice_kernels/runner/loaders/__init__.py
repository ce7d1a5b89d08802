"""Tasks from the SLICE paper's benchmarks, read from local files: ``superni:<task file>`` (a
Super-NaturalInstructions ``taskNNN_*.json``) and ``trace:<dataset folder or file>`` (a TRACE dataset).

Both forms take options in URL query form after the path (``superni:/d/task363_sst2.json?metric=rouge_l``).
``tasks.py`` dispatches here on the prefix; the loaders return the runner's own ``Example``/``Task``.
"""

from __future__ import annotations

from .spec import PREFIXES, kind, parse_spec  # noqa: F401  (the package's API)
from .superni import load_superni, read_superni, superni_files, superni_name
from .trace import load_trace, read_trace, trace_files, trace_name


def check(spec: str) -> None:
    """Every check that needs no model: the files exist, parse, and every record has the expected shape."""
    if kind(spec) == "superni":
        read_superni(spec)
    else:
        read_trace(spec)


def name(spec: str) -> str:
    if kind(spec) == "superni":
        return superni_name(spec)
    return trace_name(spec)


def files(spec: str) -> list[str]:
    """The files the task reads (what a run's fingerprint hashes)."""
    if kind(spec) == "superni":
        return superni_files(spec)
    return trace_files(spec)


def load(spec: str, n_train: int, n_eval: int, seed: int):
    if kind(spec) == "superni":
        return load_superni(spec, n_train, n_eval, seed)
    return load_trace(spec, n_train, n_eval, seed)
