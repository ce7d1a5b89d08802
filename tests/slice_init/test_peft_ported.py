"""PEFT's own LoRA-GA tests (huggingface/peft tests/test_lora_ga.py), reproduced against this package's API.

The package has no separate preprocess step: ``get_slice_model(model, LoraConfig(init_lora_weights="lora_ga",
lora_ga_config=...), current=batches, loss_fn=...)`` collects the gradients and writes the adapter in one call;
``gradient_cache=`` plays the part of ``preprocess_loraga(..., cache_file=)``. PEFT's toy model
``Sequential(Linear(10, 10))`` with the loss ``outputs.sum()`` becomes ``toy()`` with ``sum_loss``; PEFT's
train_step of 4 backward passes becomes 8 batches, the package's default ``current_steps``.

PEFT case -> package test here:

* TestLoraGAPreprocessing::test_preprocess_basic -> test_preprocess_basic (a gradient of the weight's shape is
  collected for target "0"; the package keeps it in the report and in the gradient cache, not on the module);
  its older two-layer form (targets "0" and "2", cross-entropy) -> test_preprocess_two_layers_cross_entropy.
* test_preprocess_without_lora_ga_config_raises, test_init_without_lora_ga_config_raises ->
  test_lora_ga_without_lora_ga_config_raises (one call here, so one refusal; the model is left untouched).
* TestLoraGAIntegration::test_save_load_inference[direction × scale] -> test_save_load_inference.
* test_save_load_with_weight_conversion[direction × scale] -> test_save_load_with_weight_conversion; PEFT skips
  random + weight_svd as non-deterministic, the package's "random" draws from a seeded per-layer generator, so
  that case runs too.
* test_cached_gradients -> test_cached_gradients (the second call must not run the model: its loss counts calls).
* test_lower_precision_dtype[fp16, bf16] -> test_lower_precision_dtype.
* test_quantized_model_rejection -> test_quantized_model_rejection (the ``quant_state`` marker on the module).
* test_unsupported_layer_types_no_error -> test_unsupported_layer_types_are_skipped_with_a_warning (PEFT skips
  silently; the package warns, naming them) and test_strict_targets_refuses_unsupported_layers.
* test_no_supported_layers_raises_error -> test_no_supported_layers_raises_error.

Conventions shared with PEFT's PiSSA/CorDA/EVA tests (tests/test_initialization.py) that apply here:
test_other_init_lora_weights_are_refused (an init value the package would overwrite), test_conflicting_slice_config
(the option given in two places) and test_lora_ga_config_without_lora_ga_init. The PEFT equality of every
direction × scale on Linear and Conv1D models is in tests/slice_init/test_peft.py
(test_peft_options_equal_peft_lora_ga). Not ported: PEFT's tests of other init methods (PiSSA, OLoRA, CorDA, EVA,
LoftQ), which this package does not implement and refuses (test_other_init_lora_weights_are_refused), and
bitsandbytes GPU tests (a quantized target is refused outright here).
"""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel
from peft.tuners.lora import LoraLayer

from slice_kernels import (
    SliceConfig,
    SliceConfigError,
    SliceInitError,
    get_slice_model,
    save_as_lora,
    save_initial_adapter,
)

DIRS = ["ArBr", "A2rBr", "ArB2r", "random"]
SCALES = ["stable", "weight_svd", "gd_scale", "unit"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def toy(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 10)).to(dtype)


def batches(n=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, 10, generator=g).to(dtype)} for _ in range(n)]


def sum_loss(model, batch):
    return model(batch["x"]).sum()


def ga_config(direction="ArB2r", scale="stable", **kw):
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["0"],
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=direction, scale=scale),
        **kw,
    )


def ga_model(model, cfg, n=8, **kw):
    return get_slice_model(model, cfg, current=batches(n), loss_fn=sum_loss, slice_config=None, **kw)


