"""The runner's ``gorp`` method on a tiny Llama: two tasks, spaces carried between stages and through a resume."""

import json
import os

import pytest
import torch

from slice_kernels.runner import make_config, methods, run
from slice_kernels.runner.checkpoint import RunDirectory
from tests.helpers.runner_tiny import save_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama_gorp")))


def _cfg(model):
    return make_config(
        "default",
        model=model,
        tasks=["basic_arithmetic", "chain_sum"],
        heldout=["letter_counting"],
        methods=["gorp"],
        rank=2,
        steps=3,
        n_train=16,
        n_eval=2,
        n_heldout=2,
        ip_shots=1,
        max_new_tokens=2,
        grad_batches=1,
        replay_batches=1,
        grad_batch_size=4,
        batch_size=4,
        max_len=40,
        lr=5e-3,
        targets=["q_proj", "v_proj"],
        seed=5,
    )


def test_gorp_is_registered():
    assert "gorp" in methods.available()


@pytest.mark.reasoning_gym
def test_two_stage_run_and_resume(tiny_dir, tmp_path):
    full = str(tmp_path / "full")
    res = run(_cfg(tiny_dir), full, progress=False, log=lambda *a: None)
    R = res["methods"]["gorp"]["R"]
    assert len(R) == 2 and all(x is not None for x in R[1])
    # a run stopped after stage 1 and resumed: same results, so the spaces travelled in the checkpoint
    part = str(tmp_path / "part")
    assert run(_cfg(tiny_dir), part, progress=False, log=lambda *a: None, stop_after=1) == {"stopped_after": 1}
    state = RunDirectory(part).newest()["current"]["state"]
    spaces = state["spaces"]  # the method state a resume hands back: the grown spaces
    assert any(k.endswith("gate_proj.weight") for k in spaces) and any(k.endswith("q_proj.lora_A") for k in spaces)
    run(_cfg(tiny_dir), part, resume=True, progress=False, log=lambda *a: None)
    assert json.load(open(os.path.join(full, "results.json"))) == json.load(open(os.path.join(part, "results.json")))


def test_end_of_task_stores_spaces(tiny_dir):
    from slice_kernels.runner.methods import LoraSettings, StageContext
    from slice_kernels.runner.model import load_model

    loaded = load_model(tiny_dir)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    m = methods.get("gorp")
    batches = [
        {
            "input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)),
            "labels": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i + 9)),
        }
        for i in range(3)
    ]
    ctx = StageContext(
        model=model,
        stage=1,
        task_name="t",
        current=batches,
        replay=[],
        lora=LoraSettings(2, 4.0, True, ["q_proj", "v_proj"]),
        seed=0,
        state={},
        collect_gradients=None,
        loss_fn=lambda mdl, b: mdl(**b).loss,
    )
    peft_model, _ = m.init_adapter(ctx)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = m.make_optimizer(ctx, peft_model, params, 1e-3)
    for b in batches:
        opt.zero_grad()
        peft_model(**b).loss.backward()
        opt.step()
    m.end_of_task(ctx, peft_model)
    spaces = ctx.state["spaces"]
    assert any(k.endswith("gate_proj.weight") for k in spaces)
    assert any(k.endswith("q_proj.lora_A") for k in spaces)


@pytest.mark.parametrize(
    "given,expected",
    [("down_proj", ["down_proj"]), (["gate_proj", "up_proj"], ["gate_proj", "up_proj"]), (None, None)],
)
def test_gorp_full_rank_option_takes_one_name_or_a_list(given, expected):
    """--method-option gorp_full_rank=down_proj arrives as a string: one pattern, not a list of its letters."""
    from slice_kernels.runner.methods import StageContext

    m = methods.get("gorp")
    options = {} if given is None else {"gorp_full_rank": given}
    ctx = StageContext(
        model=None,
        stage=1,
        task_name="t",
        current=[],
        replay=[],
        lora=None,
        seed=0,
        state={},
        collect_gradients=None,
        loss_fn=None,
        options=options,
    )
    assert m.option(ctx, "gorp_full_rank") == expected


def test_the_runner_refuses_an_option_no_method_declares():
    from slice_kernels.runner.methods import check_method_options, declared_options

    assert {"gorp_rank", "gorp_full_rank", "ps_lambda", "ps_history"} <= set(declared_options())
    check_method_options({"gorp_rank": 4, "ps_lambda": 0.5, "svd": "exact"})
    with pytest.raises(ValueError, match=r"unknown method option\(s\) \['gorp_rnk'\]"):
        check_method_options({"gorp_rnk": 4})
