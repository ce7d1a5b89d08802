"""PS-LoRA composed with a SLICE init (issue 17, item 4): get_slice_model leaves each layer's init offset (B₀, A₀,
s₀) on the PEFT model (slice_kernels.init_offsets), HistoryStore.record_task records the true update
s·(B·A − B₀·A₀) and ParameterStabilityLoss uses it, with no hand extraction; vanilla LoRA has no offset."""

import warnings

import pytest
import torch
from peft import LoraConfig

from slice_kernels import HistoryStore, ParameterStabilityLoss, SliceConfig, get_slice_model
from slice_kernels.init_offsets import effective_factors, init_offset, init_offsets
from slice_kernels.modules import canonical_name, lora_factors, lora_layers
from slice_kernels.ps_lora.loss import reference_sign_consistency_loss
from tests.helpers import lm_batches, tiny_gpt2, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"]}
MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def _slice_model(arch="llama", method="slice", seed=0):
    # r = 4, α = 8, rsLoRA: s = 8/√4 = 4, a power of two, so folding s into the history's float32 factors is exact
    # and the comparison below sees only what record_task recorded
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS[arch])
    sc = SliceConfig(method=method, current_steps=2, replay_steps=1)
    replay = [lm_batches(1, seed=11)]
    return get_slice_model(MAKE[arch](seed=seed), cfg, sc, current=lm_batches(2, seed=seed), replay=replay)


def _train(pm, steps=3, lr=1e-2):
    opt = torch.optim.Adam([p for n, p in pm.named_parameters() if "lora_" in n], lr=lr)
    pm.train()
    for batch in lm_batches(steps, seed=7):
        opt.zero_grad()
        pm(**batch).loss.backward()
        opt.step()
    pm.eval()


def _initial(pm):
    return {canonical_name(n): tuple(t.detach().clone() for t in lora_factors(m, a)[:2]) for n, m, a in lora_layers(pm)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"], ids=["llama", "gpt2-conv1d"])
def test_history_records_the_true_update_after_a_slice_init(arch):
    pm = _slice_model(arch)
    start = _initial(pm)
    assert set(init_offsets(pm)) == set(start)  # every layer got an offset (SLICE absorbs s·B₀·A₀)
    _train(pm)
    store = HistoryStore("factors")
    store.record_task(pm)
    worst = old = 0.0
    for name, mod, ad in lora_layers(pm):
        B, A, s = lora_factors(mod, ad)
        B0, A0 = start[canonical_name(name)]
        true = s * (B.detach().double() @ A.detach().double() - B0.double() @ A0.double())
        h = store[canonical_name(name)]
        got = h.Bh.double() @ h.Ah.double()
        worst = max(worst, float((got - true).norm() / true.norm()))
        old = max(old, float((s * (B.detach().double() @ A.detach().double()) - true).norm() / true.norm()))
        assert h.rank == 2 * A.shape[0]
    assert worst <= 1e-6
    assert old > 1.0  # what recording s·B·A (the old behaviour) would have been off by


def test_dense_and_bit_histories_record_the_true_update():
    pm = _slice_model()
    start = _initial(pm)
    _train(pm)
    dense, bits = HistoryStore("dense"), HistoryStore("bits")
    dense.record_task(pm)
    bits.record_task(pm)
    for name, mod, ad in lora_layers(pm):
        B, A, s = lora_factors(mod, ad)
        B0, A0 = start[canonical_name(name)]
        true = s * (B.detach().double() @ A.detach().double() - B0.double() @ A0.double())
        got = dense[canonical_name(name)].dense.double()
        assert float((got - true).norm() / true.norm()) <= 1e-4  # float32 product of a cancelling difference
        assert torch.equal(bits[canonical_name(name)].to_dense().sign(), torch.where(true >= 0, 1.0, -1.0).float())


def test_stability_loss_uses_the_init_offsets_with_no_argument():
    earlier = HistoryStore("factors")
    prev = _slice_model(seed=1)
    _train(prev)
    earlier.record_task(prev)
    pm = _slice_model(seed=2)
    start = _initial(pm)
    _train(pm, steps=2)
    psl = ParameterStabilityLoss(earlier, lam=0.5, beta=0.2)
    got = psl(pm)
    expect = plain = 0.0
    for name, mod, ad in lora_layers(pm):
        B, A, s = lora_factors(mod, ad)
        Be, Ae = effective_factors(B.detach(), A.detach(), start[canonical_name(name)])
        h = earlier[canonical_name(name)]
        expect += float(reference_sign_consistency_loss(Ae.double(), Be.double(), h, scaling=s, beta=0.2))
        plain += float(
            reference_sign_consistency_loss(A.detach().double(), B.detach().double(), h, scaling=s, beta=0.2)
        )
    torch.testing.assert_close(float(got.detach()), 0.5 * expect, rtol=1e-5, atol=0)
    assert abs(0.5 * plain - float(got)) > 1e-3 * abs(float(got))  # the offsets matter: s·B·A gives another loss
    got.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if "lora_" in n)
    # an explicit init_offsets still wins over the attached ones (here: the offsets of zero, i.e. the plain update)
    zeros = {k: (torch.zeros_like(B0), torch.zeros_like(A0)) for k, (B0, A0) in start.items()}
    forced = ParameterStabilityLoss(earlier, lam=0.5, beta=0.2, init_offsets=zeros)(pm)
    torch.testing.assert_close(float(forced), 0.5 * plain, rtol=1e-5, atol=0)


def test_vanilla_lora_has_no_offset_and_records_s_b_a():
    pm = _slice_model(method="lora")
    assert init_offsets(pm) == {}
    _train(pm, steps=1)
    store = HistoryStore("factors")
    store.record_task(pm)
    for name, mod, ad in lora_layers(pm):
        B, A, s = lora_factors(mod, ad)
        h = store[canonical_name(name)]
        assert h.rank == A.shape[0]
        torch.testing.assert_close(h.Bh @ h.Ah, s * (B.detach() @ A.detach()), rtol=1e-6, atol=1e-7)


def test_offsets_follow_the_model_and_stay_out_of_the_saved_adapter(tmp_path):
    from safetensors.torch import load_file

    pm = _slice_model()
    assert not any("slice_init" in k for k in pm.state_dict())
    pm.save_pretrained(str(tmp_path / "a"))
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved and not any("slice_init" in k for k in saved)
    pm.to(torch.float64)  # a dtype move stands in for a device move on a CPU-only machine: buffers follow both
    for _, mod, ad in lora_layers(pm):
        B0, A0, s0 = init_offset(mod, ad)
        assert B0.dtype == A0.dtype == torch.float64 and s0 == float(mod.scaling[ad])
        torch.testing.assert_close(B0, mod.lora_B[ad].weight.detach())  # untrained: the adapter is still B₀, A₀


def test_effective_factors_rescale_an_offset_absorbed_at_another_scaling():
    g = torch.Generator().manual_seed(0)
    B, A, B0, A0 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 2), (2, 5), (6, 2), (2, 5)))
    Be, Ae = effective_factors(B, A, (B0, A0, 3.0), scaling=2.0)
    torch.testing.assert_close(2.0 * Be @ Ae, 2.0 * B @ A - 3.0 * B0 @ A0)
    with pytest.raises(ValueError, match="does not fit the adapter"):
        effective_factors(B, A, (B0[:5], A0))


def test_record_task_refuses_offsets_for_unknown_layers():
    pm = _slice_model()
    with pytest.raises(ValueError, match="init_offsets names 1 layer"):
        HistoryStore().record_task(pm, init_offsets={"no.such.layer": (torch.zeros(2, 1), torch.zeros(1, 2))})
