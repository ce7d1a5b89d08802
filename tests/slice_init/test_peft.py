"""get_slice_model: the transformers + PEFT drop-in, its saving path, and the peer check against PEFT's LoRA-GA."""

import math
import warnings

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model, preprocess_loraga
from peft.tuners.lora import LoraLayer

from slice_kernels import (
    NonFiniteGradientError,
    SliceConfig,
    SliceInitError,
    collect_gradients,
    get_slice_model,
    save_as_lora,
    save_initial_adapter,
)
from slice_kernels.slice_init.config import METHODS
from tests.helpers import lm_batches, tiny_gpt2, tiny_llama

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D
}
MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def lora_cfg(arch, r=8, **kw):
    return LoraConfig(r=r, lora_alpha=2, use_rslora=True, target_modules=TARGETS[arch], **kw)


def slice_model(arch, dtype=torch.float32, method="slice", r=8, **cfg):
    cfg.setdefault("current_steps", 2)
    cfg.setdefault("replay_steps", 1)
    replay = [lm_batches(1, seed=11), lm_batches(1, seed=12)]
    return get_slice_model(
        MAKE[arch](dtype), lora_cfg(arch, r), SliceConfig(method=method, **cfg), current=lm_batches(2), replay=replay
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_unchanged_at_init(arch, dtype, method):
    """max |logits(init) − logits(float64 original)| ≤ 2 × max |logits(plain model in dtype) − float64|:
    absorbing W − s·B·A costs no more than the dtype itself already does."""
    x = lm_batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        ref = MAKE[arch](torch.float64)(input_ids=x).logits
        plain = MAKE[arch](dtype)(input_ids=x).logits.double()
        pm = slice_model(arch, dtype, method)
        out = pm(input_ids=x).logits.double()
    err_plain = (plain - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= 2 * err_plain, (err, err_plain)
    rep = pm.slice_init_report
    assert rep.method == method and len(rep.layers) == sum(isinstance(m, LoraLayer) for m in pm.modules())
    if method in ("slice", "lora_ga", "lora_ga_peft"):
        assert {"collect_current", "svd", "absorb"} <= set(rep.phases)
    if method != "lora":  # the init really moved the adapter away from zero and W with it
        lora_b = [m.lora_B["default"].weight for m in pm.modules() if isinstance(m, LoraLayer)]
        assert all(b.abs().sum() > 0 for b in lora_b)


def test_report_has_global_figures():
    pm = slice_model("llama", projection_strength=1.0)
    rep = pm.slice_init_report
    assert rep.Nc > 0 and rep.Np > 0 and rep.cos == pytest.approx(rep.D / math.sqrt(rep.Np * rep.Nc))
    assert rep.gamma == (pytest.approx(-rep.D / rep.Np) if rep.cos < 0 else 0.0)
    assert {"collect_current", "collect_replay", "statistics", "surgery", "svd", "scale", "absorb"} <= set(rep.phases)


def train_a_little(pm, steps=3):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    pm.train()
    for b in lm_batches(steps, seed=21):
        opt.zero_grad()
        pm(**b).loss.backward()
        opt.step()
    pm.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_converted_adapter_loads_on_untouched_base_and_merge(arch, tmp_path):
    x = lm_batches(1, seed=5)[0]["input_ids"]
    pm = slice_model(arch, method="slice", r=4)
    init_dir = tmp_path / "slice_init"
    save_initial_adapter(pm, str(init_dir))
    train_a_little(pm)
    with torch.no_grad():
        trained = pm(input_ids=x).logits
    out_dir = tmp_path / "lora"
    save_as_lora(pm, str(out_dir), str(init_dir))
    loaded = PeftModel.from_pretrained(MAKE[arch](), str(out_dir))  # the original, untouched base
    assert loaded.peft_config["default"].r == 8
    with torch.no_grad():
        conv = loaded(input_ids=x).logits
        base = MAKE[arch]()(input_ids=x).logits
    scale = (trained - base).abs().max().item()
    assert scale > 1e-3  # training moved the outputs, so the check below is not vacuous
    torch.testing.assert_close(conv, trained, rtol=0, atol=1e-5)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, trained, rtol=0, atol=1e-5)


def test_save_as_lora_without_initial_adapter_is_clear(tmp_path):
    pm = slice_model("llama", method="loram")
    with pytest.raises(SliceInitError, match="save_initial_adapter"):
        save_as_lora(pm, str(tmp_path / "out"), str(tmp_path / "missing"))


def test_peer_check_lora_ga_peft_equals_peft_lora_ga():
    """Same model, same batches: our lora_ga_peft vs PEFT's init_lora_weights="lora_ga" (preprocess_loraga).
    r = 16 makes PEFT's sketch q = min(4r, min(m, n)) span the whole column space of every layer, so its
    torch.svd_lowrank is exact and only singular-vector signs can differ (each row of A and each column of B
    is compared up to sign; the offset is checked through W_absorbed + s·B·A = W_original)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batches = lm_batches(3)
    orig = {n: m.weight.detach().clone() for n, m in tiny_llama().named_modules() if n.split(".")[-1] in targets}

    grads = collect_gradients(tiny_llama(), targets, batches, steps=3)
    torch.manual_seed(0)  # PEFT's torch.svd_lowrank draws its sketch from the global RNG
    peft_base = tiny_llama()
    cfg = LoraConfig(
        r=16,
        lora_alpha=2,
        use_rslora=True,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def train_step():
        for b in batches:
            peft_base(**b).loss.backward()

    preprocess_loraga(peft_base, cfg, train_step)
    theirs = get_peft_model(peft_base, cfg)
    ours = get_slice_model(
        tiny_llama(),
        LoraConfig(r=16, lora_alpha=2, use_rslora=True, target_modules=targets),
        SliceConfig(method="lora_ga_peft", current_steps=3),
        current=batches,
    )
    lt = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    lo = {n.removeprefix("base_model.model."): m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert set(lt) == set(lo) == set(orig)
    s = 2 / math.sqrt(16)
    for n in orig:
        At, Bt = lt[n].lora_A["default"].weight.detach(), lt[n].lora_B["default"].weight.detach()
        Ao, Bo = lo[n].lora_A["default"].weight.detach(), lo[n].lora_B["default"].weight.detach()
        assert Ao.dtype == At.dtype and Bo.dtype == Bt.dtype
        sa = torch.sign((At * Ao).sum(1, keepdim=True))
        sb = torch.sign((Bt * Bo).sum(0, keepdim=True))
        # Two float32 SVD routes give singular vector i up to ~eps32·σ₁/gap_i (Davis–Kahan), gap_i the distance
        # of σ_i to its neighbours, taken from the float64 spectrum of the same gradient. A's rows are v_0..v_{r-1},
        # B's columns u_r..u_{2r-1}·S·m^¼/4 (compared per unit column norm).
        S = torch.linalg.svdvals(grads[n].double())
        gap = torch.minimum(torch.cat([S[:1] * 0 + float("inf"), S[:-1] - S[1:]]), torch.cat([S[:-1] - S[1:], S[-1:]]))
        tol = 16 * torch.finfo(torch.float32).eps * S[0] / gap
        err_a = (Ao - sa * At).abs().amax(dim=1).double()
        assert (err_a <= tol[:16]).all(), (n, (err_a / tol[:16]).max())
        norms = Bt.norm(dim=0, keepdim=True)
        err_b = ((Bo - sb * Bt) / norms).abs().amax(dim=0).double()
        assert (err_b <= tol[16:32]).all(), (n, (err_b / tol[16:32]).max())
        torch.testing.assert_close(Bo.norm(dim=0), Bt.norm(dim=0), rtol=1e-5, atol=0)  # the S[r:2r] scale
        for lay, A, B in ((lo[n], Ao, Bo), (lt[n], At, Bt)):
            W = lay.get_base_layer().weight.detach()
            torch.testing.assert_close(W + s * B @ A, orig[n], rtol=0, atol=1e-6)


# ---- bad input: a clear error and the model exactly as it was (same state dict, no LoRA layers) ----


def _nan_loss(model, batch):
    return model(**batch).loss * float("nan")


BAD = [
    (dict(lora=dict(target_modules=["q_proj", "nope_proj"])), SliceInitError, "nope_proj"),
    (dict(lora=dict(target_modules=["embed_tokens"])), SliceInitError, "embedding"),
    (dict(lora=dict(r=17)), SliceInitError, r"2r = 34 ≤ min\(m, n\) = 32"),
    (dict(lora=dict(use_dora=True)), SliceInitError, "use_dora"),
    (dict(current=[]), SliceInitError, "needs 2 batches but has only 0"),
    (dict(current=None), SliceInitError, "needs the current task's batches"),
    (dict(current=lm_batches(1)), SliceInitError, "needs 2 batches but has only 1"),
    (dict(replay=lm_batches(2)), SliceInitError, "items look like batches"),
    (dict(loss_fn=_nan_loss), NonFiniteGradientError, r"layer 'model\.layers\.0\.self_attn\.q_proj'"),
]


@pytest.mark.parametrize("bad, exc, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_leaves_model_untouched(bad, exc, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    lkw = dict(r=8, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    lkw.update(bad.get("lora", {}))
    with pytest.raises(exc, match=match):
        get_slice_model(
            model,
            LoraConfig(**lkw),
            SliceConfig(current_steps=2, replay_steps=2),
            current=bad.get("current", lm_batches(2)),
            replay=bad.get("replay"),
            loss_fn=bad.get("loss_fn"),
        )
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg


def test_quantized_target_is_refused_untouched():
    model = tiny_llama()
    lin = model.model.layers[0].self_attn.v_proj
    lin.weight = torch.nn.Parameter(torch.zeros(lin.weight.shape, dtype=torch.int8), requires_grad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SliceInitError, match="quantized"):
        get_slice_model(
            model,
            LoraConfig(r=4, lora_alpha=2, target_modules=["v_proj"]),
            SliceConfig(current_steps=1),
            current=lm_batches(1),
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_with_lora_layers_is_refused():
    pm = slice_model("llama", method="lora")
    with pytest.raises(SliceInitError, match="already has LoRA layers"):
        get_slice_model(pm.base_model.model, lora_cfg("llama"), SliceConfig(method="lora"))


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offloaded"])
def test_cuda_model_matches_cpu(offload):
    """On CUDA (with and without CPU-offloaded accumulators) the init equals the CPU one up to float32
    round-off. Exact SVD: CPU and CUDA generators draw different sketches by design."""
    cfg = dict(method="slice", svd="exact", current_steps=2, replay_steps=1)
    replay = [lm_batches(1, seed=11), lm_batches(1, seed=12)]
    cpu = get_slice_model(tiny_llama(), lora_cfg("llama"), SliceConfig(**cfg), current=lm_batches(2), replay=replay)
    base = tiny_llama().cuda()
    x = lm_batches(1, seed=5)[0]["input_ids"].cuda()
    with torch.no_grad():
        ref = base(input_ids=x).logits
    gpu = get_slice_model(
        base, lora_cfg("llama"), SliceConfig(offload_gradients=offload, **cfg), current=lm_batches(2), replay=replay
    )
    with torch.no_grad():
        torch.testing.assert_close(gpu(input_ids=x).logits, ref, rtol=0, atol=1e-4)
    assert gpu.slice_init_report.phases["svd"]["memory"] == "cuda_max_allocated"
    lc = {n: m for n, m in cpu.named_modules() if isinstance(m, LoraLayer)}
    for n, m in gpu.named_modules():
        if isinstance(m, LoraLayer):
            for part in ("lora_A", "lora_B"):
                torch.testing.assert_close(
                    getattr(m, part)["default"].weight.cpu(), getattr(lc[n], part)["default"].weight, rtol=0, atol=1e-3
                )


def test_missing_target_modules_without_peft_default():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(SliceInitError, match="target_modules is None and PEFT has no default targets"):
        get_slice_model(model, LoraConfig(r=2, lora_alpha=2), SliceConfig(method="loram"))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_plain_torch_module_with_loss_fn():
    """Not only transformers: any module with Linear layers, a custom loss, outputs unchanged at init."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6))
    x = torch.randn(5, 12)
    batches = [(torch.randn(8, 12), torch.randn(8, 6)) for _ in range(3)]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    with torch.no_grad():
        before = model(x)
    pm = get_slice_model(
        model,
        LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]),
        SliceConfig(method="lora_ga", current_steps=3),
        current=batches,
        loss_fn=loss_fn,
    )
    with torch.no_grad():
        torch.testing.assert_close(pm(x), before, rtol=0, atol=1e-6)
    assert set(pm.slice_init_report.layers) == {"0", "2"}


