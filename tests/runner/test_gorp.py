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


def _stage_ctx(model, lora, options=None, stage=1, state=None):
    from slice_kernels.runner.methods import StageContext

    batches = [
        {
            "input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)),
            "labels": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i + 9)),
        }
        for i in range(3)
    ]
    ctx = StageContext(
        model=model,
        stage=stage,
        task_name="t",
        current=batches,
        replay=[],
        lora=lora,
        seed=0,
        state={} if state is None else state,
        collect_gradients=None,
        loss_fn=lambda mdl, b: mdl(**b).loss,
        options=dict(options or {}),
    )
    return ctx, batches


def _runner_lora():
    """The LoRA settings the runner hands every method with its default profile (--rank/--alpha/--targets)."""
    from slice_kernels.runner.methods import LoraSettings

    cfg = make_config("default", methods=["gorp"])
    return LoraSettings(cfg.rank, cfg.alpha, cfg.use_rslora, list(cfg.targets))


def _tiny(tiny_dir):
    from slice_kernels.runner.model import load_model

    loaded = load_model(tiny_dir)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def test_the_default_gorp_optimizer_is_the_references_parameterization(tiny_dir):
    """Wcxwcxw/GORP@d4dbcdd, LLaMA: LoRA r 8, α 32, dropout 0.1 on q_proj/v_proj (run_uie_lora.py:397-399,
    scripts_llama/order_1.sh:44), gate_proj full-rank in a rank-8 projection at 1e-6 against 2e-4
    (run_llama.sh:1, uie_trainer_lora.py:126-145) with scale 0.25 (order_1.sh:48), Adam eps 1e-6 with the eps
    inside the bias correction (adamw.py:44,141-147), weight decay 0, LoRA A's space in R^r, the gradient
    projected once (gp_first only, uie_trainer_lora.py:128-129), exact SVD (proj_projector.py:83)."""
    model = _tiny(tiny_dir)
    lora = _runner_lora()
    assert "gate_proj" in lora.target_modules  # the run's own targets would adapt gate_proj too
    m = methods.get("gorp")
    m.check_model(model, lora, {})  # no overlap with the gorp defaults
    ctx, _ = _stage_ctx(model, lora)
    peft_model, _ = m.init_adapter(ctx)
    layers = {n: mod for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["q_proj", "v_proj"]
    for mod in layers.values():
        assert mod.r["default"] == 8 and mod.scaling["default"] == 32 / 8  # α/r, no rsLoRA
        assert mod.lora_dropout["default"].p == pytest.approx(0.1)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = m.make_optimizer(ctx, peft_model, params, 2e-4)
    groups = {g["kind"]: g for g in opt.param_groups}
    assert set(groups) == {"lowrank", "lora_a", "adamw"}
    assert groups["lowrank"]["names"] == [f"base_model.model.model.layers.{i}.mlp.gate_proj.weight" for i in range(2)]
    assert sorted(groups["lora_a"]["names"]) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_A" for i in range(2) for p in ("q_proj", "v_proj")
    )
    assert len(groups["adamw"]["names"]) == 4 and all(".lora_B." in n for n in groups["adamw"]["names"])
    # every trainable parameter is in exactly one group; nothing else trains
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in params}
    assert groups["lowrank"]["lr"] == pytest.approx(1e-6, rel=1e-12)
    assert groups["lora_a"]["lr"] == groups["adamw"]["lr"] == 2e-4
    low = groups["lowrank"]
    assert (low["rank"], low["scale"], low["update_proj_gap"], low["svd"]) == (8, 0.25, 20, "exact")
    assert groups["lora_a"]["scale"] == groups["adamw"]["scale"] == 1.0
    for g in opt.param_groups:
        assert g["eps"] == 1e-6 and g["eps_mode"] == "transformers" and g["betas"] == (0.9, 0.999)
        assert g["weight_decay"] == 0.0 and g["project_update"] is False
        assert g["lora_a_space"] == "rank" and g["energy_rule"] == "reference" and g["energy"] == 0.9


