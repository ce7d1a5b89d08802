"""Errors of the continual-learning runner. Each is a ``SliceKernelsError`` and a ``ValueError``; the CLI prints
their message and exits with status 2."""

from __future__ import annotations

from ..errors import SliceKernelsError


class RunnerError(SliceKernelsError, ValueError):
    """A run option, task, model or run directory the runner cannot use."""


class TaskError(RunnerError):
    """A task spec or task file is bad; the message names it and what to do."""


class ModelError(RunnerError):
    """The model argument does not name a usable local causal LM."""


class ResumeError(RunnerError):
    """``--resume`` (or a fresh run) does not fit what is in the output directory."""