def test_save_helpers_refuse_clashing_names(tmp_path):
    pm = slice_model("llama", method="loram")
    # a folder named like an adapter is fine now that the conversion reads files, not PEFT's temporary adapter
    save_initial_adapter(pm, str(tmp_path / "default"))
    save_as_lora(pm, str(tmp_path / "lora"), str(tmp_path / "default"))
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    with pytest.raises(SliceInitError, match="no adapter named 'other'"):
        save_initial_adapter(pm, str(tmp_path / "init"), adapter_name="other")


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, 4),  # PEFT's Llama default: q_proj, v_proj
        ("all-linear", 14),  # every Linear but the output layer
        (r".*\.0\..*proj", 7),  # a regex, full match, as PEFT
    ],
)
def test_target_resolution_follows_peft(spec, expected):
    pm = get_slice_model(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=spec), SliceConfig(method="loram"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert len(wrapped) == expected and wrapped == set(pm.slice_init_report.layers)


@pytest.mark.parametrize("mode", ["per_task", "pooled"])
def test_get_slice_model_equals_the_pieces(mode):
    """get_slice_model = collect_gradients + collect_replay_gradients + init_from_gradients + absorb."""
    from slice_kernels import collect_replay_gradients, init_from_gradients

    targets = ["q_proj", "o_proj"]
    cur = lm_batches(2)
    replay = [lm_batches(2, seed=11), lm_batches(2, seed=12)] if mode == "per_task" else lm_batches(3, seed=13)
    cfg = SliceConfig(current_steps=2, replay_steps=2, replay_mode=mode, conflict_threshold=1.0)
    pm = get_slice_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=2, target_modules=targets), cfg, current=cur, replay=replay
    )
    model = tiny_llama()
    g_cur = collect_gradients(model, targets, cur, steps=2)
    g_prev = collect_replay_gradients(model, targets, replay, steps=2, mode=mode)
    w = {n: m.weight.detach() for n, m in model.named_modules() if n in g_cur}
    ref = init_from_gradients(w, g_cur, g_prev, r=4, lora_alpha=2, use_rslora=False, config=cfg)
    assert pm.slice_init_report.gamma == ref.report.gamma != 0.0
    for n, m in pm.named_modules():
        if isinstance(m, LoraLayer):
            key = n.removeprefix("base_model.model.")
            assert torch.equal(m.lora_A["default"].weight, ref.A[key])
            assert torch.equal(m.lora_B["default"].weight, ref.B[key])
            assert torch.equal(m.get_base_layer().weight, ref.weights[key])


