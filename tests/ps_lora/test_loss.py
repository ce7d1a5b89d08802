"""PS-LoRA's model-level stability loss (slice_kernels.ps_lora.loss, .trainer): the sum over a PEFT model's LoRA
layers, the refusal of a foreign history, the init offsets of an absorbed init, and the Trainer mixin."""

import math

import pytest
import torch

from slice_kernels import History, HistoryStore
from slice_kernels.ps_lora.loss import reference_sign_consistency_loss
from tests.helpers import tiny_gpt2, tiny_llama


def _peft(model_fn, targets, seed=0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = model_fn()  # seeds the global RNG itself; the adapters get their own seed below
    torch.manual_seed(seed)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize(
    "model_fn,targets",
    [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])],
    ids=["llama", "gpt2-conv1d"],
)
def test_parameter_stability_loss_sums_layers(model_fn, targets):
    from slice_kernels import ParameterStabilityLoss
    from slice_kernels.modules import lora_factors, lora_layers

    earlier = _peft(model_fn, targets, seed=1)
    store = HistoryStore("factors")
    store.record_task(earlier)
    pm = _peft(model_fn, targets, seed=2)
    assert float(ParameterStabilityLoss(HistoryStore())(pm)) == 0.0  # t = 1
    psl = ParameterStabilityLoss(store, lam=0.5, alpha=1.0, beta=0.2, mode="tanh")
    total = psl(pm)
    expect = 0.0
    for name, mod, ad in lora_layers(pm):
        B, A, s = lora_factors(mod, ad)
        expect += float(reference_sign_consistency_loss(A.double(), B.double(), store[name], scaling=s, beta=0.2))
    assert math.isclose(float(total), 0.5 * expect, rel_tol=1e-5)
    total.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_parameter_stability_loss_refuses_a_foreign_history():
    from slice_kernels import ParameterStabilityLoss

    hist = {"not.a.layer": History.from_factors([torch.randn(4, 1)], [torch.randn(1, 5)])}
    with pytest.raises(ValueError, match="none of the 1 history layers"):
        ParameterStabilityLoss(hist)(_peft(tiny_llama, ["q_proj"]))
    # same layer names, other shapes (a history saved from another model): the error names the layer
    pm = _peft(tiny_llama, ["q_proj"])
    name = next(n for n, m in pm.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    m, n = dict(pm.named_modules())[name].base_layer.weight.shape
    store = HistoryStore("factors")
    store.record_task(pm)
    foreign = {k: History.from_factors([torch.randn(m + 1, 1)], [torch.randn(1, n)]) for k in store.layers}
    with pytest.raises(ValueError, match=r"layer '.*q_proj' makes a .* update but its history is"):
        ParameterStabilityLoss(foreign)(pm)


def test_init_offsets_penalize_the_true_update():
    """With s·B₀·A₀ absorbed into W, the update is s·(BA − B₀A₀): at B = B₀, A = A₀ it is zero."""
    from slice_kernels import ParameterStabilityLoss
    from slice_kernels.modules import lora_factors, lora_layers

    pm = _peft(tiny_llama, ["q_proj"], seed=3)
    store = HistoryStore("factors")
    store.record_task(_peft(tiny_llama, ["q_proj"], seed=4))
    offsets = {n: tuple(t.detach().clone() for t in lora_factors(m, a)[:2]) for n, m, a in lora_layers(pm)}
    psl = ParameterStabilityLoss(store, beta=0.0, mode="hinge", init_offsets=offsets)
    without = float(ParameterStabilityLoss(store, beta=0.0, mode="hinge")(pm))
    assert without > 0.0
    # hinge of a zero update; BA − B₀A₀ is formed in float32 inside the tiles, so it is zero up to rounding
    assert float(psl(pm)) <= 1e-5 * without


@pytest.mark.parametrize("accum", [1, 3])
def test_trainer_mixin_counts_the_stability_loss_once_per_optimizer_step(tmp_path, accum):
    """StabilityLossMixin with gradient accumulation: the accumulated gradient of the added term is that of
    one L_s per optimizer step, whether or not the Trainer divides the micro-batch loss by the accumulation
    steps (it does not when the model normalizes by num_items_in_batch, as Llama does)."""
    from transformers import TrainerCallback, TrainingArguments

    from slice_kernels import PSLoRATrainer

    class LinearTerm(torch.nn.Module):  # L_s = c·Σ lora params: its gradient is c on every entry
        def forward(self, model):
            return 0.25 * sum(p.sum() for n, p in model.named_parameters() if "lora_" in n)

    class Grab(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.grads = trainer, None

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.grads = {
                n: p.grad.detach().clone() for n, p in self.trainer.model.named_parameters() if p.grad is not None
            }

    ids = torch.arange(4 * accum * 8).reshape(4 * accum, 8) % 128
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
    grads = {}
    for term in (None, LinearTerm()):
        pm = _peft(tiny_llama, ["q_proj", "v_proj"], seed=5)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=accum,
            learning_rate=0.0,
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            dataloader_drop_last=True,
        )
        trainer = PSLoRATrainer(model=pm, args=args, train_dataset=data)
        trainer.stability_loss = term
        grab = Grab(trainer)
        trainer.add_callback(grab)
        trainer.train()
        grads[term is None] = grab.grads
    diffs = [grads[False][n] - grads[True][n] for n in grads[True] if "lora_" in n]
    assert diffs
    for d in diffs:
        torch.testing.assert_close(d, torch.full_like(d, 0.25), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Triton dot precision (opt-in)