def reload_onto(base, saved_dir, cfg):
    """PEFT's reload of a saved, unconverted adapter onto the base it was initialized on. The package marks such
    an adapter so that ``PeftModel.from_pretrained`` refuses it (it is wrong on the original model; see
    slice_init/artifacts.py), so its weights are read back into a freshly wrapped copy of that base."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    plain = copy.deepcopy(cfg)
    plain.init_lora_weights, plain.lora_ga_config = True, None
    pm = get_peft_model(base, plain, autocast_adapter_dtype=False)
    result = set_peft_model_state_dict(pm, load_file(str(saved_dir / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    return pm


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_preprocess_basic():
    pm = get_slice_model(
        toy(), ga_config(), SliceConfig(method="lora_ga_peft", current_steps=4), current=batches(4), loss_fn=sum_loss
    )
    rep = pm.slice_init_report
    assert rep.method == "lora_ga_peft" and list(rep.layers) == ["0"]
    assert rep.layers["0"]["shape"] == [10, 10] and rep.layers["0"]["grad_norm"] > 0
    assert rep.layers["0"]["peft_direction"] == "ArB2r" and rep.layers["0"]["peft_scale"] == "stable"


def test_preprocess_two_layers_cross_entropy():
    """The older form of PEFT's test_preprocess_basic: Linear(10, 20) → ReLU → Linear(20, 5), targets "0" and "2",
    a cross-entropy loss. PEFT only checks that gradients get attached; at r = 4 its init would slice U[:, 4:8] of
    a 5-column SVD of layer "2". The package needs 2r ≤ min(m, n) and says so before touching the model; r = 2
    fits both layers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    g = torch.Generator().manual_seed(2)
    data = [{"x": torch.randn(2, 10, generator=g), "y": torch.randint(0, 5, (2,), generator=g)} for _ in range(8)]

    def ce(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["y"])

    def cfg(r):
        return LoraConfig(
            r=r,
            lora_alpha=8,
            target_modules=["0", "2"],
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable"),
        )

    before = state(model)
    with pytest.raises(SliceInitError, match=r"layer '2' of shape \(5, 20\).*2r = 8 ≤ min\(m, n\) = 5"):
        get_slice_model(model, cfg(4), current=data, loss_fn=ce)
    assert unchanged(model, before)
    pm = get_slice_model(model, cfg(2), current=data, loss_fn=ce)
    layers = pm.slice_init_report.layers
    assert layers["0"]["shape"] == [20, 10] and layers["2"]["shape"] == [5, 20]
    assert all(layers[n]["grad_norm"] > 0 for n in ("0", "2"))


def test_lora_ga_without_lora_ga_config_raises():
    model = toy()
    before = state(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="lora_ga", lora_ga_config=None)
    with pytest.raises(SliceInitError, match=r"needs lora_ga_config=LoraGAConfig"):
        ga_model(model, cfg)
    assert unchanged(model, before) and not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRS)
def test_save_load_inference(tmp_path, direction, scale):
    pm = ga_model(toy(), ga_config(direction, scale))
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = pm(x)
        assert torch.allclose(before, toy()(x), atol=1e-5)  # the absorbed W cancels the adapter at init
    pm.save_pretrained(str(tmp_path))
    # the modified base (W − s·B·A) without its LoRA layers, as PEFT's test reloads onto it
    loaded = reload_onto(pm.unload(), tmp_path, ga_config(direction, scale))
    with torch.no_grad():
        assert torch.allclose(before, loaded(x), atol=1e-5)
    A = loaded.base_model.model[0].lora_A["default"].weight
    assert A.abs().sum() > 0  # the loaded adapter is the init, not a fresh default LoRA


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRS)
def test_save_load_with_weight_conversion(tmp_path, direction, scale):
    pm = ga_model(toy(), ga_config(direction, scale))
    init_dir = tmp_path / "init_adapter"
    save_initial_adapter(pm, str(init_dir))
    with torch.no_grad():  # stands in for training: move the adapter away from its init
        pm.base_model.model[0].lora_B["default"].weight.mul_(1.5).add_(0.01)
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = pm(x)
        assert (before - toy()(x)).abs().max() > 1e-4
    out = tmp_path / "adapter"
    save_as_lora(pm, str(out), str(init_dir))
    loaded = PeftModel.from_pretrained(toy(), str(out))  # the original, untouched base
    with torch.no_grad():
        assert torch.allclose(before, loaded(x), atol=1e-5)


