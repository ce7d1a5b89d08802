"""The run directory as a hostile tester attacks it: concurrent starts, kills at a checkpoint boundary, corrupt,
truncated, deleted and tampered checkpoints, a full disk, changed inputs, and directories that are not the run's.

Every case either recovers exactly (the results equal an uninterrupted run's) or is refused with a message
naming what is wrong, changing nothing. The runs use a 2-layer Llama saved to disk: about a second each."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from slice_kernels.runner import checkpoint as ckpt
from slice_kernels.runner import files, run
from slice_kernels.runner.errors import ResumeError
from slice_kernels.runner.files import StorageError
from slice_kernels.runner.lock import LOCK_NAME, RunDirBusyError, RunDirLock
from slice_kernels.runner.safe_state import StateFormatError, dumps, loads
from tests.helpers.runner_tiny import addition_tasks, save_tiny_llama, tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return save_tiny_llama(str(d / "tiny")), addition_tasks(str(d))


def _cfg(inputs, **kw):
    return tiny_run_config(*inputs, **{"methods": ["lora", "slice"], "conflict_threshold": 1.0, **kw})


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """results.json of the uninterrupted run every recovery must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(_cfg(inputs), str(out), **QUIET)
    return json.load(open(out / "results.json"))


def _tree(d) -> dict:
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _latest(out) -> dict:
    return json.load(open(os.path.join(out, "checkpoints", "latest.json")))


def _results(out) -> dict:
    return json.load(open(os.path.join(out, "results.json")))


# --- the format -----------------------------------------------------------------------------------------------


def test_safe_state_round_trips_what_a_checkpoint_holds():
    import random

    import numpy as np

    w = torch.randn(5, 7)
    tree = {
        "view": w[1:3, 2:],
        "whole": w,  # shares memory with the view: stored twice, loaded as two tensors
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "scalar_array": np.array(2.5, dtype=np.float32),  # 0-d stays 0-d
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        3: ("int key", None, True, 2**70, 0.1, float("inf")),
        "__tensor__": "a real key that looks like a marker",
    }
    back = loads(dumps(tree), "t")
    assert torch.equal(back["view"], w[1:3, 2:]) and torch.equal(back["whole"], w)
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], tree["bf16"])
    assert back["empty"].shape == (0, 4)
    assert back["scalar_array"].shape == () and back["scalar_array"].dtype == np.float32
    assert back[3] == tree[3] and back["__tensor__"] == tree["__tensor__"]
    assert back["rng"]["python"] == random.getstate()
    np_state = back["rng"]["numpy"]
    assert np_state[1].dtype == np.random.get_state()[1].dtype and (np_state[1] == np.random.get_state()[1]).all()
    np.random.set_state(np_state)  # what set_rng_state does on resume


def test_safe_state_refuses_objects_it_cannot_store_naming_where():
    class Custom:
        pass

    with pytest.raises(StateFormatError, match=r"checkpoint\['current'\]\['state'\]\['opt'\] is a .*Custom"):
        dumps({"current": {"state": {"opt": Custom()}}})


def test_a_pickle_planted_as_a_checkpoint_is_refused_without_running_it(inputs, tmp_path):
    """A run directory from someone else: the checkpoint is a pickle whose unpickling would run code, with a
    matching checksum in latest.json. The old loader (torch.load, weights_only=False) ran it; now it is data."""
    out = tmp_path / "run"
    run(_cfg(inputs), str(out), stop_after=1, **QUIET)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = out / "checkpoints" / _latest(out)["file"]
    torch.save({"index": 1, "x": Payload()}, str(path))
    latest = _latest(out)
    latest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "checkpoints" / "latest.json").write_text(json.dumps(latest))
    with pytest.raises(ResumeError, match="no usable checkpoint.*is not a slice-kernels checkpoint"):
        run(_cfg(inputs), str(out), resume=True, **QUIET)
    assert not marker.exists()


