"""Smoke test of the copyable recipe python/trainer_callback.py (run in-process, like the other recipe tests)."""

import importlib.util
import os
import pathlib

RECIPE = pathlib.Path(__file__).resolve().parents[2] / "python" / "trainer_callback.py"


def test_recipe_converted_adapters_reproduce_the_trained_model(tmp_path):
    spec = importlib.util.spec_from_file_location("trainer_callback_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(["--out", str(tmp_path), "--steps", "4"])
    assert summary["max_abs_diff_converted"] < 1e-4 and summary["max_abs_diff_convert_by_hand"] < 1e-4
    assert summary["training_moved_logits_by"] > 1e-3  # so the two checks above are not vacuous
    assert os.path.isfile(tmp_path / "checkpoint-2" / "converted" / "lora_for_original_base" / "adapter_config.json")
    assert os.path.isfile(tmp_path / "slice_init" / "adapter_model.safetensors")
