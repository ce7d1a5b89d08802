"""The run directory: one run at a time, a fresh run only where it cannot overwrite anything, and checkpoints
that cannot run code, are verified on resume, and survive the loss of the newest one.

Layout of ``<out>``::

    .slice-kernels.lock                 flock held by the run using the directory (runner.lock); removed at its end
    checkpoints/run.json                the run's options and input fingerprint (runner.fingerprint), written once
    checkpoints/ckpt_<n>.safetensors    everything a resume needs after the n-th finished stage (runner.safe_state)
    checkpoints/latest.json             the newest checkpoint and the one before it, each with its sha256
    results.json, summary.md, ...       the outputs, once every method has finished

Rules:
- a fresh run takes a directory that does not exist or is empty, and nothing else (a finished run whose
  checkpoints were deleted, another program's results.json, the current directory via ``--out ''``);
- a resume reloads the newest checkpoint whose sha256 matches ``latest.json``; when the newest is truncated,
  corrupt or missing it falls back to the one before (that stage is recomputed: every stage is seeded, so the
  results are the same); names in ``latest.json`` must be plain ``ckpt_<n>.safetensors`` files of the
  checkpoint directory, anything else is refused before a byte is read;
- a fresh run that fails before its first checkpoint removes what it wrote, so the corrected command can
  reuse the same ``--out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re

import numpy as np
import torch

from . import safe_state
from .errors import ResumeError
from .files import StorageError, atomic_json, atomic_write_bytes, remove_stale_temps
from .fingerprint import differences
from .lock import LOCK_NAME, RunDirLock

FORMAT = 2  # 1: pickled ckpt_<n>.pt (slice-kernels 0.1), not loaded any more: unpickling can run code
_CKPT = re.compile(r"ckpt_\d{4,}\.safetensors")
_KEEP = 2  # the newest checkpoint and its predecessor


def ckpt_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def check_out(out) -> None:
    """Refuse an ``--out`` that cannot be a run directory, before anything is loaded."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ResumeError(
            f"--out {out!r} names no directory (an empty name would write into the current directory); pass "
            f"a new or empty directory, e.g. --out runs/my_run"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ResumeError(f"--out {str(out)!r} is a file, not a directory; pass a new or empty directory")


