"""Smoke tests of the recipes python/trl_sft.py, python/accelerate_init.py (1 and 2 processes) and
python/gorp_trainer.py, run with tiny settings."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not HAS_TRL, reason="trl / datasets not installed: pip install -c constraints.txt trl")
def test_trl_recipe_trains_the_slice_model_and_round_trips(tmp_path):
    mod = load_recipe("trl_sft")
    summary = mod.main(["--steps", "2", "--train-steps", "2", "--out", str(tmp_path)])
    assert summary["max_abs_diff_reloaded"] < 1e-4
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "slice_init" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not HAS_TRL, reason="trl / datasets not installed: pip install -c constraints.txt trl")
def test_trl_init_batches_carry_sfttrainers_completion_only_labels(tmp_path):
    from trl import SFTConfig, SFTTrainer

    mod = load_recipe("trl_sft")
    model, tok = mod.load(None)
    ds = mod.addition_dataset(8)
    cfg = SFTConfig(
        output_dir=str(tmp_path), completion_only_loss=True, per_device_train_batch_size=8, report_to=[], use_cpu=True
    )
    batch = next(iter(SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok).get_train_dataloader()))
    by_ids = {tuple(tok(r["prompt"])["input_ids"]): r for r in ds}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        prompt = next(p for p in by_ids if tuple(ids[: len(p)].tolist()) == p)
        assert (labels[: len(prompt)] == -100).all()  # the prompt is out of the loss
        assert torch.equal(labels[len(prompt) : n], ids[len(prompt) : n])  # the completion (and eos) is in it
        assert (labels[n:] == -100).all()


def test_accelerate_recipe_in_one_process(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # a Trainer of an earlier test left its (bf16) state in the singleton
    summary = load_recipe("accelerate_init").main(["--train-steps", "2", "--out", str(tmp_path)])
    assert summary["processes"] == 1 and summary["max_abs_diff_reloaded"] < 1e-4


@pytest.mark.slow
def test_accelerate_recipe_in_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "python" / "accelerate_init.py"), "--train-steps", "2", "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"summary_rank{r}.json").read_text()) for r in range(2))
    assert r0["processes"] == r1["processes"] == 2
    assert r0["lora_A_sum"] == r1["lora_A_sum"]  # the same adapter on both ranks after DDP training
    assert r0["max_abs_diff_reloaded"] < 1e-4


def _exported(out):
    from safetensors.torch import load_file

    d = pathlib.Path(out) / "export"
    return {**load_file(d / "gorp_full_rank.safetensors"), **load_file(d / "adapter_model.safetensors")}


@pytest.mark.parametrize("idiom", ["optimizers", "create_optimizer"])
def test_gorp_trainer_recipe_resumed_run_equals_the_uninterrupted_one(idiom, tmp_path):
    mod = load_recipe("gorp_trainer")
    base = ["--steps", "4", "--save-steps", "2", "--idiom", idiom]
    resumed = mod.main(base + ["--interrupt-at", "2", "--out", str(tmp_path / "resumed")])
    straight = mod.main(base + ["--interrupt-at", "0", "--out", str(tmp_path / "straight")])
    assert resumed["global_step"] == straight["global_step"] == 4
    assert resumed["max_abs_diff_exported"] < 1e-6
    a, b = _exported(resumed["out"]), _exported(straight["out"])
    assert a.keys() == b.keys() and any("gate_proj" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
