"""Magnitude merging of the task updates into a PEFT model's base weights (slice_kernels.ps_lora.merge): after
stage t the weights are W_0 + merge(ΔW_1..ΔW_t), and a bad update set leaves every weight as it was."""

import pytest
import torch

from slice_kernels.ops.magnitude_merge import reference_magnitude_merge
from tests.helpers import tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "model_fn,targets", [(tiny_llama, ["q_proj", "up_proj"]), (tiny_gpt2, ["c_attn"])], ids=["llama", "gpt2-conv1d"]
)
def test_merge_gives_base_plus_merged_updates(model_fn, targets):
    """The ps_lora merge hook: after stage t the weights are W_0 + merge(ΔW_1..ΔW_t), not a running sum."""
    from peft import LoraConfig, get_peft_model

    from slice_kernels.modules import canonical_name as _canonical
    from slice_kernels.modules import lora_factors, lora_layers
    from slice_kernels.ps_lora import merge_magnitude_into_base

    model = model_fn()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    updates = {}
    for stage in range(3):
        torch.manual_seed(10 + stage)
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        names = []
        for name, mod, ad in lora_layers(pm):
            B, A, s = lora_factors(mod, ad)
            updates.setdefault(_canonical(name), []).append({"B": B.detach().clone(), "A": A.detach().clone(), "s": s})
            names.append(name)
        model = merge_magnitude_into_base(pm, updates)
    conv1d = model_fn is tiny_gpt2
    for name, ups in updates.items():
        pname = name.replace("base_model.model.", "", 1) + ".weight"
        merged = reference_magnitude_merge([(u["B"], u["A"], u["s"]) for u in ups])
        W = dict(model.named_parameters())[pname].detach()
        got = (W.T if conv1d else W).double() - (w0[pname].T if conv1d else w0[pname]).double()
        torch.testing.assert_close(got, merged, rtol=1e-4, atol=1e-5)
    assert len(updates) > 0


def test_merge_checks_every_layer_before_writing():
    """A missing update for one layer is an error that leaves every weight as it was (no half-merged model)."""
    from peft import LoraConfig, get_peft_model

    from slice_kernels.modules import canonical_name as _canonical
    from slice_kernels.modules import lora_factors, lora_layers
    from slice_kernels.ps_lora import merge_magnitude_into_base

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    layers = list(lora_layers(pm))
    updates = {}
    for name, mod, ad in layers:
        B, A, s = lora_factors(mod, ad)
        updates[_canonical(name)] = [{"B": B.detach().clone(), "A": A.detach().clone(), "s": s}]
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    del updates[_canonical(layers[-1][0])]  # the last layer has no recorded update
    with pytest.raises(ValueError, match="no recorded update for layer"):
        merge_magnitude_into_base(pm, updates)
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), n


def test_merge_refuses_a_non_finite_scaling_before_writing_any_layer():
    """A NaN scaling in the last layer's update used to be merged (NaN spread silently); magnitude_merge now refuses
    it, and the merge checks it with the other layers first, so no layer is half-way merged."""
    from peft import LoraConfig, get_peft_model

    from slice_kernels import HistoryError
    from slice_kernels.modules import canonical_name, lora_factors, lora_layers
    from slice_kernels.ps_lora import merge_magnitude_into_base

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    layers = list(lora_layers(pm))
    updates = {}
    for name, mod, ad in layers:
        B, A, s = lora_factors(mod, ad)
        updates[canonical_name(name)] = [{"B": B.detach().clone(), "A": A.detach().clone(), "s": s}]
    updates[canonical_name(layers[-1][0])][0]["s"] = float("nan")
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(HistoryError, match=rf"layer '{layers[-1][0]}': task 0's update has scaling nan"):
        merge_magnitude_into_base(pm, updates)
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), n