# --- the lock and the fresh-run rules ------------------------------------------------------------------------

_HOLD = """
import sys, time
from slice_kernels.runner.lock import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(directory):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_run_into_a_directory_another_run_holds_is_refused_touching_nothing(inputs, tmp_path):
    """The audit's case: a second fresh run started into the same --out while the first has written run.json
    but no checkpoint. Its cleanup used to delete the first run's run.json and checkpoints."""
    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out)
    try:
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "run.json").write_text("{}")  # the first run's, no checkpoint yet
        before = _tree(out)
        for resume in (False, True):
            with pytest.raises(RunDirBusyError, match=rf"is in use by another run \(pid {holder.pid} on .*Nothing"):
                run(_cfg(inputs), str(out), resume=resume, **QUIET)
            assert _tree(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_reported(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # SIGKILL ran no cleanup: the file stays, the flock is gone
    lock = RunDirLock(str(tmp_path)).acquire()
    try:
        assert lock.stale_holder["pid"] == holder.pid
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()}"):
            RunDirLock(str(tmp_path)).acquire()  # and now it is ours: a second taker is refused
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


_RUN = """
import json, sys
from slice_kernels.runner import make_config, run
from slice_kernels.runner.errors import RunnerError
try:
    run(make_config("default", **json.loads(sys.argv[2])), sys.argv[1], progress=False, log=lambda *a: None)
except RunnerError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def _cfg_json(inputs) -> str:
    return json.dumps({k: v for k, v in _cfg(inputs).to_dict().items() if k != "profile"})


def test_two_runs_started_at_once_into_one_directory(inputs, reference, tmp_path):
    """Two processes at the same moment: one runs to the end, the other is refused and changes nothing."""
    out = tmp_path / "run"
    argv = [sys.executable, "-c", _RUN, str(out), _cfg_json(inputs)]
    procs = [subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes, errs = zip(*[(p.wait(timeout=300), p.stderr.read()) for p in procs])
    assert sorted(codes) == [0, 2], errs
    loser = errs[codes.index(2)]
    assert "is in use by another run" in loser or "already holds a run" in loser, loser
    assert _results(out)["methods"] == reference["methods"]
    assert not (out / LOCK_NAME).exists()


def test_a_symlink_at_the_lock_path_is_refused_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / LOCK_NAME)
    with pytest.raises(ResumeError, match="cannot open the lock file .*not a link"):
        RunDirLock(str(tmp_path / "run")).acquire()
    assert target.read_text() == "keep me"


def test_a_fresh_run_refuses_a_directory_it_did_not_make(inputs, tmp_path):
    """A finished run whose checkpoints were deleted, another program's results.json: used to be overwritten."""
    out = tmp_path / "finished"
    run(_cfg(inputs), str(out), **QUIET)
    for name in os.listdir(out / "checkpoints"):
        os.remove(out / "checkpoints" / name)
    os.rmdir(out / "checkpoints")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"mine": 1}')
    (foreign / "results.json.tmp12").write_text("a name like a killed writer's temp file: still not ours")
    (foreign / "notes.tmp1").write_text("mine too")
    for d in (out, foreign):
        before = _tree(d)
        with pytest.raises(ResumeError, match=r"is not empty \(it holds .*results\.json.*Nothing was changed"):
            run(_cfg(inputs), str(d), **QUIET)
        assert _tree(d) == before
    with pytest.raises(ResumeError, match="names no directory"):
        run(_cfg(inputs), "", **QUIET)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ResumeError, match="is a file, not a directory"):
        run(_cfg(inputs), str(tmp_path / "a_file"), **QUIET)
    empty = tmp_path / "empty"
    empty.mkdir()
    run(_cfg(inputs, methods=["lora"]), str(empty), **QUIET)  # an empty directory is fine
    assert (empty / "results.json").exists() and not (empty / LOCK_NAME).exists()