def test_cached_gradients(tmp_path):
    cache = tmp_path / "gradient_cache.safetensors"
    pm1 = get_slice_model(toy(), ga_config(), current=batches(), loss_fn=sum_loss, gradient_cache=str(cache))
    assert cache.exists() and cache.stat().st_size > 0
    calls = []
    model2 = toy()
    model2.register_forward_hook(lambda *a: calls.append(1))
    pm2 = get_slice_model(model2, ga_config(), current=None, loss_fn=sum_loss, gradient_cache=str(cache))
    assert not calls  # read from the cache: the model never ran
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(
            getattr(pm1.base_model.model[0], name)["default"].weight,
            getattr(pm2.base_model.model[0], name)["default"].weight,
            rtol=0,
            atol=0,
        )
    with torch.no_grad():
        assert torch.allclose(pm1(x), pm2(x), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lower_precision_dtype(tmp_path, dtype):
    pm = get_slice_model(
        toy(dtype), ga_config(), current=batches(dtype=dtype), loss_fn=sum_loss, autocast_adapter_dtype=False
    )
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    assert layers and all(
        m.lora_A["default"].weight.dtype == dtype and m.lora_B["default"].weight.dtype == dtype for m in layers
    )
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        before = pm(x)
    pm.save_pretrained(str(tmp_path))
    loaded = reload_onto(pm.unload(), tmp_path, ga_config())
    assert all(m.lora_A["default"].weight.dtype == dtype for m in loaded.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        assert torch.allclose(before.float(), loaded(x).float(), atol=1e-2)


class MockQuantizedLinear(torch.nn.Linear):
    """bitsandbytes' marker: a ``quant_state`` attribute on the layer (what PEFT's LoRA-GA checks)."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.quant_state = "mock_quantized"


def test_quantized_model_rejection():
    model = torch.nn.Sequential(MockQuantizedLinear(10, 10))
    before = state(model)
    with pytest.raises(SliceInitError, match=r"quantized.*'0'|'0'.*quantized"):
        ga_model(model, ga_config())
    assert unchanged(model, before) and not any(isinstance(m, LoraLayer) for m in model.modules())


class MixedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(10, 10)
        self.conv2d = torch.nn.Conv2d(3, 16, 3)
        self.embedding = torch.nn.Embedding(100, 10)

    def forward(self, x):
        return self.linear(x)


def mixed_config(targets=("linear", "conv2d", "embedding")):
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )


def test_unsupported_layer_types_are_skipped_with_a_warning():
    model = MixedModel()
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=r"skipping 2 module\(s\).*'conv2d'.*'embedding'"):
        pm = ga_model(model, mixed_config())
    assert list(pm.slice_init_report.layers) == ["linear"]
    lora = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(lora) == {"linear", "conv2d", "embedding"}  # PEFT still wraps them, with its ordinary init
    assert lora["linear"].lora_B["default"].weight.abs().sum() > 0
    assert torch.count_nonzero(lora["conv2d"].lora_B["default"].weight) == 0
    with torch.no_grad():
        out = pm(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        emb_ids = torch.arange(5)
        torch.testing.assert_close(pm.base_model.model.embedding(emb_ids), MixedModel().embedding(emb_ids))
    assert out.shape == (2, 10)


def test_embedding_beside_linear_is_skipped_with_a_warning():
    """The same as the PEFT case without the Conv2d: the Embedding is skipped with a warning naming it and keeps PEFT's ordinary LoRA (output unchanged at init), the Linear gets LoRA-GA."""
    model = MixedModel()
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=r"skipping 1 module\(s\).*'embedding' \(Embedding is an embedding"):
        pm = ga_model(model, mixed_config(("linear", "embedding")))
    assert list(pm.slice_init_report.layers) == ["linear"]
    lora = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(lora) == {"linear", "embedding"}
    assert lora["linear"].lora_B["default"].weight.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-5)
        ids = torch.arange(5)
        torch.testing.assert_close(pm.base_model.model.embedding(ids), MixedModel().embedding(ids))


