"""``slice-kernels study`` on the tiny Llama: the cells, the aggregate, a killed study resumed (finished cells
read back, never recomputed; the cell in flight continued from its checkpoint), and the refusals."""

import json
import os

import pytest

from slice_kernels.runner import study as study_mod
from slice_kernels.runner.cli import main
from slice_kernels.runner.errors import ResumeError
from tests.helpers.runner_tiny import addition_tasks, save_tiny_llama, tiny_run_config

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("study_inputs")
    return save_tiny_llama(str(d / "model")), addition_tasks(str(d), ks=(1, 2))


def config(inputs, **kw):
    model, tasks = inputs
    return tiny_run_config(model, tasks, **{"methods": ["lora", "slice"], "conflict_threshold": 1.0, **kw})


def quiet(*_):
    pass


def run_study(cfg, out, **kw):
    return study_mod.study(cfg, str(out), seeds=SEEDS, progress=False, log=quiet, n_boot=200, **kw)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("study_ref") / "s"
    return out, run_study(config(inputs), out)


def test_study_aggregates_every_cell(reference):
    out, res = reference
    assert [(g["method"], g["lr"], g["seeds"]) for g in res["groups"]] == [
        ("lora", 3e-4, SEEDS),
        ("slice", 3e-4, SEEDS),
    ]
    for g in res["groups"]:
        for m in ("AP", "FP", "Forgetting", "BWT"):
            v = g["metrics"][m]
            assert v["lo"] <= v["mean"] <= v["hi"] and len(v["per_seed"]) == 3
            assert v["mean"] == pytest.approx(sum(v["per_seed"]) / 3)
    # each cell is an ordinary run whose own results the aggregate reproduces
    cell = json.loads((out / "cells" / "slice" / "lr0.0003" / "seed1" / "results.json").read_text())
    assert res["groups"][1]["metrics"]["AP"]["per_seed"][1] == pytest.approx(cell["methods"]["slice"]["AP"])
    (cmp,) = res["comparisons"]
    assert (cmp["a"], cmp["b"], cmp["selection"]) == ("slice", "lora", "same lr")
    per = [
        x - y
        for x, y in zip(res["groups"][1]["metrics"]["AP"]["per_seed"], res["groups"][0]["metrics"]["AP"]["per_seed"])
    ]
    assert cmp["AP"]["per_seed"] == pytest.approx(per)
    # the surgery's activity: stage 1 has no replay; with τ = 1 every later stage projects
    surg = res["groups"][1]["surgery"]
    assert surg["stages"][0]["acted"] == 0 and surg["stages"][1]["seeds"] == 3
    for name in ("study.json", "summary.md", "plane.png", "R_mean.png", "surgery.png", "study_config.json"):
        assert (out / name).is_file(), name
    md = (out / "summary.md").read_text()
    assert "| slice − lora |" in md and "Surgery" in md


def test_killed_study_resumes_without_recomputing(inputs, reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "s"
    cfg = config(inputs)
    # killed in the 3rd cell after its first stage was checkpointed
    stopped = run_study(cfg, out, stop_after_cells=3, _stop_in_cell_after=1)
    assert stopped == {"stopped_after_cells": 2, "stopped_in": "lora lr 0.0003 seed 1"}
    done = [out / "cells" / "lora" / "lr0.0003" / "seed0", out / "cells" / "slice" / "lr0.0003" / "seed0"]
    stamps = {d: os.stat(d / "results.json").st_mtime_ns for d in done}
    in_flight = out / "cells" / "lora" / "lr0.0003" / "seed1"
    assert (in_flight / "checkpoints" / "run.json").is_file() and not (in_flight / "results.json").exists()
    with pytest.raises(ResumeError, match="not empty"):
        run_study(cfg, out)  # a fresh study refuses the directory; nothing changes
    lines = []
    res = study_mod.study(cfg, str(out), seeds=SEEDS, resume=True, progress=False, log=lines.append, n_boot=200)
    assert {d: os.stat(d / "results.json").st_mtime_ns for d in done} == stamps  # never recomputed
    assert sum("finished earlier" in str(x) for x in lines) == 2
    assert any("resuming after checkpoint 1" in str(x) for x in lines)  # the cell in flight continued
    assert res == ref
    assert json.loads((out / "study.json").read_text()) == json.loads((ref_out / "study.json").read_text())


def test_resume_refuses_other_settings(inputs, reference, tmp_path):
    ref_out, _ = reference
    before = sorted(p.name for p in ref_out.iterdir())
    with pytest.raises(ResumeError, match="other settings.*seeds"):
        study_mod.study(config(inputs), str(ref_out), seeds=[0, 1, 3], resume=True, progress=False, log=quiet)
    with pytest.raises(ResumeError, match="run.rank"):
        study_mod.study(config(inputs, rank=3), str(ref_out), seeds=SEEDS, resume=True, progress=False, log=quiet)
    assert sorted(p.name for p in ref_out.iterdir()) == before
    with pytest.raises(ResumeError, match="holds no study"):
        study_mod.study(config(inputs), str(tmp_path / "none"), seeds=SEEDS, resume=True, log=quiet)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(seeds=[0, 1]), "at least 3 seeds"),
        (dict(seeds=[0, 1, 1]), "repeat"),
        (dict(seeds=[0, 1, -2]), "≥ 0"),
        (dict(seeds=SEEDS, lr_grid={"loram": [1e-4]}), "not in --methods"),
        (dict(seeds=SEEDS, lr_grid=[1e-4, -1.0]), "positive finite"),
        (dict(seeds=SEEDS, lr_grid={"slice": []}), "non-empty"),
        (dict(seeds=SEEDS, n_boot=10), "at least 100"),
    ],
)
def test_bad_study_options_are_refused_before_anything_is_written(inputs, tmp_path, kw, msg):
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=msg):
        study_mod.study(config(inputs), str(out), progress=False, log=quiet, **kw)
    assert not out.exists()


def test_lr_grid_plans_cells_seed_major(inputs):
    cfg = config(inputs)
    cells = study_mod.plan_cells(cfg, SEEDS, {"slice": [1e-4, 3e-4]})
    assert [c.label() for c in cells[:3]] == [
        "lora lr 0.0003 seed 0",
        "slice lr 0.0001 seed 0",
        "slice lr 0.0003 seed 0",
    ]
    assert len(cells) == 9


def test_cli(capsys, inputs, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    assert "--seeds" in capsys.readouterr().out
    model, tasks = inputs
    common = ["study", "--model", model, "--tasks", ",".join(tasks), "--heldout", "", "--out", str(tmp_path / "s")]
    assert main(common + ["--seeds", "0,1"]) == 2
    assert "at least 3 seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--seeds 0,1,2"):
        main(common + ["--seed", "4"])
    with pytest.raises(SystemExit, match="not both"):
        main(common + ["--lr-grid", "1e-4", "--lr-grid", "slice=1e-3"])
    assert not (tmp_path / "s").exists()
