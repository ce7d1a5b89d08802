"""Atomic run checkpoints under ``<out>/checkpoints/``.

Layout: ``run.json`` (the run's configuration fingerprint, written once), ``ckpt_<n>.pt`` (everything a
resume needs after the n-th finished stage) and ``latest.json`` pointing at the newest one. Every file is
written to a temporary name in the same directory, flushed, fsynced and renamed over the target, so a kill
at any moment leaves either the old or the new checkpoint, never a torn one. The previous ``ckpt_*.pt`` is
deleted only after ``latest.json`` points at its successor.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from .errors import ResumeError


def atomic_write_bytes(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(path: str, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def ckpt_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def prepare(out: str, fingerprint: dict, resume: bool) -> dict | None:
    """Check the output directory before any work; return the latest checkpoint when resuming.

    A fresh run refuses a directory that already holds a run (so no finished stage is overwritten); a resume
    refuses a directory whose run was made with a different configuration, naming the differing options.
    """
    d = ckpt_dir(out)
    run_json = os.path.join(d, "run.json")
    exists = os.path.isfile(run_json)
    if not resume:
        if exists:
            raise ResumeError(
                f"{out!r} already holds a run (found {run_json}); pass --resume to continue it, or choose "
                f"another --out. Nothing was changed."
            )
        os.makedirs(d, exist_ok=True)
        atomic_json(run_json, fingerprint)
        return None
    if not exists:
        raise ResumeError(
            f"--resume: {out!r} holds no run to resume ({run_json} is missing); drop --resume to start one"
        )
    with open(run_json) as f:
        old = json.load(f)
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        detail = "; ".join(f"{k}: saved {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff[:6])
        raise ResumeError(
            f"--resume: the run in {out!r} was made with a different configuration ({detail}). Rerun with the "
            f"same options to continue it, or choose another --out for the new configuration. Nothing was changed."
        )
    latest = os.path.join(d, "latest.json")
    if not os.path.isfile(latest):
        return None  # killed before the first stage finished: start over in the same directory
    with open(latest) as f:
        name = json.load(f)["file"]
    return torch.load(os.path.join(d, name), map_location="cpu", weights_only=False)


def discard_unstarted(out: str, remove_out: bool) -> None:
    """Undo what ``prepare`` wrote for a fresh run that failed before its first checkpoint.

    The failures that need the model (a target name matching no layer, a rank too large for a layer, a bad
    method option value) come after ``run.json`` is written; left there, it made the corrected rerun in the
    same ``--out`` fail with "already holds a run" (and ``--resume`` with "different configuration"). With no
    ``latest.json`` nothing was finished, so nothing is lost.
    """
    d = ckpt_dir(out)
    if os.path.exists(os.path.join(d, "latest.json")):
        return
    try:
        os.remove(os.path.join(d, "run.json"))
        os.rmdir(d)  # only if empty: anything else in it is not ours to delete
        if remove_out:
            os.rmdir(out)
    except OSError:
        pass


def save(out: str, index: int, payload: dict) -> None:
    d = ckpt_dir(out)
    name = f"ckpt_{index:04d}.pt"
    payload = dict(payload, rng=rng_state())
    atomic_write_bytes(os.path.join(d, name), lambda f: torch.save(payload, f))
    latest = os.path.join(d, "latest.json")
    old = None
    if os.path.isfile(latest):
        with open(latest) as f:
            old = json.load(f)["file"]
    atomic_json(latest, {"file": name, "index": index, "method": payload.get("method"), "stage": payload.get("stage")})
    if old and old != name:
        try:
            os.remove(os.path.join(d, old))
        except FileNotFoundError:
            pass


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
