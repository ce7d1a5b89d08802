"""gorp_param_groups / build_gorp_optimizer on a tiny PEFT Llama (GORP's LLaMA setting) and a GPT-2."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from slice_kernels import GorpAdamW, GorpGroupError, build_gorp_optimizer, gorp_param_groups
from tests.helpers import lm_batches, tiny_gpt2, tiny_llama


def _peft_llama(adapter="default"):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(), cfg, adapter_name=adapter)


def _train(model, opt, batches):
    model.train()
    for b in batches:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()


def test_groups_for_the_llama_setting():
    model = _peft_llama()
    groups = gorp_param_groups(model, full_rank=["gate_proj"], rank=4)
    by_kind = {g["kind"]: g for g in groups}
    assert set(by_kind) == {"lowrank", "lora_a", "adamw"}
    assert by_kind["lowrank"]["names"] == [f"base_model.model.model.layers.{i}.mlp.gate_proj.weight" for i in range(2)]
    assert all(p.requires_grad for p in by_kind["lowrank"]["params"])  # unfrozen
    assert sorted(by_kind["lora_a"]["names"]) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_A" for i in range(2) for m in ("q_proj", "v_proj")
    )
    assert all(".lora_B." in n for n in by_kind["adamw"]["names"]) and len(by_kind["adamw"]["names"]) == 4
    assert by_kind["lowrank"]["rank"] == 4


def test_two_tasks_carry_the_spaces_across_adapters():
    model = _peft_llama("task1")
    opt = build_gorp_optimizer(model, full_rank=["gate_proj"], rank=4, lr=1e-3, update_proj_gap=2)
    _train(model, opt, lm_batches(3, seed=1))
    added = opt.end_task()
    spaces = opt.shared_spaces()
    gate = "base_model.model.model.layers.0.mlp.gate_proj.weight"
    lora = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    assert added[gate] >= 1 and added[lora] >= 1
    assert spaces[gate].shape[0] == 96  # gate_proj is 96×64: m ≥ n, the space is on the output side
    assert spaces[lora].shape[0] == 64  # LoRA A's input side
    # next task: the adapter is merged, a new one (another adapter name) is trained with the stored spaces
    base = model.merge_and_unload()
    model2 = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="task2"
    )
    opt2 = build_gorp_optimizer(model2, full_rank=["gate_proj"], rank=4, lr=1e-3, shared_spaces=spaces)
    p_gate = dict(model2.named_parameters())[gate]
    before = p_gate.detach().clone()
    _train(model2, opt2, lm_batches(2, seed=2))
    S = opt2.shared_space(p_gate)
    d = p_gate.detach() - before
    assert torch.equal(S, spaces[gate])
    assert (S @ (S.T @ d)).norm() <= 1e-5 * d.norm()  # float32 model: rounding-level leak only


def test_gpt2_conv1d_weights():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    groups = gorp_param_groups(model, full_rank=["c_fc"], rank=3)
    low = next(g for g in groups if g["kind"] == "lowrank")
    assert [tuple(p.shape) for p in low["params"]] == [(64, 256), (64, 256)]  # Conv1D stores Wᵀ
    opt = GorpAdamW(groups, lr=1e-3)
    _train(model, opt, lm_batches(1))
    assert "proj" in opt.state[low["params"][0]]


def test_pattern_matching_nothing_is_an_error_and_touches_nothing():
    model = _peft_llama()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(GorpGroupError, match=r"full-rank pattern 'up_projection' matches no linear module"):
        gorp_param_groups(model, full_rank=["gate_proj", "up_projection"])
    with pytest.raises(GorpGroupError, match=r"LoRA pattern 'k_proj' matches no module"):
        gorp_param_groups(model, full_rank=["gate_proj"], lora_modules=["k_proj"])
    with pytest.raises(GorpGroupError, match=r"gate_proj.weight: rank 65 is larger than the matrix allows"):
        gorp_param_groups(model, full_rank=["gate_proj"], rank=65)
    with pytest.raises(GorpGroupError, match="matches no parameter"):
        build_gorp_optimizer(model, full_rank=["gate_proj"], rank=4, shared_spaces={"nope": torch.zeros(3, 1)})
    # a misspelt group option used to be kept by torch as an inert key: the group trained with scale 1.0
    with pytest.raises(GorpGroupError, match=r"unknown option\(s\) \['scael'\]; known: .*'scale'"):
        build_gorp_optimizer(model, full_rank=["gate_proj"], rank=4, lowrank_options={"scael": 0.25})
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


@pytest.mark.parametrize("rank", [2.7, True])
def test_a_non_integer_rank_is_refused_before_touching_the_model(rank):
    """gorp_param_groups used to truncate rank=2.7 to 2 (and take True as 1) and unfreeze the weights."""
    model = _peft_llama()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for build in (gorp_param_groups, build_gorp_optimizer):
        with pytest.raises(GorpGroupError, match=rf"rank must be a positive integer, got {rank!r}"):
            build(model, full_rank=["gate_proj"], rank=rank)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_regex_pattern():
    model = _peft_llama()
    groups = gorp_param_groups(model, full_rank=[r".*layers\.1\.mlp\.(gate|up)_proj"], rank=2)
    low = next(g for g in groups if g["kind"] == "lowrank")
    assert low["names"] == [
        "base_model.model.model.layers.1.mlp.gate_proj.weight",
        "base_model.model.model.layers.1.mlp.up_proj.weight",
    ]


def test_drops_into_a_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _peft_llama()
    opt = build_gorp_optimizer(model, full_rank=["gate_proj"], rank=4, lr=1e-3, update_proj_gap=2)
    gate = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.gate_proj.weight"]
    before = gate.detach().clone()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(0, 128, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert opt.state[gate]["step"] == 3 and opt.state[gate]["refreshes"] == 2  # refreshed at steps 0 and 2
    assert not torch.equal(gate.detach(), before)