def test_targets_sharing_one_weight_are_refused_untouched():
    """Two targets on one shared weight: absorbing both offsets into it would change the outputs (each adapter
    adds back only its own s·B·A), so the init refuses with the model as it was; 'lora' (no offset) is fine."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
    b.weight = a.weight
    model = torch.nn.Sequential(a, torch.nn.Tanh(), b)
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = model(x)
    w0 = a.weight.detach().clone()
    batches = [(torch.randn(4, 6), torch.randn(4, 6)) for _ in range(2)]

    def loss_fn(m, bt):
        return torch.nn.functional.mse_loss(m(bt[0]), bt[1])

    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"])
    with pytest.raises(SliceInitError, match=r"target layer '0' shares its weight tensor with \['2'\]"):
        get_slice_model(model, cfg, SliceConfig(method="lora_ga", current_steps=2), current=batches, loss_fn=loss_fn)
    assert torch.equal(a.weight, w0) and not any(isinstance(m, LoraLayer) for m in model.modules())
    pm = get_slice_model(model, cfg, SliceConfig(method="lora"))
    with torch.no_grad():
        torch.testing.assert_close(pm(x), before, rtol=0, atol=0)


def test_tied_lm_head_target_is_refused_untouched():
    """lm_head tied to the input embeddings: the offset would also change the embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SliceInitError, match=r"'lm_head' shares its weight tensor with \['model.embed_tokens'\]"):
        get_slice_model(
            model,
            LoraConfig(r=4, lora_alpha=2, target_modules=["lm_head", "q_proj"]),
            SliceConfig(method="lora_ga", current_steps=2),
            current=lm_batches(2),
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("method", ["slice", "lora"])
def test_non_finite_weight_is_refused_before_any_batch(method):
    """A NaN weight used to surface (for the gradient methods) only after the collection, as a misleading NaN
    *gradient* of another layer, and not at all for "lora": now it is refused first, naming the layer, before any
    forward pass, with the model as it was."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(**batch).loss

    with pytest.raises(SliceInitError, match=r"layer 'model\.layers\.1\.self_attn\.v_proj': the weight has non-finite"):
        get_slice_model(
            model,
            LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
            SliceConfig(method=method, current_steps=2),
            current=lm_batches(2),
            loss_fn=loss_fn,
        )
    assert not calls  # no batch was run
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:  # bit for bit, the NaN included
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


# ---- PEFT's LoraGAConfig options (peft_direction × peft_scale) against PEFT itself and a float64 reference ----

PEFT_DIRS = ["ArBr", "A2rBr", "ArB2r", "random"]
PEFT_SCALES = ["stable", "weight_svd", "gd_scale", "unit"]


def peft_indices(direction, r, seed_indices=None):
    """(indices of A's rows of Vᵀ, indices of B's columns of U) of a PEFT LoRA-GA direction."""
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    return list(seed_indices), list(seed_indices)


def ref_lora_ga_f64(G, W, r, direction, scale, gamma, s, rows, indices=None):
    """PEFT's lora_ga_init written out in float64 with an exact SVD (no sign convention: compare up to sign)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    ia, ib = peft_indices(direction, r, indices)
    A, B, S_B = Vh[ia], U[:, ib] * S[ib], S[ib]
    if scale == "stable":
        B = B * rows**0.25 / gamma**0.5
    elif scale == "weight_svd":
        B = B * torch.linalg.svdvals(W.double())[0] / S_B[0]
    elif scale == "gd_scale":
        A, B = A / s, B / s
    return A, B, S


@pytest.mark.parametrize("scale", PEFT_SCALES)
@pytest.mark.parametrize("direction", PEFT_DIRS)
def test_peft_options_match_float64_reference(direction, scale):
    """The package's lora_ga_peft (exact SVD, float32 factors) against the float64 formula; gradients with a
    geometric spectrum (σ_i = 10·0.8^i), so every singular vector is well separated and the comparison is tight
    up to the sign of each singular vector. Conv1D-style (fan_in_fan_out) layer: PEFT's rows = in_features."""
    from slice_kernels import init_from_gradients
    from slice_kernels.ops.rsvd import layer_seed
    from slice_kernels.slice_init.factors import peft_random_indices
    from tests.slice_init.test_variants import gapped

    r, gamma = 4, 9
    g = {"lin": gapped(40, 24, seed=1).float(), "conv": gapped(24, 40, seed=2).float()}
    gen = torch.Generator().manual_seed(3)
    W = {n: 0.05 * torch.randn(*t.shape, generator=gen) for n, t in g.items()}
    W["lin"] += 3.0 * torch.outer(torch.randn(40, generator=gen), torch.randn(24, generator=gen)) / 30
    cfg = SliceConfig(method="lora_ga_peft", svd="exact", peft_direction=direction, peft_scale=scale)
    cfg.peft_stable_gamma = gamma
    res = init_from_gradients(W, g, None, r=r, lora_alpha=3.0, use_rslora=False, config=cfg, fan_in_fan_out={"conv"})
    s = 3.0 / r
    for n, rows in (("lin", 40), ("conv", 40)):  # conv: (out, in) = (24, 40), stored (40, 24): rows = 40
        idx = peft_random_indices(layer_seed(0, n), r).tolist() if direction == "random" else None
        A_ref, B_ref, S = ref_lora_ga_f64(g[n], W[n], r, direction, scale, gamma, s, rows, idx)
        A, B = res.A[n].double(), res.B[n].double()
        sa = torch.sign((A * A_ref).sum(1, keepdim=True))
        sb = torch.sign((B * B_ref).sum(0, keepdim=True))
        assert (sa != 0).all() and (sb != 0).all()
        torch.testing.assert_close(A, sa * A_ref, rtol=0, atol=2e-5 * A_ref.abs().max().item())
        torch.testing.assert_close(B, sb * B_ref, rtol=0, atol=2e-5 * B_ref.abs().max().item())
        assert res.report.layers[n]["peft_direction"] == direction
        if direction == "random":
            assert res.report.layers[n]["peft_indices"] == idx
            assert len(set(idx)) == r and all(0 <= i < 2 * r for i in idx)
        # the absorbed weight cancels the adapter exactly as stored
        torch.testing.assert_close(res.weights[n] + s * res.B[n] @ res.A[n], W[n], rtol=0, atol=1e-6)


def _spiked(model, targets):
    """Give every target weight a dominant singular value (σ₁ ≈ 5·σ₂): PEFT's "weight_svd" reads σ₁(W) from
    svd_lowrank(W, q=r, niter=4), which then converges to float32 rounding, so it can be compared exactly."""
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.split(".")[-1] in targets:
                w = mod.weight
                u = torch.randn(w.shape[0], 1, generator=gen)
                v = torch.randn(1, w.shape[1], generator=gen)
                top = torch.linalg.svdvals(w.double())[0].item()
                w += (5 * top / (u.norm() * v.norm())) * u @ v
    return model


def _peer_models(arch, direction, scale, r=16):
    """(PEFT's LoRA-GA model, ours from the same LoraConfig, original weights, our layer seeds). Same batches,
    same spiked weights; PEFT's randperm for "random" is fed the indices the package draws from its seeds."""
    from slice_kernels.ops.rsvd import layer_seed
    from slice_kernels.slice_init.factors import peft_random_indices
    from tests.slice_init.test_variants import no_dropout

    targets = TARGETS[arch]
    batches = lm_batches(3, seed=70)
    make = lambda: _spiked(no_dropout(MAKE[arch]()), targets)  # noqa: E731  PEFT collects in train mode
    orig = {n: m.weight.detach().clone() for n, m in make().named_modules() if n.split(".")[-1] in targets}

    def cfg():
        return LoraConfig(
            r=r,
            lora_alpha=2,
            use_rslora=True,
            target_modules=targets,
            fan_in_fan_out=arch == "gpt2",
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(direction=direction, scale=scale),
        )

    theirs_base = make()
    c = cfg()

    def train_step():
        for b in batches:
            theirs_base(**b).loss.backward()

    torch.manual_seed(0)  # PEFT's svd_lowrank sketches come from the global RNG
    preprocess_loraga(theirs_base, c, train_step)
    picks = iter([peft_random_indices(layer_seed(0, n), r) for n in orig])
    real_randperm = torch.randperm

    def randperm(k, *a, **kw):  # PEFT's "random": the package's per-layer draw, in PEFT's layer order
        assert k == 2 * r
        return torch.cat([next(picks), torch.tensor([i for i in range(k)], dtype=torch.long)])[:k]

    if direction == "random":
        torch.randperm = randperm
    try:
        theirs = get_peft_model(theirs_base, c)
    finally:
        torch.randperm = real_randperm
    if direction == "random":
        assert next(picks, None) is None  # PEFT drew once per layer
    ours = get_slice_model(
        make(),
        cfg(),
        SliceConfig(method="lora_ga_peft", current_steps=3, svd="exact", peft_direction=direction, peft_scale=scale),
        current=batches,
    )
    return theirs, ours, orig


@pytest.mark.parametrize("scale", PEFT_SCALES)
@pytest.mark.parametrize("direction", PEFT_DIRS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_options_equal_peft_lora_ga(arch, direction, scale):
    """Every LoraGAConfig direction × scale: A, B and the absorbed W of get_slice_model(LoraConfig(
    init_lora_weights="lora_ga", lora_ga_config=...)) equal PEFT's preprocess_loraga + get_peft_model on the same
    model and batches (Linear and GPT-2 Conv1D). r = 16 makes PEFT's sketch span every layer (exact SVD); signs of
    singular vectors are free, so each row of A / column of B is compared up to sign, and W through
    W + s·B·A = W_original. Tolerance: 1e-4 of each factor's largest entry (two float32 SVD routes of gradients
    collected by two float32 backward passes; the tiny models' spectra have gaps down to ~1e-2·σ₁)."""
    theirs, ours, orig = _peer_models(arch, direction, scale)
    lt = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    lo = {n.removeprefix("base_model.model."): m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert set(lt) == set(lo) == set(orig)
    s = 2 / math.sqrt(16)
    for n in orig:
        At, Bt = lt[n].lora_A["default"].weight.detach(), lt[n].lora_B["default"].weight.detach()
        Ao, Bo = lo[n].lora_A["default"].weight.detach(), lo[n].lora_B["default"].weight.detach()
        assert Ao.shape == At.shape and Bo.shape == Bt.shape and Ao.dtype == At.dtype
        sa = torch.sign((At * Ao).sum(1, keepdim=True))
        sb = torch.sign((Bt * Bo).sum(0, keepdim=True))
        torch.testing.assert_close(Ao, sa * At, rtol=0, atol=1e-4 * At.abs().max().item())
        torch.testing.assert_close(Bo, sb * Bt, rtol=0, atol=1e-4 * Bt.abs().max().item())
        torch.testing.assert_close(Bo.norm(dim=0), Bt.norm(dim=0), rtol=1e-4, atol=0)  # the scale itself
        for lay, A, B in ((lo[n], Ao, Bo), (lt[n], At, Bt)):
            Wst = lay.get_base_layer().weight.detach()
            off = s * B @ A
            torch.testing.assert_close(Wst + (off.T if arch == "gpt2" else off), orig[n], rtol=0, atol=1e-5)
    # the adapter is written: PEFT must not run its own LoRA-GA again when the saved config is loaded
    assert ours.peft_config["default"].init_lora_weights != "lora_ga"
    assert ours.peft_config["default"].lora_ga_config is None


def test_weight_svd_randomized_sigma1_is_seeded_and_close_to_exact():
    """peft_scale="weight_svd" with the default randomized SVD: σ₁(W) from a seeded sketch of q = r columns and
    svd_niter power iterations (PEFT's svd_lowrank(W, q=r, niter=4) with a reproducible sketch). On a weight with
    a dominant singular value it equals the exact σ₁ to float32 rounding, and two runs agree bit for bit."""
    from slice_kernels.slice_init.factors import top_weight_singular_value

    gen = torch.Generator().manual_seed(4)
    W = (
        0.05 * torch.randn(48, 40, generator=gen)
        + torch.outer(torch.randn(48, generator=gen), torch.randn(40, generator=gen)) / 4
    )
    exact = torch.linalg.svdvals(W.double())[0].item()
    cfg = SliceConfig(method="lora_ga_peft", peft_scale="weight_svd")
    a = top_weight_singular_value(W, 4, cfg, seed=123)
    assert a == top_weight_singular_value(W, 4, cfg, seed=123)
    assert a == pytest.approx(exact, rel=1e-5)
    assert top_weight_singular_value(W, 4, SliceConfig(method="lora_ga_peft", svd="exact"), seed=0) == pytest.approx(
        exact, rel=1e-12
    )
