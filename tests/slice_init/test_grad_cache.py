"""get_slice_model(..., gradient_cache=path): collected gradients are saved, reused without running the model, and
refused for any other model, targets, dtype, gradients or collection settings."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from slice_kernels import SliceConfig, SliceInitError, collect_gradients, get_slice_model
from slice_kernels.slice_init import grad_cache
from tests.helpers import lm_batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def lcfg(targets=TARGETS):
    return LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=list(targets))


def scfg(**kw):
    kw.setdefault("current_steps", 2)
    kw.setdefault("replay_steps", 1)
    kw.setdefault("svd", "exact")
    return SliceConfig(**kw)


REPLAY = [lm_batches(1, seed=11), lm_batches(1, seed=12)]


def factors(pm):
    return {
        n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
        for n, m in pm.named_modules()
        if isinstance(m, LoraLayer)
    }


def counted(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return model, calls


def test_cache_is_written_then_reused_without_running_the_model(tmp_path):
    path = tmp_path / "g" / "grads.safetensors"  # the folder is created
    pm1 = get_slice_model(tiny_llama(), lcfg(), scfg(), current=lm_batches(2), replay=REPLAY, gradient_cache=path)
    assert path.exists()
    fp = grad_cache.read_fingerprint(str(path))
    assert fp["gradients"] == ["current", "replay"] and len(fp["layers"]) == 4
    assert fp["collection"]["current_steps"] == 2 and fp["collection"]["replay_steps"] == 1
    # the stored G_cur is the collected gradient itself (saved before the surgery overwrote it in place)
    from safetensors.torch import load_file

    stored = load_file(str(path))
    fresh = collect_gradients(tiny_llama(), TARGETS, lm_batches(2), steps=2)
    for n, g in fresh.items():
        torch.testing.assert_close(stored[f"current/{n}"], g, rtol=0, atol=0)
    model, calls = counted(tiny_llama())
    pm2 = get_slice_model(model, lcfg(), scfg(), current=None, replay=REPLAY, gradient_cache=path)
    assert not calls
    f1, f2 = factors(pm1), factors(pm2)
    assert f1.keys() == f2.keys()
    for n in f1:
        for a, b in zip(f1[n], f2[n]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "load_gradient_cache" in pm2.slice_init_report.phases
    assert pm1.slice_init_report.gamma == pm2.slice_init_report.gamma


def _refused(path, match, model=None, lora=None, slice_config=None, replay=REPLAY, **kw):
    model = model if model is not None else tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, calls = counted(model)
    with pytest.raises(SliceInitError, match=match):
        get_slice_model(
            model,
            lora or lcfg(),
            slice_config or scfg(),
            current=lm_batches(2),
            replay=replay,
            gradient_cache=path,
            **kw,
        )
    assert not calls  # refused before any forward pass
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "grads.safetensors"
    get_slice_model(tiny_llama(), lcfg(), scfg(), current=lm_batches(2), replay=REPLAY, gradient_cache=path)
    return path


def test_other_weights_are_refused(cache):
    _refused(cache, r"weight checksum differ", model=tiny_llama(seed=1))


def test_other_targets_are_refused(cache):
    _refused(cache, r"target layers: cache", lora=lcfg(["q_proj", "k_proj"]))


def test_other_dtype_is_refused(cache):
    _refused(cache, r"dtype, weight checksum differ", model=tiny_llama(torch.bfloat16))


def test_other_collection_settings_are_refused(cache):
    _refused(cache, r"collection.current_steps: cache 2, now 3", slice_config=scfg(current_steps=3))
    _refused(cache, r"collection.collect_train_mode", slice_config=scfg(collect_train_mode=True))
    _refused(
        cache,
        r"collection.replay_mode: cache 'per_task', now 'pooled'",
        slice_config=scfg(replay_mode="pooled"),
        replay=lm_batches(1),
    )


def test_other_loss_is_refused(cache):
    _refused(cache, r"collection.loss_fn: cache 'default'", loss_fn=lambda m, b: m(**b).loss)


def test_which_gradients_must_match(cache, tmp_path):
    # a slice cache with replay, asked for without replay (task 1), and a lora_ga cache asked for by slice
    _refused(cache, r"gradients: cache \['current', 'replay'\], now \['current'\]", replay=None)
    ga = tmp_path / "ga.safetensors"
    get_slice_model(tiny_llama(), lcfg(), scfg(method="lora_ga"), current=lm_batches(2), gradient_cache=ga)
    assert grad_cache.read_fingerprint(str(ga))["gradients"] == ["current"]
    _refused(ga, r"gradients: cache \['current'\], now \['current', 'replay'\]")
    # the same current gradient serves another current-only method
    model, calls = counted(tiny_llama())
    get_slice_model(model, lcfg(), scfg(method="lora_ga_peft"), current=None, gradient_cache=ga)
    assert not calls


def test_a_file_that_is_not_a_cache_is_refused(tmp_path):
    peft_style = tmp_path / "gradient_cache.pt"
    torch.save({"model.layers.0.self_attn.q_proj._peft_loraga_grad": torch.zeros(3)}, peft_style)
    _refused(peft_style, r"is not a slice_kernels gradient cache")
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    _refused(bare, r"without slice_kernels' fingerprint")


def test_tampered_cache_is_refused(cache, tmp_path):
    """A cache whose fingerprint matches but whose tensors do not (edited by hand) is refused, not used."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith("replay/"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    _refused(bad, r"expected \(\d+, \d+\) float32")
    del tensors[key]
    save_file(tensors, str(bad), metadata=meta)
    _refused(bad, r"lacks 'replay/")


def test_cache_with_a_method_without_gradients_is_refused(tmp_path):
    _refused(tmp_path / "g.safetensors", r"method 'loram' uses no gradients", slice_config=scfg(method="loram"))
    assert not (tmp_path / "g.safetensors").exists()