def test_strict_targets_refuses_unsupported_layers():
    model = MixedModel()
    before = state(model)
    with pytest.raises(SliceInitError, match=r"2 target layer\(s\) cannot be initialized.*'conv2d', 'embedding'"):
        ga_model(model, mixed_config(), strict_targets=True)
    assert unchanged(model, before) and not any(isinstance(m, LoraLayer) for m in model.modules())


def test_no_supported_layers_raises_error():
    model = MixedModel()
    before = state(model)
    with pytest.raises(SliceInitError, match="no supported layer remains"):
        ga_model(model, mixed_config(("conv2d", "embedding")))
    assert unchanged(model, before)


@pytest.mark.parametrize(
    "init", [False, "gaussian", "pissa", "pissa_niter_4", "olora", "eva", "corda", "loftq", "orthogonal"]
)
def test_other_init_lora_weights_are_refused(init):
    model = toy()
    before = state(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    cfg.init_lora_weights = init  # set after construction: some values need extra sub-configs in LoraConfig
    with pytest.raises(SliceInitError, match=rf"init_lora_weights={init!r} is not supported.*SliceConfig\(method="):
        get_slice_model(model, cfg, SliceConfig(method="lora_ga", current_steps=4), current=batches(), loss_fn=sum_loss)
    assert unchanged(model, before)


def test_conflicting_slice_config():
    model = toy()
    before = state(model)
    with pytest.raises(SliceInitError, match=r"slice_config.method is 'slice'"):
        get_slice_model(model, ga_config(), SliceConfig(method="slice"), current=batches(), loss_fn=sum_loss)
    with pytest.raises(SliceInitError, match=r"peft_scale='stable' but lora_ga_config gives 'unit'"):
        get_slice_model(
            model, ga_config(scale="unit"), SliceConfig(method="lora_ga_peft"), current=batches(), loss_fn=sum_loss
        )
    assert unchanged(model, before)
    # the same options in both places are accepted, and the slice_config's other fields are used
    pm = get_slice_model(
        model,
        ga_config(scale="unit"),
        SliceConfig(method="lora_ga_peft", peft_scale="unit", current_steps=2),
        current=batches(2),
        loss_fn=sum_loss,
    )
    assert pm.slice_init_report.layers["0"]["peft_scale"] == "unit"


def test_lora_ga_config_without_lora_ga_init():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_ga_config=LoraGAConfig())
    with pytest.raises(SliceInitError, match="lora_ga_config is set but init_lora_weights=True"):
        get_slice_model(toy(), cfg, SliceConfig(method="lora"))


def test_peft_options_refused_on_other_methods():
    with pytest.raises(SliceConfigError, match="read by method='lora_ga_peft' only"):
        SliceConfig(method="lora_ga", peft_scale="unit")
    with pytest.raises(SliceConfigError, match="not SLICE's scale='stable'"):
        SliceConfig(method="lora_ga_peft", scale="stable")
    with pytest.raises(SliceConfigError, match="peft_direction='A2rBr2'"):
        SliceConfig(method="lora_ga_peft", peft_direction="A2rBr2")


def test_config_of_a_saved_adapter_is_refused():
    """A LoraConfig read back from a saved slice-kernels adapter carries its changed-base mark: refused by name."""
    pm = ga_model(toy(), ga_config())
    mark = pm.peft_config["default"].init_lora_weights
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    cfg.init_lora_weights = mark
    with pytest.raises(SliceInitError, match="changed-base mark"):
        get_slice_model(toy(), cfg, SliceConfig(method="lora"))
