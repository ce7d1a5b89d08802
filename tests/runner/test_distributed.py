"""Data-parallel runner on two gloo processes on CPU: the sharded gradient collection equals one process
over all batches, and a whole run under torchrun finishes with rank 0 writing the results."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.runner_tiny import save_tiny_llama

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "down_proj"]


def _batches():
    from tests.helpers import lm_batches

    return lm_batches(4, batch=2, seq=8, vocab=128, seed=1)


def _worker(rank, world, model_dir, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from transformers import AutoModelForCausalLM

        from slice_kernels.runner.train import collect_gradients

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        g = collect_gradients(model, TARGETS, _batches(), progress=False)
        torch.save(g, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama_dp")))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_gradients_equal_single_process(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from slice_kernels.runner.train import collect_gradients

    mp.spawn(_worker, args=(2, tiny_dir, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = collect_gradients(AutoModelForCausalLM.from_pretrained(tiny_dir), TARGETS, _batches(), progress=False)
    g0, g1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for n in ref:
        assert torch.equal(g0[n], g1[n])  # every rank holds the same average
        # float32 sums in a different order (per rank, then all-reduced): relative error at float32 epsilon level
        torch.testing.assert_close(g0[n], ref[n], rtol=1e-5, atol=1e-7)


@pytest.mark.reasoning_gym
def test_torchrun_two_processes(tiny_dir, tmp_path):
    out = tmp_path / "dp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "slice_kernels",
        "run",
        "--model",
        tiny_dir,
        "--tasks",
        "basic_arithmetic,chain_sum",
        "--heldout",
        "letter_counting",
        "--methods",
        "slice",
        "--rank",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--n-train",
        "16",
        "--n-eval",
        "3",
        "--targets",
        "q_proj,v_proj",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["world_size"] == 2
    R = res["methods"]["slice"]["R"]
    assert len(R) == 2 and R[0][1] is None and R[1][0] is not None
    assert p.stdout.count("| method | AP | FP |") == 1  # rank 0 alone prints the summary
    # a resume under torchrun: rank 0 picks and verifies the checkpoint, rank 1 reads the one it named
    p = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(out / "results.json")) == res
    # a refusal on rank 0 reaches rank 1 too: both exit with the message instead of rank 1 waiting forever
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and p.stderr.count("already holds a run") == 2, p.stderr[-3000:]


def _torchrun(args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    return subprocess.run(cmd + ["slice_kernels", "run", *args], capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.reasoning_gym
def test_torchrun_fsdp_runs_the_stage_sharded_and_matches_data_parallel(tiny_dir, tmp_path):
    """--fsdp: each stage's init (init_sharded_) and training on an FSDP2-sharded copy, gathered and merged back.
    The same run data parallel gives the same γ, cos and training losses (the second stage's losses start from
    the merged W^(1), so a wrong gather or merge shows there) up to float32 reduction order."""
    args = ["--model", tiny_dir, "--tasks", "basic_arithmetic,chain_sum", "--heldout", "", "--methods"]
    args += ["slice,lora_ga", "--rank", "2", "--steps", "2", "--batch-size", "4", "--n-train", "16", "--n-eval", "3"]
    args += ["--targets", "q_proj,v_proj,down_proj", "--tau", "1.0", "--no-progress"]  # τ = 1: the surgery acts
    env = dict(os.environ, OMP_NUM_THREADS="1")
    dp, fs = tmp_path / "dp", tmp_path / "fsdp"
    p = _torchrun(args + ["--out", str(dp)], env)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _torchrun(args + ["--out", str(fs), "--fsdp"], env)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.load(open(d / "results.json")) for d in (dp, fs))
    assert b["config"]["fsdp"] is True and a["config"]["fsdp"] is False
    for m in ("slice", "lora_ga"):
        ra, rb = a["methods"][m], b["methods"][m]
        for la, lb in zip(ra["train_losses"], rb["train_losses"]):
            assert lb == pytest.approx(la, rel=1e-4), m
        for xa, xb in zip(ra["init_reports"], rb["init_reports"]):
            for k in ("gamma", "cos"):
                if xa.get(k) is None:
                    assert xb.get(k) is None
                else:
                    assert xb[k] == pytest.approx(xa[k], rel=1e-3, abs=1e-7), (m, k)
    assert b["methods"]["slice"]["init_reports"][1]["gamma"] != 0.0  # the surgery acted on the shards
    # the sharded init ran (its gather phase: each layer's G̃ collected on its owner), not the replicated one
    ta, tb = (json.load(open(d / "timings.json")) for d in (dp, fs))
    assert all("gather" in t["init_phases"] for t in tb if t["method"] == "slice")
    assert not any("gather" in t["init_phases"] for t in ta)


def test_fsdp_refusals_name_the_way_out():
    from slice_kernels.runner.fsdp import check_fsdp

    with pytest.raises(ValueError, match="torchrun --nproc_per_node N -m slice_kernels run --fsdp"):
        check_fsdp(["slice"], 1)
    with pytest.raises(ValueError, match=r"\['ps_lora', 'gorp'\] cannot run on FSDP2-sharded parameters"):
        check_fsdp(["slice", "ps_lora", "gorp"], 2)
    check_fsdp(["lora", "lora_ga", "lora_ga_peft", "slice", "loram"], 2)


@pytest.mark.reasoning_gym
def test_accelerate_launch_with_an_fsdp2_config_runs_the_sharded_runner(tiny_dir, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2 -m slice_kernels run --fsdp`: accelerate's launcher sets up
    the processes as torchrun does and the runner shards each stage itself (the sharded init's gather phase ran)."""
    pytest.importorskip("accelerate")
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--use_fsdp"]
    cmd += ["--fsdp_version", "2", "-m", "slice_kernels", "run", "--model", tiny_dir, "--tasks"]
    cmd += ["basic_arithmetic,chain_sum", "--heldout", "", "--methods", "slice", "--rank", "2", "--steps", "2"]
    cmd += ["--batch-size", "4", "--n-train", "16", "--n-eval", "3", "--targets", "q_proj,v_proj", "--tau", "1.0"]
    cmd += ["--no-progress", "--out", str(out), "--fsdp"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["world_size"] == 2 and res["config"]["fsdp"] is True
    assert all("gather" in t["init_phases"] for t in json.load(open(out / "timings.json")))


def _dtype_worker(rank, world, model_dir, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from transformers import AutoModelForCausalLM

        from slice_kernels.runner import methods
        from slice_kernels.runner.fsdp import sharded_stage_model
        from slice_kernels.runner.methods import LoraSettings

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        lora = LoraSettings(2, 2.0, True, TARGETS)
        found = {}
        for name in ("lora_ga_peft", "slice"):
            m = methods.get(name)
            sharded = sharded_stage_model(model, m.lora_config(model, lora), m.init)
            found[name] = sorted({str(p.dtype) for n, p in sharded.named_parameters() if "lora_" in n})
        torch.save(found, os.path.join(out, "dtypes.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_stage_adapters_have_the_unsharded_inits_dtype(tiny_dir, tmp_path):
    """--fsdp wraps each stage's copy itself: on a bf16 model its adapters must be what get_slice_model gives the
    same method (PEFT's LoRA-GA casts them to the base dtype, the others are float32), or the two paths train
    different adapters."""
    from transformers import AutoModelForCausalLM

    from slice_kernels.runner import methods
    from slice_kernels.slice_init.peft import _adapter_dtypes, autocasts_adapter_dtype

    mp.spawn(_dtype_worker, args=(1, tiny_dir, _free_port(), str(tmp_path)), nprocs=1, join=True)
    found = torch.load(tmp_path / "dtypes.pt")
    assert found == {"lora_ga_peft": ["torch.bfloat16"], "slice": ["torch.float32"]}
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    w = {n: p for n, p in model.named_parameters() if n.endswith("q_proj.weight")}
    for name, want in found.items():  # the unsharded init's rule gives the same dtypes
        assert {str(d) for d in _adapter_dtypes(w, methods.get(name).init, True).values()} == set(want)
    assert autocasts_adapter_dtype("slice", False) is False
