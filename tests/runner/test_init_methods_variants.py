"""The runner's init methods: ``lora_ga_peft`` is registered and runs, and a SLICE surgery variant given as a
method option (``--method-option``, ``make_config(method_options=...)``) reaches the init and its report.
Tiny runs on a saved 2-layer Llama with JSONL tasks, about a second each."""

from __future__ import annotations

import json

import pytest

from slice_kernels.runner import methods, run
from slice_kernels.runner.errors import RunnerError
from tests.helpers.runner_tiny import addition_tasks, save_tiny_llama, tiny_run_config

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return save_tiny_llama(str(d / "tiny")), addition_tasks(str(d))


def _cfg(inputs, **kw):
    return tiny_run_config(*inputs, **{"methods": ["slice"], **kw})


def _reports(out, method):
    return json.load(open(out / "results.json"))["methods"][method]["init_reports"]


def test_lora_ga_peft_is_listed():
    assert {"lora", "lora_ga", "lora_ga_peft", "slice", "loram"} <= set(methods.available())
    m = methods.get("lora_ga_peft")
    assert isinstance(m, methods.InitMethod) and m.init == "lora_ga_peft"


def test_tiny_run_with_lora_ga_peft(inputs, tmp_path):
    out = tmp_path / "run"
    res = run(_cfg(inputs, methods=["lora_ga_peft"]), str(out), **QUIET)
    reps = _reports(out, "lora_ga_peft")
    assert [r["stage"] for r in reps] == [1, 2, 3]
    assert all(r["init"] == "lora_ga_peft" and r["variant"]["direction"] == "ArB2r" for r in reps)
    assert all(not r["variant"]["applied"] for r in reps)  # the preset reads no replay gradient
    R = res["methods"]["lora_ga_peft"]["R"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)


def test_surgery_variant_option_reaches_the_init_report(inputs, tmp_path):
    out = tmp_path / "run"
    opts = {"add_retain_grad": True, "retain_batch_size": 2}
    run(_cfg(inputs, method_options=opts), str(out), **QUIET)
    reps = _reports(out, "slice")
    assert [r["variant"]["name"] for r in reps] == ["pcgrad+add_retain_grad"] * 3
    assert [r["variant"]["applied"] for r in reps] == [False, True, True]  # stage 1 has no replay
    # the buffer (replay_batches × grad_batch_size = 4 examples per task) re-batched at 2: 2 batches
    assert all(r["variant"]["replay_batch_size"] == 2 and r["variant"]["replay_steps"] == 2 for r in reps[1:])


def test_plain_difference_through_the_runner(inputs, tmp_path):
    out = tmp_path / "run"
    run(_cfg(inputs, method_options={"grad_project": False, "retain_scale": 0.5}), str(out), **QUIET)
    reps = _reports(out, "slice")
    assert reps[1]["variant"]["surgery"] == "difference" and reps[1]["gamma"] == -0.5


def test_bad_variant_combination_is_refused_before_the_run(inputs, tmp_path):
    with pytest.raises(Exception, match="projection_scope='per_module'"):
        _cfg(inputs, method_options={"per_layer_threshold": True})
    # larger than the 4-example buffer: refused before the model loads, nothing written
    cfg = _cfg(inputs, method_options={"retain_batch_size": 8})
    with pytest.raises(RunnerError, match=r"retain_batch_size=8 is larger than the replay buffer \(4 examples"):
        run(cfg, str(tmp_path / "run"), **QUIET)
    assert not (tmp_path / "run").exists()
    cfg = _cfg(inputs, method_options={"single_retain_task_mode": True}, grad_batches=2)
    with pytest.raises(RunnerError, match="set replay_batches ≥ grad_batches"):
        run(cfg, str(tmp_path / "run"), **QUIET)
    assert not (tmp_path / "run").exists()
