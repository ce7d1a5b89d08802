"""Smoke test of the copyable recipe python/continual_run.py on a tiny offline model (in-process)."""

import importlib.util
import json
import pathlib

import pytest

from tests.helpers.runner_tiny import save_tiny_llama

RECIPE = pathlib.Path(__file__).resolve().parents[2] / "python" / "continual_run.py"
pytestmark = pytest.mark.slow


@pytest.mark.reasoning_gym
def test_recipe_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("continual_run", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = save_tiny_llama(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    res = mod.main(
        ["--model", model, "--out", str(out), "--steps", "1", "--rank", "2", "--n-eval", "2", "--methods", "slice_c0.5"]
    )
    assert list(res["methods"]) == ["slice_c0.5"]
    assert res["tasks"][2] == "capitals" and res["scorers"]["capitals"] == "exact"
    assert json.load(open(out / "results.json"))["methods"]["slice_c0.5"]["R"][2][2] is not None