def test_the_run_settings_and_the_old_behaviour_stay_reachable(tiny_dir):
    """gorp_lora=run takes --rank/--alpha/--targets (rsLoRA, no dropout), which on the default targets adapt
    gate_proj too: refused before the first stage unless gorp_allow_overlap=true, which, with the other
    options at their former values, gives the optimizer as it was before the reference's defaults."""
    from slice_kernels.runner.errors import RunnerError

    model = _tiny(tiny_dir)
    lora = _runner_lora()
    m = methods.get("gorp")
    with pytest.raises(
        RunnerError,
        match=r"gorp: model\.layers\.0\.mlp\.gate_proj \(and 1 more\) would be both LoRA-adapted .*gorp_full_rank="
        r"\['gate_proj'\].*gorp_lora_targets=.*gorp_allow_overlap=true",
    ):
        m.check_model(model, lora, {"gorp_lora": "run"})
    m.check_model(model, lora, {"gorp_lora": "run", "gorp_lora_targets": ["q_proj", "v_proj"]})
    old = {
        "gorp_lora": "run",
        "gorp_allow_overlap": True,
        "gorp_full_rank_lr_ratio": 1.0,
        "gorp_svd": "randomized",
        "gorp_lora_space": "input",
        "gorp_project_update": True,
        "gorp_energy_rule": "reach",
        "gorp_eps": 1e-8,
        "gorp_eps_mode": "torch",
    }
    m.check_model(model, lora, old)
    ctx, _ = _stage_ctx(model, lora, old)
    peft_model, _ = m.init_adapter(ctx)
    gate = dict(peft_model.named_modules())["base_model.model.model.layers.0.mlp.gate_proj"]
    assert gate.r["default"] == 8 and gate.scaling["default"] == pytest.approx(2.0 / 8**0.5)  # rsLoRA α/√r
    opt = m.make_optimizer(ctx, peft_model, [p for p in peft_model.parameters() if p.requires_grad], 3e-4)
    groups = {g["kind"]: g for g in opt.param_groups}
    assert {g["lr"] for g in opt.param_groups} == {3e-4}
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A" in groups["lora_a"]["names"]
    assert groups["lowrank"]["svd"] == "randomized" and groups["lora_a"]["lora_a_space"] == "input"
    assert groups["lowrank"]["eps"] == 1e-8 and groups["lowrank"]["project_update"] is True


def test_gorp_lora_overrides_apply_on_top_of_the_chosen_base():
    from slice_kernels.runner.methods.gorp import gorp_lora_settings

    run = _runner_lora()
    ref = gorp_lora_settings(run, {})
    assert (ref.rank, ref.alpha, ref.use_rslora, ref.target_modules, ref.dropout) == (
        8,
        32.0,
        False,
        ["q_proj", "v_proj"],
        0.1,
    )
    got = gorp_lora_settings(run, {"gorp_lora_rank": 4, "gorp_lora_targets": "q_proj", "gorp_lora_dropout": 0})
    assert (got.rank, got.alpha, got.target_modules, got.dropout) == (4, 32.0, ["q_proj"], 0.0)
    got = gorp_lora_settings(run, {"gorp_lora": "run", "gorp_lora_alpha": 16})
    assert (got.rank, got.alpha, got.use_rslora, got.target_modules, got.dropout) == (
        run.rank,
        16.0,
        True,
        run.target_modules,
        0.0,
    )


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("gorp_full_rank_lr_ratio", 0, "must be > 0"),
        ("gorp_svd", "full", "must be one of 'exact', 'randomized'"),
        ("gorp_lora_space", "output", "must be one of 'rank', 'input'"),
        ("gorp_energy_rule", "fewest", "must be one of 'reference', 'reach'"),
        ("gorp_eps_mode", "hf", "must be one of 'transformers', 'torch'"),
        ("gorp_eps", 0, "must be > 0"),
        ("gorp_project_update", "yes", "must be true or false"),
        ("gorp_allow_overlap", 1, "must be true or false"),
        ("gorp_lora", "paper", "must be one of 'reference', 'run'"),
        ("gorp_lora_rank", 2.5, "must be a positive integer"),
        ("gorp_lora_alpha", -1, "must be > 0"),
        ("gorp_lora_targets", [], "must be a module name"),
        ("gorp_lora_dropout", 1.0, "must be < 1"),
    ],
)
def test_the_new_gorp_options_are_checked_before_the_model_loads(key, value, message):
    from slice_kernels.runner.methods import check_method_options

    default = methods.get("gorp").options[key].default
    if default is not None:  # None: computed by the method
        check_method_options({key: default}, ["gorp"])
    with pytest.raises(ValueError, match=rf"method option {key}=.*{message}"):
        check_method_options({key: value}, ["gorp"])


@pytest.mark.parametrize("stage", [1, 2])
def test_end_of_task_tells_the_optimizer_whether_this_is_the_first_task(tiny_dir, stage, monkeypatch):
    """The reference counts its first task (no space stored at all) differently; stage 1 is that task."""
    model = _tiny(tiny_dir)
    m = methods.get("gorp")
    ctx, batches = _stage_ctx(model, _runner_lora(), stage=stage)
    peft_model, _ = m.init_adapter(ctx)
    opt = m.make_optimizer(ctx, peft_model, [p for p in peft_model.parameters() if p.requires_grad], 1e-3)
    seen = []
    real = opt.end_task
    monkeypatch.setattr(opt, "end_task", lambda first_task=None: seen.append(first_task) or real(first_task))
    for b in batches:
        opt.zero_grad()
        peft_model(**b).loss.backward()
        opt.step()
    m.end_of_task(ctx, peft_model)
    assert seen == [stage == 1]
