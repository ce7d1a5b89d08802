"""get_slice_model and accelerate's / DDP's wrapping, two gloo ranks on CPU: a DDP-wrapped model is refused on
every rank with the order that works (instead of DDP's "Expected to have finished reduction" error), and that
order — the init on the plain model, then DDP — trains with the LoRA gradients all-reduced."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from slice_kernels import SliceInitError
from slice_kernels.wrappers import data_parallel_wrapper, refuse_wrapped_model
from tests.helpers import lm_batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _worker(rank, world, store, outdir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        from slice_kernels import SliceConfig, get_slice_model

        cfg = LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS)
        slice_cfg = SliceConfig(method="lora_ga", current_steps=2)
        batches = lm_batches(3, seed=10 + rank)
        model = tiny_llama()
        try:
            get_slice_model(nn.parallel.DistributedDataParallel(model), cfg, slice_cfg, current=batches)
            refused = ""
        except SliceInitError as e:
            refused = str(e)
        untouched = not any(isinstance(m, LoraLayer) for m in model.modules())

        pm = get_slice_model(model, cfg, slice_cfg, current=batches)  # the order that works
        pm(**batches[2]).loss.backward()  # this rank's own gradient, without DDP, for the check of the mean
        local = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        pm.zero_grad(set_to_none=True)
        ddp = nn.parallel.DistributedDataParallel(pm)
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        ddp(**batches[2]).loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        opt.step()
        out = {"refused": refused, "untouched": untouched, "grads": grads, "local": local}
        torch.save(out, os.path.join(outdir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_model_is_refused_and_init_before_ddp_trains(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    for r in (r0, r1):
        assert "call get_slice_model before accelerator.prepare(model)" in r["refused"]
        assert "DistributedDataParallel" in r["refused"] and r["untouched"]
    assert r0["grads"].keys() == r1["grads"].keys() and any("lora_A" in k for k in r0["grads"])
    for k in r0["grads"]:  # DDP averaged every LoRA gradient over the two ranks' different batches
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k
        mean = (r0["local"][k] + r1["local"][k]) / 2
        torch.testing.assert_close(r0["grads"][k], mean, rtol=1e-5, atol=1e-7, msg=k)
        assert not torch.allclose(r0["local"][k], r1["local"][k])  # the batches differ, so the mean is a test


def test_wrappers_are_found_at_any_depth():
    model = tiny_llama()
    assert data_parallel_wrapper(model) is None
    refuse_wrapped_model(model)  # a plain model passes
    wrapped = nn.Sequential(nn.DataParallel(nn.Linear(2, 2)))
    assert data_parallel_wrapper(wrapped) == "DataParallel"

    class DeepSpeedEngine(nn.Module):  # recognized by name, DeepSpeed need not be installed
        pass

    with pytest.raises(SliceInitError, match="wrapped in DeepSpeedEngine"):
        refuse_wrapped_model(DeepSpeedEngine(), "collect_gradients")


def test_collecting_on_a_wrapped_model_is_refused_before_any_backward():
    from slice_kernels.slice_init.collect import collect_gradients, collect_replay_gradients

    model = tiny_llama()
    wrapped = nn.DataParallel(model)  # on CPU it only forwards; the refusal must come before that
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(SliceInitError, match="collect_gradients got a model wrapped in DataParallel"):
        collect_gradients(wrapped, ["q_proj"], [batch], 1)
    with pytest.raises(SliceInitError, match="collect_replay_gradients got a model wrapped in DataParallel"):
        collect_replay_gradients(wrapped, ["q_proj"], [[batch]], 1)
    assert all(p.grad is None for p in model.parameters())