def test_cli_refuses_an_empty_out(capsys):
    from slice_kernels.runner.cli import main

    assert main(["run", "--out", ""]) == 2
    assert "--out '' names no directory" in capsys.readouterr().err


# --- checkpoints: integrity and recovery ---------------------------------------------------------------------


def _stopped(inputs, tmp_path, stop):
    out = tmp_path / "run"
    run(_cfg(inputs), str(out), stop_after=stop, **QUIET)
    return out


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(inputs, reference, tmp_path, damage):
    out = _stopped(inputs, tmp_path, 4)  # lora done (3 stages), slice stage 1
    newest = out / "checkpoints" / _latest(out)["file"]
    assert _latest(out)["previous"]["index"] == 3
    {"flip": _flip, "truncate": lambda p: p.write_bytes(p.read_bytes()[:1000]), "delete": os.remove}[damage](newest)
    logs = []
    run(_cfg(inputs), str(out), resume=True, progress=False, log=logs.append)
    why = {"flip": "does not match its checksum", "truncate": "does not match its checksum", "delete": "is missing"}
    assert any(why[damage] in m and "resuming from the checkpoint before it (ckpt_0003" in m for m in logs), logs
    assert _results(out)["methods"] == reference["methods"]


def test_no_usable_checkpoint_is_a_clear_error_changing_nothing(inputs, tmp_path):
    out = _stopped(inputs, tmp_path, 2)
    for e in (_latest(out), _latest(out)["previous"]):
        _flip(out / "checkpoints" / e["file"])
    before = _tree(out)
    with pytest.raises(ResumeError, match=r"no usable checkpoint .*ckpt_0002.*checksum.*ckpt_0001.*checksum"):
        run(_cfg(inputs), str(out), resume=True, **QUIET)
    assert _tree(out) == before


@pytest.mark.parametrize("name", ["../../outside.safetensors", "/etc/passwd", "ckpt_0001.pt", "link"])
def test_a_latest_json_naming_a_file_outside_the_run_is_refused_before_reading(inputs, tmp_path, name):
    out = _stopped(inputs, tmp_path, 1)
    latest = _latest(out)
    if name == "link":  # a well-formed name that is a symlink out of the run directory
        target = tmp_path / "outside.safetensors"
        os.replace(out / "checkpoints" / latest["file"], target)
        os.symlink(target, out / "checkpoints" / latest["file"])
        match = "is a link out of the run directory"
    else:
        latest["file"] = name
        (out / "checkpoints" / "latest.json").write_text(json.dumps(latest))
        match = "not a checkpoint of this run"
    with pytest.raises(ResumeError, match=match):
        run(_cfg(inputs), str(out), resume=True, **QUIET)