class RunDirectory:
    """A run's claim on ``out``: ``open`` locks it and checks or starts the run, ``save`` checkpoints, ``close``
    releases it (undoing a fresh start that failed before its first checkpoint). Only rank 0 owns the
    directory; other ranks read the checkpoint rank 0 chose (``read``)."""

    def __init__(self, out: str, log=print):
        self.out = os.fspath(out)
        self.dir = ckpt_dir(self.out)
        self.log = log
        self.lock = RunDirLock(self.out)
        self.created_out = False
        self.started_fresh = False
        self.saved = False

    # --- opening -------------------------------------------------------------------------------------------
    def open(self, fingerprint: dict, resume: bool) -> tuple[dict | None, str | None]:
        """Lock the directory and check it; return (state of the newest usable checkpoint, its file name) when
        resuming, (None, None) for a fresh run or a resume of a run killed before its first checkpoint."""
        check_out(self.out)
        if resume and not os.path.isfile(os.path.join(self.dir, "run.json")):
            raise ResumeError(
                f"--resume: {self.out!r} holds no run to resume ({os.path.join(self.dir, 'run.json')} is missing); "
                f"drop --resume to start one"
            )
        if not resume:
            parent = os.path.dirname(os.path.abspath(self.out))
            os.makedirs(parent, exist_ok=True)
            try:
                os.mkdir(self.out)
                self.created_out = True
            except FileExistsError:
                pass
        self.lock.acquire()
        try:
            if self.lock.stale_holder:
                h = self.lock.stale_holder
                self.log(
                    f"[runner] {self.out}: took over the lock left by a run that ended without releasing it "
                    f"(pid {h.get('pid')} on {h.get('host')}, started {h.get('started')})"
                )
            if not resume:
                self._start(fingerprint)
                return None, None
            for d in (self.out, self.dir):  # the run is ours (run.json): its writers' leftovers may go
                for name in remove_stale_temps(d):
                    self.log(f"[runner] removed {os.path.join(d, name)}, a partial file of a killed run")
            return self._resume(fingerprint)
        except BaseException:
            self.close(failed=True)
            raise

    def _start(self, fingerprint: dict) -> None:
        entries = sorted(e for e in os.listdir(self.out) if e != LOCK_NAME)
        if os.path.isfile(os.path.join(self.dir, "run.json")):
            raise ResumeError(
                f"{self.out!r} already holds a run (found {os.path.join(self.dir, 'run.json')}); pass --resume to "
                f"continue it, or choose another --out. Nothing was changed."
            )
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ResumeError(
                f"{self.out!r} is not empty (it holds {shown}); a fresh run writes only into a new or empty "
                f"directory, so that no earlier results are overwritten: choose another --out. Nothing was changed."
            )
        os.makedirs(self.dir, exist_ok=True)
        self.started_fresh = True
        with self._advice():
            atomic_json(os.path.join(self.dir, "run.json"), dict(fingerprint, format=FORMAT))

    @contextlib.contextmanager
    def _advice(self):
        """Complete a StorageError with what to do next, which depends on whether a checkpoint exists yet."""
        try:
            yield
        except StorageError as e:
            if self.saved or not self.started_fresh:
                latest = self._latest() or {}
                what = f"then continue with --resume from the last complete checkpoint ({latest.get('file')}, after "
                what += f"{latest.get('method')} stage {latest.get('stage')})"
            else:
                what = "then rerun the same command: no stage was checkpointed yet, so the run starts over"
            raise StorageError(f"{e}, {what}.") from e.__cause__

    def _resume(self, fingerprint: dict) -> tuple[dict | None, str | None]:
        run_json = os.path.join(self.dir, "run.json")
        try:
            with open(run_json, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ResumeError(f"--resume: {run_json} cannot be read ({e}); this run cannot be resumed") from None
        if not isinstance(saved, dict) or "format" not in saved:
            raise ResumeError(
                f"--resume: the run in {self.out!r} was written by slice-kernels 0.1, whose pickled checkpoints this "
                f"version does not load (unpickling a file can run code); finish it with 0.1 or start a fresh run "
                f"in another --out. Nothing was changed."
            )
        if saved["format"] != FORMAT:
            raise ResumeError(
                f"--resume: the run in {self.out!r} has checkpoint format {saved['format']!r}; this version of "
                f"slice-kernels reads format {FORMAT}. Resume it with the version that started it, or start a fresh "
                f"run in another --out. Nothing was changed."
            )
        # compared as stored: a tuple given through the API is a list in run.json
        diff = differences({k: v for k, v in saved.items() if k != "format"}, json.loads(json.dumps(fingerprint)))
        if diff:
            raise ResumeError(
                f"--resume: the run in {self.out!r} was made with a different configuration or different inputs "
                f"({'; '.join(diff[:6])}{'; …' if len(diff) > 6 else ''}). Rerun with the same options and files, "
                f"on the same kind of device and with the same SLICE_KERNELS_BACKEND, to continue it, or choose "
                f"another --out for the new ones. Nothing was changed."
            )
        entries = self._entries()
        if not entries:
            return None, None  # killed before the first stage finished: start over in the same directory
        latest = entries[0]
        for e in entries:  # names first: a tampered latest.json is refused before any file is opened
            self._path(e)
        problems = []
        for e in entries:
            try:
                state = self.read(e)
            except ResumeError as err:
                problems.append(str(err))
                continue
            if e is not latest:
                self.log(
                    f"[runner] {problems[0]}; resuming from the checkpoint before it ({e['file']}, after "
                    f"{e.get('method')} stage {e.get('stage')}): the stage after it is computed again"
                )
            return state, e["file"]
        raise ResumeError(
            f"--resume: no usable checkpoint in {self.dir} ({'; '.join(problems)}); the finished stages cannot be "
            f"recovered: start a fresh run in another --out (or delete this one). Nothing was changed."
        )

    def _latest(self) -> dict | None:
        path = os.path.join(self.dir, "latest.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                latest = json.load(f)
            if not isinstance(latest, dict) or not isinstance(latest.get("file"), str):
                raise ValueError("no 'file' entry")
        except (OSError, ValueError) as e:
            raise ResumeError(
                f"--resume: {path} cannot be read ({e}); it names the run's checkpoints, so the run cannot be "
                f"resumed: start a fresh run in another --out"
            ) from None
        return latest

    def _path(self, entry) -> str:
        """The checkpoint file an entry of latest.json names, confined to the checkpoint directory."""
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _CKPT.fullmatch(name) or not isinstance(entry.get("sha256"), str):
            raise ResumeError(
                f"--resume: {os.path.join(self.dir, 'latest.json')} names {name!r}, not a checkpoint of this run "
                f"(expected ckpt_<n>.safetensors with its sha256); it was edited, so the run is not resumed. "
                f"Nothing was read."
            )
        path = os.path.join(self.dir, name)
        if os.path.realpath(os.path.dirname(os.path.realpath(path))) != os.path.realpath(self.dir):
            raise ResumeError(
                f"--resume: checkpoint {path} is a link out of the run directory; it is not followed. Nothing was read."
            )
        return path

    def read(self, entry) -> dict:
        """The state in the checkpoint ``entry`` (a latest.json entry, or a file name chosen by rank 0)."""
        if isinstance(entry, str):  # the name rank 0 chose: it must still be an entry of latest.json
            named = [e for e in self._entries() if e.get("file") == entry]
            if not named:
                raise ResumeError(f"checkpoint {entry} is no longer named in {os.path.join(self.dir, 'latest.json')}")
            entry = named[0]
        path = self._path(entry)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ResumeError(f"checkpoint {entry['file']} is missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ResumeError(
                f"checkpoint {entry['file']} does not match its checksum ({len(data)} bytes; truncated or changed)"
            )
        try:
            state = safe_state.loads(data, path)
        except safe_state.StateFormatError as e:
            raise ResumeError(str(e)) from None
        if not isinstance(state, dict) or state.get("index") != entry.get("index"):
            raise ResumeError(f"checkpoint {entry['file']} does not hold checkpoint {entry.get('index')}")
        return state

    def newest(self) -> dict | None:
        """The state of the newest checkpoint, verified (read-only, no lock: for inspecting a run); None when
        the run has not finished a stage."""
        latest = self._latest()
        return None if latest is None else self.read(latest)

    def _entries(self) -> list[dict]:
        latest = self._latest()
        return [] if latest is None else [latest] + ([latest["previous"]] if latest.get("previous") else [])

    # --- writing -------------------------------------------------------------------------------------------
    def save(self, index: int, payload: dict) -> None:
        payload = dict(payload, index=index, rng=rng_state())
        data = safe_state.dumps(payload)
        name = f"ckpt_{index:04d}.safetensors"
        with self._advice():
            atomic_write_bytes(os.path.join(self.dir, name), data)
        latest = self._latest()
        previous = None
        if latest is not None:
            # after a fallback the stage is recomputed under the same name: its predecessor stays the previous one
            previous = latest if latest["file"] != name else latest.get("previous")
            previous = {k: v for k, v in previous.items() if k != "previous"} if previous else None
        entry = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "index": index}
        entry.update(method=payload.get("method"), stage=payload.get("stage"), previous=previous)
        with self._advice():
            atomic_json(os.path.join(self.dir, "latest.json"), entry)
        self.saved = True
        keep = {name} | ({previous["file"]} if previous else set())
        for old in os.listdir(self.dir):  # only after latest.json points at the new one
            if _CKPT.fullmatch(old) and old not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.dir, old))

    def drop_fallback(self) -> None:
        """Once the outputs are written the run needs no fallback: delete the checkpoint before the last (for a
        SmolLM2 run it holds 425 MB of weights; the last one, after the final stage, holds none)."""
        latest = self._latest()
        if latest is None or not latest.get("previous"):
            return
        old = latest["previous"]["file"]
        atomic_json(os.path.join(self.dir, "latest.json"), dict(latest, previous=None))
        if _CKPT.fullmatch(old):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, old))

    # --- closing -------------------------------------------------------------------------------------------
    def close(self, failed: bool) -> None:
        """Release the directory; a fresh start that failed before its first checkpoint removes what it wrote
        (run.json, the checkpoint directory if it is then empty, ``out`` if this run created it)."""
        try:
            if failed and self.started_fresh and not self.saved:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.dir, "run.json"))
                with contextlib.suppress(OSError):
                    os.rmdir(self.dir)  # only if empty: anything else in it is not ours to delete
        finally:
            self.lock.release()
        if failed and self.created_out and not self.saved:
            with contextlib.suppress(OSError):
                os.rmdir(self.out)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
