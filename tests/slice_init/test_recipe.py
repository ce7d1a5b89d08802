"""Smoke test of the copyable recipe python/slice_init_peft.py (run in-process: same code path as the CLI,
without paying the interpreter start-up and imports twice)."""

import importlib.util
import os
import pathlib

import pytest

RECIPE = pathlib.Path(__file__).resolve().parents[2] / "python" / "slice_init_peft.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("slice_init_peft", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["slice"])
def test_recipe_runs_and_round_trips(method, tmp_path):
    summary = load_recipe().main(
        ["--method", method, "--steps", "2", "--train-steps", "3", "--rank", "4", "--out", str(tmp_path)]
    )
    assert summary["max_abs_diff_reloaded"] < 1e-4 and summary["max_abs_diff_merged"] < 1e-4
    assert os.path.isfile(tmp_path / "lora" / "adapter_config.json")
    assert os.path.isfile(tmp_path / "slice_init" / "adapter_model.safetensors")
