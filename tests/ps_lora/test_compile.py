"""Layer names under wrappers (issue 17, item 4): PS-LoRA matches a history to LoRA layers by name, and DDP
("module."), torch.compile ("_orig_mod.", also per block as accelerate's regional compilation does) and FSDP1 /
activation checkpointing insert components into those names. History, loss and offsets must see the same layers
whatever the wrapping, including inside transformers.Trainer(torch_compile=True)."""

import shutil
import warnings

import pytest
import torch
from torch import nn

from slice_kernels import HistoryStore, ParameterStabilityLoss
from slice_kernels.modules import canonical_name, lora_layers
from tests.helpers import lm_batches, tiny_llama
from tests.ps_lora.test_loss import _peft


class FakeDDP(nn.Module):
    """Names like DistributedDataParallel's ("module." in front) without a process group."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("base_model.model.q_proj", "base_model.model.q_proj"),
        ("module.base_model.model.q_proj", "base_model.model.q_proj"),
        ("_orig_mod.base_model.model.q_proj", "base_model.model.q_proj"),
        ("module._orig_mod.module.base_model.q_proj", "base_model.q_proj"),
        ("_orig_mod.module.base_model.q_proj", "base_model.q_proj"),
        ("model.layers.0._orig_mod.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),  # regional compile
        ("_fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp", "layers.0.mlp"),
        ("model.module.q_proj", "model.module.q_proj"),  # a child really named "module" inside the model stays
    ],
)
def test_canonical_name(name, canonical):
    assert canonical_name(name) == canonical


@pytest.mark.parametrize("wrap", ["compile", "ddp", "ddp+compile"])
def test_history_and_loss_match_layers_through_wrappers(wrap):
    earlier = _peft(tiny_llama, ["q_proj", "v_proj"], seed=1)
    pm = _peft(tiny_llama, ["q_proj", "v_proj"], seed=2)

    def wrapped(m):  # torch.compile only wraps here: nothing is compiled until a forward runs
        if wrap == "compile":
            return torch.compile(m)
        if wrap == "ddp":
            return FakeDDP(m)
        return torch.compile(FakeDDP(m))

    plain, via = HistoryStore(), HistoryStore()
    plain.record_task(earlier)
    via.record_task(wrapped(earlier))
    assert sorted(via.layers) == sorted(plain.layers)
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in via.layers)
    assert any("_orig_mod" in n or n.startswith("module.") for n, _, _ in lora_layers(wrapped(pm)))
    ref = float(ParameterStabilityLoss(plain)(pm))
    assert ref > 0
    # history recorded on the bare model, loss computed on the wrapped one, and the other way round
    assert float(ParameterStabilityLoss(plain)(wrapped(pm))) == pytest.approx(ref, rel=1e-6)
    assert float(ParameterStabilityLoss(via)(pm)) == pytest.approx(ref, rel=1e-6)
    # a history with DDP-prefixed keys (saved from a wrapped run by older code) still matches
    prefixed = {f"module.{k}": v for k, v in plain.layers.items()}
    assert float(ParameterStabilityLoss(prefixed)(wrapped(pm))) == pytest.approx(ref, rel=1e-6)


def _have_compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc") or shutil.which("g++")


@pytest.mark.slow
@pytest.mark.skipif(not _have_compiler(), reason="torch.compile's inductor backend on CPU needs a C compiler (gcc/cc)")
def test_ps_lora_trainer_with_torch_compile(tmp_path):
    """PSLoRATrainer under Trainer(torch_compile=True): the Trainer hands compute_loss the compiled model, whose
    layer names carry "_orig_mod."; the stability loss must find every history layer there and reach the
    adapter's gradients. Two steps of the tiny Llama with inductor: about 35 s on 2 CPU cores."""
    from transformers import TrainingArguments

    from slice_kernels import PSLoRATrainer

    earlier = _peft(tiny_llama, ["q_proj", "v_proj"], seed=1)
    store = HistoryStore()
    store.record_task(earlier)
    pm = _peft(tiny_llama, ["q_proj", "v_proj"], seed=2)
    ref = float(ParameterStabilityLoss(store)(pm))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        torch_compile=True,
        seed=0,
    )
    data = [{k: v[i] for k, v in b.items()} for b in lm_batches(2, seed=3) for i in range(4)]
    trainer = PSLoRATrainer(model=pm, args=args, train_dataset=data)
    psl = ParameterStabilityLoss(store)
    seen = []

    class Spy(nn.Module):
        def forward(self, model):
            value = psl(model)
            seen.append((type(model).__name__, sorted(canonical_name(n) for n, _, _ in lora_layers(model)), value))
            return value

    trainer.stability_loss = Spy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*speedups for torchdynamo.*")
        trainer.train()
    assert len(seen) == 2
    assert seen[0][0] == "OptimizedModule"  # the compiled model really reached compute_loss
    assert seen[0][1] == sorted(store.layers)
    assert float(seen[0][2]) == pytest.approx(ref, rel=1e-5)  # step 1: the adapter has not moved yet
    assert trainer.state.global_step == 2
