"""The surgery variants of the authors' code (RamiroNB/slice) as SliceConfig options, and PEFT's LoRA-GA preset on
Conv1D layers: each against a float64 computation written out here (shapes ≤ 64).

Gradients go in as float64 with ``inplace_gradients=True``: the surgery writes G̃ into the g_cur tensors, which
the tests read back and compare with their own combination of G_cur and G_prev.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from slice_kernels import (
    SliceConfig,
    SliceConfigError,
    SliceInitError,
    collect_gradients,
    collect_replay_gradients,
    dispatch,
    get_slice_model,
    init_from_gradients,
)
from slice_kernels.slice_init.collect import Rebatched
from tests.helpers import lm_batches, tiny_gpt2, tiny_llama

EPS32 = float(torch.finfo(torch.float32).eps)
SHAPES = [(40, 24), (24, 40), (33, 33), (20, 28), (36, 18)]


@pytest.fixture(autouse=True)
def reference_backend():
    with dispatch.use_backend("torch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


def pair(seed=0, mix=(-0.5, 0.8, -0.2, 0.3, -1.0)):
    """G_cur, G_prev (float64) whose layers conflict or agree by the sign of ``mix``."""
    g = torch.Generator().manual_seed(seed)
    gp = {f"l{i}": torch.randn(m, n, generator=g, dtype=torch.float64) for i, (m, n) in enumerate(SHAPES)}
    gc = {n: mix[i] * gp[n] + torch.randn(*gp[n].shape, generator=g, dtype=torch.float64) for i, n in enumerate(gp)}
    return gc, gp


def weights_like(g, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return {n: 0.05 * torch.randn(*t.shape, generator=gen, dtype=torch.float32) for n, t in g.items()}


def run(gc, gp, r=4, **cfg):
    cfg.setdefault("svd", "exact")
    gt = {n: t.clone() for n, t in gc.items()}
    res = init_from_gradients(
        weights_like(gc), gt, gp, r=r, lora_alpha=2.0, config=SliceConfig(**cfg), inplace_gradients=True
    )
    return res, gt


def dot(a, b):
    return float((a * b).sum())


def totals(gc, gp):
    D = sum(dot(gc[n], gp[n]) for n in gc)
    Np = sum(dot(gp[n], gp[n]) for n in gc)
    Nc = sum(dot(gc[n], gc[n]) for n in gc)
    return D, Np, Nc


def cos_of(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- defaults: the paper's surgery, reported as such ----


def test_defaults_are_the_papers_surgery():
    cfg = SliceConfig()
    assert (cfg.grad_project, cfg.retain_scale, cfg.grad_project_always, cfg.add_retain_grad) == (
        True,
        1.0,
        False,
        False,
    )
    assert (cfg.magnitude_preserve, cfg.per_layer_threshold, cfg.per_layer_threshold_delta) == (False, False, 0.0)
    assert (cfg.retain_batch_size, cfg.single_retain_task_mode, cfg.direction) == (None, False, "A2rBr")
    gc, gp = pair()
    D, Np, _ = totals(gc, gp)
    assert D < 0
    res, gt = run(gc, gp)
    gamma = -D / (Np + 1e-12)
    for n in gc:
        close(gt[n], gc[n] + gamma * gp[n])
    v = res.report.variant
    assert v["name"] == "pcgrad" and v["applied"] and v["gate"] == "cos<tau" and v["tau"] == 0.0
    assert v["replay_tasks"] == "all" and v["replay_batch_size"] is None and v["direction"] == "A2rBr"
    # task 1: nothing to reconcile, the report says so
    first, _ = run(gc, None)
    assert first.report.variant["name"] == "pcgrad" and not first.report.variant["applied"]
    assert (
        init_from_gradients(
            weights_like(gc), None, r=2, lora_alpha=2.0, config=SliceConfig(method="loram")
        ).report.variant["name"]
        == "none"
    )


# ---- 1. always-project (OGD-like) ----


@pytest.mark.parametrize("c", [1.0, 0.4])
def test_always_project_global(c):
    gc, gp = pair(mix=(0.9, 0.8, 0.7, 0.6, 0.5))  # agreement everywhere: the default gate stays shut
    D, Np, Nc = totals(gc, gp)
    assert D > 0
    res, gt = run(gc, gp, projection_strength=c)
    assert res.report.gamma == 0.0 and all(torch.equal(gt[n], gc[n]) for n in gc)
    res, gt = run(gc, gp, projection_strength=c, grad_project_always=True)
    gamma = -c * D / (Np + 1e-12)
    assert res.report.gamma == pytest.approx(gamma, rel=1e-12)
    assert res.report.cos == pytest.approx(D / math.sqrt(Np * Nc), rel=1e-12)
    for n in gc:
        close(gt[n], gc[n] + gamma * gp[n])
        assert res.report.layers[n]["projected"] and res.report.layers[n]["tau"] is None
    if c == 1.0:
        assert abs(sum(dot(gt[n], gp[n]) for n in gc)) <= 1e-10 * math.sqrt(Np * Nc)
    assert res.report.variant["name"] == "pcgrad+always" and res.report.variant["gate"] == "always"


def test_always_project_per_module():
    gc, gp = pair()
    res, gt = run(gc, gp, grad_project_always=True, projection_scope="per_module")
    for n in gc:
        gamma = -dot(gc[n], gp[n]) / (dot(gp[n], gp[n]) + 1e-12)  # also where the layer agrees (D > 0)
        assert res.report.layers[n]["gamma"] == pytest.approx(gamma, rel=1e-12)
        close(gt[n], gc[n] + gamma * gp[n])
        assert abs(dot(gt[n], gp[n])) <= 1e-10 * float(gc[n].norm() * gp[n].norm())


# ---- 2. add the replay gradient back ----


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_add_retain_grad(scope):
    gc, gp = pair()
    res, gt = run(gc, gp, add_retain_grad=True, projection_scope=scope)
    D, Np, _ = totals(gc, gp)
    for n in gc:
        if scope == "global":
            gamma = -D / (Np + 1e-12)
        else:
            d = dot(gc[n], gp[n])
            gamma = -d / (dot(gp[n], gp[n]) + 1e-12) if d < 0 else 0.0
        ref = gc[n] + gamma * gp[n] + gp[n]  # added on every layer, also where γ = 0 (the reference's order)
        close(gt[n], ref)
        lay = res.report.layers[n]
        assert lay["gamma"] == pytest.approx(gamma, rel=1e-12, abs=0)
        assert lay["prev_coef"] == pytest.approx(gamma + 1.0, rel=1e-12)
        assert lay["grad_norm"] == pytest.approx(float(ref.norm()), rel=1e-10)
    assert res.report.variant["name"] == "pcgrad+add_retain_grad" and res.report.variant["add_retain_grad"]


def test_add_retain_grad_without_conflict_still_adds():
    gc, gp = pair(mix=(0.9, 0.8, 0.7, 0.6, 0.5))
    res, gt = run(gc, gp, add_retain_grad=True)
    assert res.report.gamma == 0.0
    for n in gc:
        close(gt[n], gc[n] + gp[n])


# ---- 3. the plain difference G_cur − λ·G_prev ----


@pytest.mark.parametrize("lam", [1.0, 0.35, 0.0, -0.5])
@pytest.mark.parametrize("mix", [(-0.5, 0.8, -0.2, 0.3, -1.0), (0.9, 0.8, 0.7, 0.6, 0.5)], ids=["mixed", "agree"])
def test_plain_difference(lam, mix):
    gc, gp = pair(mix=mix)
    res, gt = run(gc, gp, grad_project=False, retain_scale=lam)
    D, Np, Nc = totals(gc, gp)
    assert res.report.gamma == -lam and res.report.cos == pytest.approx(D / math.sqrt(Np * Nc), rel=1e-12)
    for n in gc:
        ref = gc[n] - lam * gp[n]  # no gate: every layer, whatever the cosine
        close(gt[n], ref)
        assert res.report.layers[n]["grad_norm"] == pytest.approx(float(ref.norm()), rel=1e-9)
        assert not res.report.layers[n]["projected"]
    v = res.report.variant
    assert v["surgery"] == "difference" and v["retain_scale"] == lam and v["gate"] is None
    assert v["name"] == f"difference(retain_scale={lam:g})"


# ---- 4. magnitude-preserving rescale ----


@pytest.mark.parametrize("scope", ["global", "per_module"])
@pytest.mark.parametrize("add", [False, True])
def test_magnitude_preserve(scope, add):
    gc, gp = pair()
    res, gt = run(gc, gp, magnitude_preserve=True, projection_scope=scope, add_retain_grad=add)
    D, Np, _ = totals(gc, gp)
    for n in gc:
        if scope == "global":
            gamma = -D / (Np + 1e-12)
        else:
            d = dot(gc[n], gp[n])
            gamma = -d / (dot(gp[n], gp[n]) + 1e-12) if d < 0 else 0.0
        proj = gc[n] + gamma * gp[n]
        ref = proj * (gc[n].norm() / proj.norm()) if gamma != 0.0 else gc[n].clone()  # per layer, to ‖G_cur,ℓ‖
        if add:
            ref = ref + gp[n]  # after the rescale, as the reference orders them
        close(gt[n], ref)
        if not add:
            assert float(gt[n].norm()) == pytest.approx(float(gc[n].norm()), rel=1e-12)
        assert res.report.layers[n]["grad_norm"] == pytest.approx(float(ref.norm()), rel=1e-10)
        assert res.report.layers[n]["cur_coef"] == pytest.approx(
            float(gc[n].norm() / proj.norm()) if gamma else 1.0, rel=1e-12
        )
    if scope == "per_module":  # layers that agree with the replay are not projected, so not rescaled
        assert any(res.report.layers[n]["cur_coef"] == 1.0 for n in gc)
    assert "magnitude_preserve" in res.report.variant["name"]


def test_magnitude_preserve_without_conflict_is_identity():
    gc, gp = pair(mix=(0.9, 0.8, 0.7, 0.6, 0.5))
    _, gt = run(gc, gp, magnitude_preserve=True)
    assert all(torch.equal(gt[n], gc[n]) for n in gc)


# ---- 5. per-layer gate by the median cosine ----


@pytest.mark.parametrize("delta", [0.0, 0.1, -0.05])
@pytest.mark.parametrize("layers", [5, 4], ids=["odd", "even"])
def test_per_layer_median_gate(delta, layers):
    gc, gp = pair()
    gc = {n: gc[n] for n in list(gc)[:layers]}
    gp = {n: gp[n] for n in gc}
    res, gt = run(gc, gp, projection_scope="per_module", per_layer_threshold=True, per_layer_threshold_delta=delta)
    cos = {n: cos_of(gc[n], gp[n]) for n in gc}
    median = sorted(cos.values())[len(cos) // 2]  # the reference's (upper) median
    tau = median - delta
    assert res.report.variant["median_cos"] == pytest.approx(median, rel=1e-12)
    assert res.report.variant["tau"] == pytest.approx(tau, rel=1e-12, abs=1e-15)
    assert res.report.gamma is None
    n_on = 0
    for n in gc:
        on = cos[n] < tau
        n_on += on
        gamma = -dot(gc[n], gp[n]) / (dot(gp[n], gp[n]) + 1e-12) if on else 0.0
        assert res.report.layers[n]["projected"] == on
        assert res.report.layers[n]["tau"] == pytest.approx(tau, rel=1e-12, abs=1e-15)
        close(gt[n], gc[n] + gamma * gp[n])
    assert 0 < n_on < len(gc) or delta < 0  # the gate splits the layers: it is not the sign rule
    assert res.report.variant["name"] == "pcgrad+per_layer_median"


def test_per_layer_median_differs_from_the_sign_gate():
    gc, gp = pair()
    _, gt_med = run(gc, gp, projection_scope="per_module", per_layer_threshold=True)
    _, gt_sign = run(gc, gp, projection_scope="per_module")
    assert any(not torch.equal(gt_med[n], gt_sign[n]) for n in gc)


# ---- 6. top_r_no_sigma ----


def gapped(m, n, seed, top=10.0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor([top * 0.8**i for i in range(k)], dtype=torch.float64)) @ V.T


def ref_svd(G):
    U, S, Vt = np.linalg.svd(G.numpy(), full_matrices=False)
    for i in range(U.shape[1]):
        j = np.argmax(np.abs(U[:, i]))
        if U[j, i] < 0:
            U[:, i] *= -1
            Vt[i, :] *= -1
    return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vt.T.copy())


def vec_tol(S, k):
    top = S[: k + 1]
    return 200 * EPS32 * S[0].item() / (top[:-1] - top[1:]).abs().min().item()


@pytest.mark.parametrize("method", ["slice", "lora_ga"])
@pytest.mark.parametrize("r", [1, 5, 20])  # 20: 2r > min(m, n) = 24, allowed with the top r only
def test_top_r_no_sigma(method, r):
    gc = {f"l{i}": gapped(m, n, seed=i) for i, (m, n) in enumerate([(40, 24), (24, 40)])}
    W = weights_like(gc)
    unit = init_from_gradients(
        W,
        gc,
        None,
        r=r,
        lora_alpha=2.0,
        config=SliceConfig(method=method, svd="exact", scale="unit", direction="top_r_no_sigma"),
    )
    var = init_from_gradients(
        W, gc, None, r=r, lora_alpha=2.0, config=SliceConfig(method=method, svd="exact", direction="top_r_no_sigma")
    )
    for n, G in gc.items():
        U, S, V = ref_svd(G)
        tol = vec_tol(S, r)
        torch.testing.assert_close(unit.B[n].double(), U[:, :r], rtol=0, atol=tol)  # no σ on either side
        torch.testing.assert_close(unit.A[n].double(), V[:, :r].T, rtol=0, atol=tol)
        # the variance scale still applies: Var(BA) = ρ·Var(W)
        m, k = W[n].shape
        rho = math.log(max(2, r)) / math.log(max(2, min(m, k)))
        var_w = float(torch.var(W[n].double().reshape(-1)))
        BA = var.B[n].double() @ var.A[n].double()
        assert float(torch.var(BA.reshape(-1))) == pytest.approx(rho * var_w, rel=1e-4)
        s = 2.0 / math.sqrt(r)
        torch.testing.assert_close(var.weights[n].double(), W[n].double() - s * BA, rtol=0, atol=1e-6)
    assert var.report.variant["direction"] == "top_r_no_sigma"


def test_top_r_no_sigma_rank_bound_names_the_layer():
    gc = {"a": gapped(40, 24, seed=0)}
    with pytest.raises(SliceInitError, match=r"'a'.*top_r_no_sigma.*r = 25 ≤ min\(m, n\) = 24"):
        init_from_gradients(
            weights_like(gc), gc, None, r=25, lora_alpha=2.0, config=SliceConfig(direction="top_r_no_sigma")
        )
    with pytest.raises(SliceInitError, match=r"2r = 26"):  # the other slices still need 2r
        init_from_gradients(weights_like(gc), gc, None, r=13, lora_alpha=2.0, config=SliceConfig())


# ---- validation: every option, and the combinations in which one would do nothing ----

BAD = [
    (dict(grad_project="yes"), "grad_project"),
    (dict(retain_scale=float("nan")), "retain_scale"),
    (dict(grad_project_always=1), "grad_project_always"),
    (dict(add_retain_grad=None), "add_retain_grad"),
    (dict(magnitude_preserve="no"), "magnitude_preserve"),
    (dict(per_layer_threshold=0), "per_layer_threshold"),
    (dict(per_layer_threshold_delta=3.0, per_layer_threshold=True, projection_scope="per_module"), "delta"),
    (dict(retain_batch_size=0), "retain_batch_size"),
    (dict(retain_batch_size=2.5), "retain_batch_size"),
    (dict(single_retain_task_mode="last"), "single_retain_task_mode"),
    (dict(direction="top_r"), "direction"),
    (dict(retain_scale=0.5), "grad_project=False"),
    (dict(grad_project=False, add_retain_grad=True), "add_retain_grad=True"),
    (dict(grad_project=False, grad_project_always=True), "grad_project_always"),
    (dict(grad_project=False, magnitude_preserve=True), "magnitude_preserve"),
    (dict(grad_project=False, conflict_threshold=0.2), "conflict_threshold"),
    (dict(grad_project=False, projection_strength=0.5), "projection_strength"),
    (dict(grad_project_always=True, conflict_threshold=0.3), "no gate"),
    (dict(per_layer_threshold=True), "projection_scope='per_module'"),
    (dict(per_layer_threshold=True, projection_scope="per_module", conflict_threshold=0.1), "leave conflict_threshold"),
    (dict(per_layer_threshold=True, projection_scope="per_module", grad_project_always=True), "no gate"),
    (dict(per_layer_threshold_delta=0.1), "per_layer_threshold=True"),
    (dict(single_retain_task_mode=True, replay_mode="pooled"), "replay_mode='per_task'"),
    (dict(single_retain_task_mode=True, retain_batch_size=4), "drop retain_batch_size"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[f"{i}-{list(k)[0]}" for i, (k, _) in enumerate(BAD)])
def test_bad_variant_options_are_refused(kw, match):
    with pytest.raises(SliceConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        SliceConfig(**kw)


def test_variant_options_round_trip():
    cfg = SliceConfig(
        projection_scope="per_module",
        per_layer_threshold=True,
        per_layer_threshold_delta=0.05,
        magnitude_preserve=True,
        add_retain_grad=True,
        retain_batch_size=3,
    )
    assert SliceConfig.from_dict(cfg.to_dict()) == cfg


# ---- 7. replay batch size separate from the batch count ----


def test_rebatched_regroups_rows_in_order_and_pads():
    a = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long)}
    a["labels"] = a["input_ids"].clone()
    b = {"input_ids": 100 + torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    b["labels"] = b["input_ids"].clone()
    rb = Rebatched([a, b], 2, "t")
    assert len(rb) == 2  # 5 rows → 2 full batches, the partial one dropped
    out = list(rb)
    assert len(out) == 2
    assert torch.equal(out[0]["input_ids"], a["input_ids"][:2])
    assert torch.equal(out[1]["input_ids"], torch.tensor([[8, 9, 10, 11], [100, 101, 102, 0]]))
    assert torch.equal(out[1]["labels"], torch.tensor([[8, 9, 10, 11], [100, 101, 102, -100]]))
    assert torch.equal(out[1]["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    with pytest.raises(SliceInitError, match="dict batches"):
        len(Rebatched([(torch.ones(2, 3), torch.ones(2))], 2, "t"))


def test_rebatched_keys_in_another_order_and_the_refusals():
    a = {"input_ids": torch.arange(3).view(1, 3), "labels": torch.arange(3).view(1, 3)}
    b = {"labels": 10 + torch.arange(3).view(1, 3), "input_ids": 10 + torch.arange(3).view(1, 3)}  # same keys
    (out,) = list(Rebatched([a, b], 2, "t"))
    assert torch.equal(out["input_ids"], torch.tensor([[0, 1, 2], [10, 11, 12]]))
    assert torch.equal(out["labels"], out["input_ids"])
    c = {"input_ids": torch.arange(3).view(1, 3), "attention_mask": torch.ones(1, 3)}
    with pytest.raises(SliceInitError, match="must carry the same keys"):
        list(Rebatched([a, c], 2, "t"))
    d = {"input_ids": torch.arange(3), "labels": torch.arange(3)}  # 3 rows of scalars, not 1 row of 3 tokens
    with pytest.raises(SliceInitError, match=r"different ranks \[1, 2\]"):
        list(Rebatched([a, d], 2, "t"))


def grad64(model, names, batches):
    """Mean gradient over ``batches`` of the float64 model, by plain autograd, (out, in)."""
    mods = dict(model.named_modules())
    params = [mods[n].weight for n in names]
    acc = [torch.zeros_like(p) for p in params]
    for b in batches:
        gs = torch.autograd.grad(model(**b).loss, params)
        acc = [x + g for x, g in zip(acc, gs)]
    return {n: a / len(batches) for n, a in zip(names, acc)}


def chunk(batches, size):
    """The rows of equal-length batches regrouped by hand into full batches of ``size``."""
    rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    total = next(iter(rows.values())).shape[0]
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, total - size + 1, size)]


@pytest.mark.parametrize("size,steps", [(2, 3), (6, 2), (3, 4)])
def test_replay_batch_size_and_count_per_task(size, steps):
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    tasks = [lm_batches(3, batch=4, seed=21), lm_batches(3, batch=4, seed=22)]  # 12 rows each
    got = collect_replay_gradients(tiny_llama(), names, tasks, steps=steps, batch_size=size)
    m64 = tiny_llama(torch.float64)
    per_task = [grad64(m64, names, chunk(t, size)[:steps]) for t in tasks]
    for n in names:
        ref = 0.5 * (per_task[0][n] + per_task[1][n])  # tasks weighted equally
        torch.testing.assert_close(got[n].double(), ref, rtol=2e-4, atol=1e-6 * float(ref.abs().max()))


def test_replay_batch_size_pads_rows_of_unequal_length():
    names = ["model.layers.0.self_attn.o_proj"]
    short = lm_batches(1, batch=3, seq=10, seed=31)[0]
    long = lm_batches(1, batch=3, seq=16, seed=32)[0]
    got = collect_replay_gradients(tiny_llama(), names, [short, long], steps=1, batch_size=6, mode="pooled")
    pad = lambda t, v: torch.nn.functional.pad(t, (0, 6), value=v)
    by_hand = {
        "input_ids": torch.cat([pad(short["input_ids"], 0), long["input_ids"]]),
        "attention_mask": torch.cat([pad(short["attention_mask"], 0), long["attention_mask"]]),
        "labels": torch.cat([pad(short["labels"], -100), long["labels"]]),
    }
    ref = grad64(tiny_llama(torch.float64), names, [by_hand])
    torch.testing.assert_close(got[names[0]].double(), ref[names[0]], rtol=2e-4, atol=1e-6)


def test_get_slice_model_rebatches_replay_and_refuses_a_short_buffer():
    from peft import LoraConfig

    lc = LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    replay = [lm_batches(2, batch=4, seed=41), lm_batches(2, batch=4, seed=42)]
    pm = get_slice_model(
        tiny_llama(), lc, SliceConfig(current_steps=2, replay_steps=4, retain_batch_size=2), lm_batches(2), replay
    )
    v = pm.slice_init_report.variant
    assert v["applied"] and v["replay_batch_size"] == 2 and v["replay_steps"] == 4
    model = tiny_llama()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(SliceInitError, match=r"re-batched to retain_batch_size=3\): needs 3 batches but has only 2"):
        get_slice_model(
            model, lc, SliceConfig(current_steps=2, replay_steps=3, retain_batch_size=3), lm_batches(2), replay
        )
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


# ---- 8. single retain task: replay the most recent earlier task only ----


def test_single_retain_task_mode_replays_the_last_task_with_the_current_count():
    from peft import LoraConfig

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    current = lm_batches(3, seed=50)
    replay = [lm_batches(4, seed=51), lm_batches(4, seed=52), lm_batches(4, seed=53)]  # oldest first
    got = collect_replay_gradients(tiny_llama(), names, replay, steps=3, last_task_only=True)
    ref = grad64(tiny_llama(torch.float64), names, replay[-1][:3])
    for n in names:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=2e-4, atol=1e-6 * float(ref[n].abs().max()))

    # through get_slice_model: G_prev is task t−1's gradient over current_steps (3) batches, not replay_steps (1)
    lc = LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    cfg = dict(current_steps=3, replay_steps=1, svd="exact", conflict_threshold=1.0)
    pm = get_slice_model(tiny_llama(), lc, SliceConfig(single_retain_task_mode=True, **cfg), current, replay)
    rep = pm.slice_init_report
    gc = collect_gradients(tiny_llama(), ["q_proj", "v_proj"], current, steps=3)
    gp = collect_gradients(tiny_llama(), ["q_proj", "v_proj"], replay[-1], steps=3)
    D = sum(float((gc[n].double() * gp[n].double()).sum()) for n in gc)
    Np = sum(float((gp[n].double() ** 2).sum()) for n in gc)
    assert rep.D == pytest.approx(D, rel=1e-5) and rep.Np == pytest.approx(Np, rel=1e-5)
    v = rep.variant
    assert v["replay_tasks"] == "last" and v["replay_steps"] == 3 and v["name"] == "pcgrad+single_retain_task"


# ---- B. PEFT's LoRA-GA preset on Conv1D: the stable factor uses the stored weight.shape[0] ----

GPT2_T = ["c_attn", "c_proj", "c_fc"]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def test_lora_ga_peft_preset_fan_in_fan_out_on_tensors():
    g = {"lin": gapped(40, 24, seed=1), "conv": gapped(40, 24, seed=2)}
    r = 4
    res = init_from_gradients(
        weights_like(g),
        g,
        None,
        r=r,
        lora_alpha=2.0,
        config=SliceConfig(method="lora_ga_peft", svd="exact"),
        fan_in_fan_out={"conv"},
    )
    for n, rows in (("lin", 40), ("conv", 24)):  # Conv1D stores (in, out): PEFT's weight.shape[0] is n = 24
        U, S, V = ref_svd(g[n])
        f = rows**0.25 / 4.0
        torch.testing.assert_close(res.B[n].norm(dim=0).double(), S[r : 2 * r] * f, rtol=1e-5, atol=0)
        tol = vec_tol(S, 2 * r)
        torch.testing.assert_close(
            res.B[n].double(), U[:, r : 2 * r] @ torch.diag(S[r : 2 * r]) * f, rtol=0, atol=tol * float(S[0])
        )
        torch.testing.assert_close(res.A[n].double(), V[:, :r].T, rtol=0, atol=tol)
        assert res.report.layers[n]["stable_rows"] == rows
    with pytest.raises(SliceInitError, match="not in the weights"):
        init_from_gradients(
            weights_like(g),
            g,
            None,
            r=r,
            lora_alpha=2.0,
            config=SliceConfig(method="lora_ga_peft"),
            fan_in_fan_out={"x"},
        )


def test_lora_ga_peft_on_gpt2_conv1d_by_hand():
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    r = 4
    batches = lm_batches(2, seed=60)
    orig = {n: m.weight.detach().clone() for n, m in tiny_gpt2().named_modules() if n.split(".")[-1] in GPT2_T}
    grads = collect_gradients(tiny_gpt2(), GPT2_T, batches, steps=2)  # (out, in), float32
    pm = get_slice_model(
        tiny_gpt2(),
        LoraConfig(r=r, lora_alpha=2, use_rslora=True, target_modules=GPT2_T),
        SliceConfig(method="lora_ga_peft", svd="exact", current_steps=2),
        current=batches,
    )
    lay = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(lay) == set(orig)
    s = 2 / math.sqrt(r)
    differ = 0
    for n, W0 in orig.items():
        stored_rows, out_features = W0.shape[0], W0.shape[1]  # Conv1D: weight (in, out)
        f = stored_rows**0.25 / 4.0  # PEFT: (weight.shape[0])**0.25 / stable_gamma**0.5
        differ += stored_rows != out_features
        S = torch.linalg.svdvals(grads[n].double())
        A = lay[n].lora_A["default"].weight.detach()
        B = lay[n].lora_B["default"].weight.detach()
        assert B.shape == (out_features, r) and A.shape == (r, stored_rows)
        torch.testing.assert_close(B.norm(dim=0).double(), S[r : 2 * r] * f, rtol=1e-5, atol=0)
        torch.testing.assert_close(A @ A.T, torch.eye(r), rtol=0, atol=1e-5)  # A unscaled: V[:, :r]ᵀ
        # absorbed into the stored (in, out) weight: W_stored + s·(B·A)ᵀ = W_original
        W = lay[n].get_base_layer().weight.detach()
        torch.testing.assert_close(W + s * (B @ A).T, W0, rtol=0, atol=1e-6)
    assert differ > 0  # c_attn (64 → 192) and c_fc (64 → 256): in_features ≠ out_features


def test_lora_ga_peft_equals_peft_on_gpt2_conv1d():
    """Peer check: PEFT's own init_lora_weights="lora_ga" on the same Conv1D model and batches. r = 16 makes
    PEFT's sketch q = min(4r, min(m, n)) = 64 cover every layer, so its torch.svd_lowrank is exact and the scales
    (the B column norms, S[r:2r]·weight.shape[0]^¼/4) must agree to float32 rounding."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
    from peft.tuners.lora import LoraLayer

    r = 16
    batches = lm_batches(3, seed=61)
    torch.manual_seed(0)
    base = no_dropout(tiny_gpt2())  # PEFT collects in train mode: without dropout that is eval mode's gradient
    cfg = LoraConfig(
        r=r,
        lora_alpha=2,
        use_rslora=True,
        target_modules=GPT2_T,
        fan_in_fan_out=True,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def train_step():
        for b in batches:
            base(**b).loss.backward()

    preprocess_loraga(base, cfg, train_step)
    theirs = get_peft_model(base, cfg)
    ours = get_slice_model(
        tiny_gpt2(),
        LoraConfig(r=r, lora_alpha=2, use_rslora=True, target_modules=GPT2_T),
        SliceConfig(method="lora_ga_peft", current_steps=3, svd="exact"),
        current=batches,
    )
    lt = {n: m for n, m in theirs.named_modules() if isinstance(m, LoraLayer)}
    lo = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert set(lt) == set(lo) and len(lt) == 8
    for n in lt:
        Bt, Bo = lt[n].lora_B["default"].weight.detach(), lo[n].lora_B["default"].weight.detach()
        At, Ao = lt[n].lora_A["default"].weight.detach(), lo[n].lora_A["default"].weight.detach()
        assert Bt.shape == Bo.shape and At.shape == Ao.shape
        torch.testing.assert_close(Bo.norm(dim=0), Bt.norm(dim=0), rtol=1e-4, atol=0)
        torch.testing.assert_close(Ao.norm(dim=1), At.norm(dim=1), rtol=1e-5, atol=0)
        # and the same directions: each row of A and column of B equals PEFT's up to the sign of its singular
        # vector (PEFT fixes no sign), |⟨x, y⟩| = ‖x‖·‖y‖
        torch.testing.assert_close((Ao * At).sum(1).abs(), Ao.norm(dim=1) * At.norm(dim=1), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close((Bo * Bt).sum(0).abs(), Bo.norm(dim=0) * Bt.norm(dim=0), rtol=1e-4, atol=1e-7)
