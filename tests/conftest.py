"""pytest set-up for the whole suite: hooks and fixtures only (the shared helpers are in tests/helpers/).

Triton kernels run on CPU tensors only in the interpreter, and the interpreter is chosen when a kernel is
decorated, so TRITON_INTERPRET must be set before slice_kernels (or triton) is imported: this file is the
first thing pytest imports, before any test module and before tests/helpers.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import slice_kernels  # noqa: E402,F401
from tests.helpers import HAS_CUDA, HAS_REASONING_GYM  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run benches/gpu_all.sh on a GPU machine")
    skip_rg = pytest.mark.skip(reason="needs reasoning-gym for its tasks: pip install reasoning-gym")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "reasoning_gym" in item.keywords and not HAS_REASONING_GYM:
            item.add_marker(skip_rg)