def test_a_garbled_latest_json_is_a_clear_error(inputs, tmp_path):
    out = _stopped(inputs, tmp_path, 1)
    (out / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(ResumeError, match=r"latest\.json cannot be read"):
        run(_cfg(inputs), str(out), resume=True, **QUIET)


_KILL_AT_BOUNDARY = """
import json, os, signal, sys
from slice_kernels.runner import checkpoint, make_config, run
real = checkpoint.atomic_json
def atomic_json(path, obj):
    if path.endswith("latest.json") and obj["index"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # ckpt_0002 is on disk, latest.json still names ckpt_0001
    real(path, obj)
checkpoint.atomic_json = atomic_json
run(make_config("default", **json.loads(sys.argv[2])), sys.argv[1], progress=False, log=lambda *a: None)
"""


def test_killed_between_writing_a_checkpoint_and_naming_it(inputs, reference, tmp_path):
    """SIGKILL at the checkpoint boundary: the new file is complete but unnamed; the resume continues from the
    named one, removes the partial state, and ends with the uninterrupted run's results."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _KILL_AT_BOUNDARY, str(out), _cfg_json(inputs)], cwd=ROOT, timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert _latest(out)["index"] == 1 and (out / "checkpoints" / "ckpt_0002.safetensors").exists()
    assert (out / LOCK_NAME).exists()  # the killed run's lock file, no longer locked
    (out / "checkpoints" / "ckpt_0003.safetensors.tmp4242").write_bytes(b"partial")  # a killed writer's temp
    logs = []
    run(_cfg(inputs), str(out), resume=True, progress=False, log=logs.append)
    assert any("took over the lock left by a run" in m for m in logs)
    assert any("ckpt_0003.safetensors.tmp4242, a partial file of a killed run" in m for m in logs)
    assert _results(out)["methods"] == reference["methods"]
    # a finished run keeps only its last checkpoint (no weights in it): the fallback is dropped with the outputs
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_0006.safetensors", "latest.json", "run.json"]
    assert _latest(out)["previous"] is None


def test_a_full_disk_is_named_leaves_no_partial_file_and_the_run_resumes(inputs, reference, tmp_path, monkeypatch):
    real = files.write_file
    calls = {"n": 0}

    def full_disk(path, data):
        if path.endswith(".safetensors.tmp%d" % os.getpid()):
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint: half of it fits, then the disk is full
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(files, "write_file", full_disk)
    out = tmp_path / "run"
    where = re.escape(repr(str(out / "checkpoints")))
    with pytest.raises(StorageError, match=rf"no space left for the run in {where}.*--resume .*\(ckpt_0002"):
        run(_cfg(inputs), str(out), **QUIET)
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["ckpt_0001.safetensors", "ckpt_0002.safetensors", "latest.json", "run.json"]
    assert not (out / LOCK_NAME).exists()
    monkeypatch.setattr(files, "write_file", real)  # space freed
    run(_cfg(inputs), str(out), resume=True, **QUIET)
    assert _results(out)["methods"] == reference["methods"]


def test_an_error_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Any exception while the temporary file is written (here a Ctrl-C half-way) removes it before it propagates,
    and the file it was to replace is untouched."""
    (tmp_path / "x.json").write_text("old")

    def interrupted(path, data):
        with open(path, "wb") as f:
            f.write(data[:2])
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(str(tmp_path / "x.json"), b"new contents")
    assert os.listdir(tmp_path) == ["x.json"] and (tmp_path / "x.json").read_text() == "old"


def test_a_full_disk_before_the_first_checkpoint_says_to_rerun(inputs, tmp_path, monkeypatch):
    """Nothing checkpointed yet: the failed start is undone (run.json too), so the advice is to rerun the same
    command, not --resume (which would find no run)."""
    real = files.write_file

    def full_disk(path, data):
        if ".safetensors.tmp" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(files, "write_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(StorageError, match="then rerun the same command: no stage was checkpointed yet"):
        run(_cfg(inputs), str(out), **QUIET)
    assert not out.exists()
    monkeypatch.setattr(files, "write_file", real)
    run(_cfg(inputs, methods=["lora"]), str(out), **QUIET)


# --- what a resume depends on ----------------------------------------------------------------------------------


def _own_copy(inputs, tmp_path):
    import shutil

    model, tasks = inputs
    local = tmp_path / "inputs"
    local.mkdir()
    shutil.copytree(model, local / "tiny")
    return str(local / "tiny"), [shutil.copy(t, local) for t in tasks]


def _refused(cfg, out, match):
    before = _tree(out)
    with pytest.raises(ResumeError, match=match):
        run(cfg, str(out), resume=True, **QUIET)
    assert _tree(out) == before


def test_a_resume_with_changed_inputs_is_refused_naming_what_changed(inputs, tmp_path):
    import shutil

    mine = _own_copy(inputs, tmp_path)
    model, copies = mine
    out = tmp_path / "run"
    run(_cfg(mine), str(out), stop_after=1, **QUIET)
    saved_task = open(copies[1], "rb").read()
    with open(copies[1], "a") as f:  # an edited task file
        f.write(json.dumps({"prompt": "9+9=", "answer": "18"}) + "\n")
    _refused(
        _cfg(mine), out, rf"content of task file {re.escape(copies[1])}: saved sha256 \w{{12}}…, now sha256 \w{{12}}…"
    )
    open(copies[1], "wb").write(saved_task)
    weights = os.path.join(model, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-5] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    _refused(_cfg(mine), out, "content of model file model.safetensors")
    shutil.copy(os.path.join(inputs[0], "model.safetensors"), weights)
    # the same inputs as a tuple through the API (run.json stores lists): not a change
    cfg = _cfg(mine)
    cfg.tasks = tuple(cfg.tasks)
    run(cfg, str(out), resume=True, **QUIET)  # the original inputs back: the run continues
    assert _results(out)["methods"]["slice"]["R"][2][2] is not None


def test_a_resume_with_another_backend_is_refused(inputs, tmp_path, monkeypatch):
    from slice_kernels import dispatch

    if all(dispatch.select(op, "cpu")[0] == "torch" for op in dispatch.defined()):
        pytest.skip(
            "every op already dispatches to torch on this machine (no C++ extension): forcing torch changes nothing"
        )
    out = tmp_path / "run"
    run(_cfg(inputs), str(out), stop_after=1, **QUIET)
    monkeypatch.setenv("SLICE_KERNELS_BACKEND", "torch")
    _refused(
        _cfg(inputs),
        out,
        r"backend of op \w+ \(it follows the device and SLICE_KERNELS_BACKEND\): saved '\w+', now 'torch'",
    )
    monkeypatch.delenv("SLICE_KERNELS_BACKEND")
    run(_cfg(inputs), str(out), resume=True, **QUIET)


def test_run_json_records_versions_backends_and_hashes(inputs, tmp_path):
    out = tmp_path / "run"
    run(_cfg(inputs), str(out), stop_after=1, **QUIET)
    saved = json.load(open(out / "checkpoints" / "run.json"))
    assert saved["format"] == ckpt.FORMAT
    assert {"slice_kernels", "torch", "transformers", "peft"} <= set(saved["versions"])
    assert "reasoning_gym" not in saved["versions"]  # JSONL tasks only
    assert {"conflict_stats", "surgery", "magnitude_merge_factors"} <= set(saved["backends"])
    assert saved["task_files"] == {t: hashlib.sha256(open(t, "rb").read()).hexdigest() for t in inputs[1]}
    assert "model.safetensors" in saved["model_files"] and "config.json" in saved["model_files"]


def test_a_run_of_the_pickle_era_is_refused_with_the_reason(inputs, tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "run.json").write_text(json.dumps(_cfg(inputs).fingerprint()))
    (out / "checkpoints" / "ckpt_0001.pt").write_bytes(b"pickle")
    with pytest.raises(ResumeError, match="written by slice-kernels 0.1.*unpickling a file can run code"):
        run(_cfg(inputs), str(out), resume=True, **QUIET)


def test_ctrl_c_releases_the_lock_and_keeps_the_finished_stages(inputs, reference, tmp_path, monkeypatch):
    import importlib

    run_mod = importlib.import_module("slice_kernels.runner.run")

    real = run_mod._Run._run_stage
    stages = {"n": 0}

    def interrupted(self, *a, **kw):
        stages["n"] += 1
        if stages["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(run_mod._Run, "_run_stage", interrupted)
    out = tmp_path / "run"
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(inputs), str(out), **QUIET)
    assert time.time() - t0 < 120 and not (out / LOCK_NAME).exists()
    assert _latest(out)["index"] == 2
    monkeypatch.setattr(run_mod._Run, "_run_stage", real)
    run(_cfg(inputs), str(out), resume=True, **QUIET)
    assert _results(out)["methods"] == reference["methods"]
