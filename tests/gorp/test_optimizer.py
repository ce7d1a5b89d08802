"""GorpAdamW (SPEC §4): AdamW equivalence, orthogonality to stored spaces, the energy rule, exact resume."""

import io
import re

import pytest
import torch

from slice_kernels import GorpAdamW, GorpGroupError
from slice_kernels.gorp import energy_count, grow_space


def _grads(shapes, n_steps, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(n_steps)]


def _run(opt, params, grads):
    deltas = []
    for gs in grads:
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone().to(p.dtype)
        opt.step()
        deltas.append([p.detach() - b for p, b in zip(params, before)])
    return deltas


@pytest.mark.parametrize(
    "kind,shape", [("lowrank", (13, 7)), ("lowrank", (6, 11)), ("lora_a", (3, 10)), ("adamw", (9, 4))]
)
def test_full_rank_and_empty_space_equals_adamw(kind, shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    hp = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    gorp = GorpAdamW([{"params": [a], "kind": kind, "rank": min(shape), "update_proj_gap": 2}], **hp)
    ref = torch.optim.AdamW([b], foreach=False, **hp)
    grads = _grads([shape], 5, seed=1)
    _run(gorp, [a], grads)
    _run(ref, [b], grads)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kind,shape,side,lora_a_space",
    [
        ("lowrank", (40, 24), 0, "rank"),
        ("lowrank", (24, 40), 1, "rank"),
        ("lora_a", (4, 40), 1, "input"),
        ("lora_a", (4, 40), 0, "rank"),
        ("lowrank", (30, 20), 0, "rank"),
    ],
)
def test_updates_after_end_task_avoid_the_stored_space(kind, shape, side, lora_a_space):
    """With ``project_update=True`` (the package's addition, the default before the option existed) every
    later update avoids the stored space. The reference's default projects the gradient only; see
    ``test_without_the_update_projection_only_the_gradient_is_orthogonalized``. ``energy_rule="reach"`` (the old
    default) so that a first space exists even when one direction dominates the moment."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    rank = 20 if shape == (30, 20) else 4  # (30, 20) with r = 20: the identity-projector path
    opt = GorpAdamW(
        [{"params": [p], "kind": kind, "names": ["w"]}],
        lr=1e-2,
        rank=rank,
        update_proj_gap=3,
        project_update=True,
        energy_rule="reach",
        lora_a_space=lora_a_space,
    )
    # task 1: gradients with a dominant low-rank part, so the moment has a clear top space
    U = torch.randn(shape[0], 3, generator=gen, dtype=torch.float64)
    V = torch.randn(3, shape[1], generator=gen, dtype=torch.float64)
    task1 = [[U @ V + 0.05 * g[0]] for g in _grads([shape], 4, seed=3)]
    _run(opt, [p], task1)
    added = opt.end_task()
    S = opt.shared_space(p)
    assert S is not None and added["w"] == S.shape[1] >= 1
    assert S.shape[0] == shape[side]
    torch.testing.assert_close(S.T @ S, torch.eye(S.shape[1], dtype=S.dtype), rtol=0, atol=1e-12)
    # task 2: fresh gradients, several refreshes (T = 3), moments carried over from task 1
    for deltas in _run(opt, [p], _grads([shape], 7, seed=4)):
        d = deltas[0]
        inside = S @ (S.T @ d) if side == 0 else (d @ S) @ S.T
        assert inside.norm() <= 1e-6 * d.norm(), (inside.norm() / d.norm()).item()
        assert d.norm() > 0


def test_energy_count_on_constructed_spectra():
    s = lambda *e: torch.tensor(e, dtype=torch.float64).sqrt()
    assert energy_count(0.0, s(50, 30, 9, 7, 4), 100.0, 0.9) == 4
    assert energy_count(0.0, s(50, 30, 10, 6, 4), 100.0, 0.9) == 3  # reaches 0.9 exactly at 3
    assert energy_count(0.0, s(95, 5), 100.0, 0.9) == 1
    assert energy_count(91.0, s(5, 4), 100.0, 0.9) == 0  # the old space already explains 91 %
    assert energy_count(50.0, s(30, 9, 7, 4), 100.0, 0.9) == 3  # 50 + 30 + 9 = 89 < 90, + 7 reaches it
    assert energy_count(0.0, s(40, 30), 100.0, 0.9) == 2  # never reaches: take all there is


def test_energy_count_below_is_the_references_first_task_count():
    """Wcxwcxw/GORP src/uie_trainer_lora.py:171: r = #{i : cumsum(σ²/Σσ²)_i < 0.9} for the first task."""
    s = lambda *e: torch.tensor(e, dtype=torch.float64).sqrt()
    below = lambda *a: energy_count(*a, count="below")
    assert below(0.0, s(50, 30, 9, 7, 4), 100.0, 0.9) == 3  # cum 50, 80, 89 < 90 ≤ 96: 3 (reach: 4)
    assert below(0.0, s(50, 30, 10, 6, 4), 100.0, 0.9) == 2  # cum 90 at 3 is not below 90 (reach: 3)
    assert below(0.0, s(95, 5), 100.0, 0.9) == 0  # σ_1² alone reaches it: the reference stores nothing
    assert below(0.0, s(89, 11), 100.0, 0.9) == 1
    assert below(91.0, s(5, 4), 100.0, 0.9) == 0  # already explained
    assert below(0.0, s(40, 30), 100.0, 0.9) == 2  # never reaches: every direction stays below
    with pytest.raises(ValueError, match="count must be"):
        energy_count(0.0, s(1), 1.0, 0.9, count="fewest")


def _matrix_with_spectrum(d, c, energies, seed):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, len(energies), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(c, len(energies), generator=gen, dtype=torch.float64))
    return U, (U * torch.tensor(energies, dtype=torch.float64).sqrt()) @ V.T


@pytest.mark.parametrize("side", [0, 1])
def test_grow_space_picks_the_right_count(side):
    """``rule="reach"`` is the rule this test pinned as the default before ``rule`` existed; the default is now
    the reference's first-task count (one fewer, pinned below), later tasks are counted alike."""
    U, M = _matrix_with_spectrum(30, 8, [50, 30, 9, 7, 4], seed=5)
    Mx = M if side == 0 else M.T
    S = grow_space(None, Mx, side, 0.9, rule="reach")
    assert S.shape == (30, 4)
    # the new space is the top-4 left space of M
    torch.testing.assert_close(S @ S.T, U[:, :4] @ U[:, :4].T, rtol=0, atol=1e-10)
    # the reference's first task keeps the 3 directions whose cumulative energy (50, 80, 89) stays below 90
    S3 = grow_space(None, Mx, side, 0.9)
    assert S3.shape == (30, 3)
    torch.testing.assert_close(S3 @ S3.T, U[:, :3] @ U[:, :3].T, rtol=0, atol=1e-10)
    # ... and counts a first task told as such (first=False: a later task with nothing stored yet) as a later one
    assert grow_space(None, Mx, side, 0.9, first=False).shape == (30, 4)
    # with the first direction stored, the residual needs 3 more (50 + 30 + 9 < 90 ≤ 50 + 30 + 9 + 7), by both rules
    S1 = U[:, :1].clone()
    assert grow_space(S1, Mx, side, 0.9, rule="reach").shape == (30, 4)
    S2 = grow_space(S1, Mx, side, 0.9)
    assert S2.shape == (30, 4)
    assert torch.equal(S2[:, :1], S1)  # existing columns are kept as they are
    torch.testing.assert_close(S2.T @ S2, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # a space that already explains ≥ 90 % adds nothing
    assert grow_space(U[:, :4].clone(), Mx, side, 0.9) is None


@pytest.mark.parametrize("rule,first_task,k", [("reference", None, 3), ("reference", False, 4), ("reach", None, 4)])
def test_end_task_uses_the_first_moment(rule, first_task, k):
    """Spectrum 50, 30, 9, 7, 4 (%): the reference's first task keeps the 3 directions that stay below 90 %,
    "reach" (SPEC §4, the library's default) the 4 that reach it; first_task=False counts as a later task."""
    p = torch.nn.Parameter(torch.zeros(30, 8, dtype=torch.float64))
    opt = GorpAdamW([{"params": [p], "kind": "lowrank", "names": ["w"]}], rank=8, energy_rule=rule)
    U, M = _matrix_with_spectrum(30, 8, [50, 30, 9, 7, 4], seed=6)
    opt.state[p].update(exp_avg=M.clone(), exp_avg_sq=M.clone() ** 2, step=1)
    assert opt.end_task(first_task=first_task) == {"w": k}
    torch.testing.assert_close(opt.shared_space(p) @ opt.shared_space(p).T, U[:, :k] @ U[:, :k].T, rtol=0, atol=1e-10)


def _three_kind_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(24, 16, generator=gen))  # lowrank, m ≥ n
    wt = torch.nn.Parameter(torch.randn(12, 20, generator=gen).to(torch.bfloat16))  # lowrank, m < n, bf16
    a = torch.nn.Parameter(torch.randn(4, 16, generator=gen))  # LoRA A
    b = torch.nn.Parameter(torch.randn(24, 4, generator=gen))  # LoRA B
    bias = torch.nn.Parameter(torch.randn(24, generator=gen))
    params = [w, wt, a, b, bias]
    groups = [
        {"params": [w, wt], "kind": "lowrank", "names": ["w", "wt"], "rank": 3, "scale": 0.5},
        {"params": [a], "kind": "lora_a", "names": ["a"], "lr": 2e-2},
        {"params": [b, bias], "kind": "adamw", "names": ["b", "bias"], "weight_decay": 0.0},
    ]
    return params, groups


def test_state_dict_round_trip_mid_task_gives_the_same_next_steps():
    params, groups = _three_kind_setup()
    shapes = [p.shape for p in params]
    opt = GorpAdamW(groups, lr=1e-2, weight_decay=0.05, update_proj_gap=3)
    _run(opt, params, _grads(shapes, 2, seed=1, dtype=torch.float32))
    opt.end_task()
    _run(opt, params, _grads(shapes, 2, seed=2, dtype=torch.float32))  # mid-task, 1 step before a refresh
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    snapshot = [p.detach().clone() for p in params]
    later = _grads(shapes, 4, seed=3, dtype=torch.float32)  # crosses the refresh at step 6
    _run(opt, params, later)

    params2, groups2 = _three_kind_setup(seed=99)  # different values: everything must come from the snapshot
    with torch.no_grad():
        for p2, s in zip(params2, snapshot):
            p2.copy_(s)
    opt2 = GorpAdamW(groups2, lr=1e-2, weight_decay=0.05, update_proj_gap=3)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[params2[1]]["exp_avg"].dtype == torch.float32  # not rounded to the bf16 weight's dtype
    _run(opt2, params2, later)
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)
    for n in ("w", "wt", "a"):
        assert torch.equal(opt.shared_spaces()[n], opt2.shared_spaces()[n])


def test_projector_refresh_is_seeded_and_lifts_back():
    gen = torch.Generator().manual_seed(7)
    for shape in [(20, 12), (12, 20)]:
        # a clear gap after the 3rd singular value, as in real gradients (a flat spectrum has no top-3 space
        # for a randomized SVD to find)
        lo = torch.randn(shape[0], 3, generator=gen, dtype=torch.float64) @ torch.randn(
            3, shape[1], generator=gen, dtype=torch.float64
        )
        G = lo + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)
        states = []
        w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        for _ in range(2):
            p = torch.nn.Parameter(w0.clone())
            # scale and decoupled weight decay: W ← (1 − lr·wd)·W − lr·scale·lift(u)
            opt = GorpAdamW(
                [{"params": [p], "kind": "lowrank", "names": ["layer.w"]}],
                lr=0.1,
                rank=3,
                eps=1e-8,
                scale=0.25,
                weight_decay=0.3,
            )
            p.grad = G.clone()
            opt.step()
            states.append((p.detach().clone(), opt.state[p]["proj"].clone()))
        (w1, P), (w1b, P2) = states
        assert torch.equal(P, P2)  # same (seed, name, refresh index) → same sketch → same projector
        assert torch.equal(w1, w1b)
        # first Adam step: u = g / (|g| + eps) elementwise, then lifted back through the projector
        if shape[0] >= shape[1]:
            g = G @ P.T
            expected = (1 - 0.1 * 0.3) * w0 - 0.1 * 0.25 * (g / (g.abs() + 1e-8)) @ P
        else:
            g = P.T @ G
            expected = (1 - 0.1 * 0.3) * w0 - 0.1 * 0.25 * P @ (g / (g.abs() + 1e-8))
        torch.testing.assert_close(w1, expected, rtol=1e-12, atol=1e-14)
        # the projector spans the top-3 singular space of G
        U, _, Vh = torch.linalg.svd(G)
        top = Vh[:3].T @ Vh[:3] if shape[0] >= shape[1] else U[:, :3] @ U[:, :3].T
        proj = P.T @ P if shape[0] >= shape[1] else P @ P.T
        torch.testing.assert_close(proj, top, rtol=0, atol=1e-6)


def test_bad_groups_have_clear_errors():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(GorpGroupError, match=r"w: rank 5 is larger than the matrix allows \(min\(m, n\) = 4"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"], "rank": 5}])
    with pytest.raises(GorpGroupError, match="takes matrices"):
        GorpAdamW([{"params": [torch.nn.Parameter(torch.zeros(5))], "kind": "lora_a"}])
    with pytest.raises(GorpGroupError, match="kind must be one of"):
        GorpAdamW([{"params": [w], "kind": "galore"}])
    with pytest.raises(GorpGroupError, match="2 names for 1 parameters"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["a", "b"], "rank": 2}])
    with pytest.raises(GorpGroupError, match="names must be unique"):
        GorpAdamW([{"params": [w], "names": ["x"]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "names": ["x"]}])
    opt = GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"], "rank": 2}])
    with pytest.raises(GorpGroupError, match=r"needs \(6, k\)"):
        opt.load_shared_spaces({"w": torch.zeros(4, 1)})
    with pytest.raises(GorpGroupError, match="matches no parameter"):
        opt.load_shared_spaces({"v": torch.zeros(6, 1)})
    assert opt.shared_space(w) is None  # nothing was installed by the failed calls


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind,shape,side", [("lowrank", (300, 130), 0), ("lowrank", (130, 300), 1), ("lora_a", (8, 300), 1)]
)
def test_cuda_step_matches_cpu_and_avoids_the_space(kind, shape, side):
    """The same float64 run on CUDA (cuda/triton epilogue, CUDA randomized SVD) and on CPU.

    Sketches are drawn per device type (CUDA and CPU generators differ), so the projectors can differ by a
    rotation within the top-r space; the guarantee checked on CUDA is the orthogonality, and with the
    identity projector (lora_a) the two runs must agree to rounding. The options are those under which the
    updates avoid the space (project_update, A's input side; the defaults before issue 15)."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    runs = {}
    for dev in ("cpu", "cuda"):
        p = torch.nn.Parameter(w0.clone().to(dev))
        opt = GorpAdamW(
            [{"params": [p], "kind": kind, "names": ["w"]}],
            lr=1e-2,
            rank=4,
            update_proj_gap=3,
            project_update=True,
            lora_a_space="input",
            energy_rule="reach",
        )
        _run(opt, [p], [[g[0].to(dev)] for g in _grads([shape], 4, seed=4)])
        opt.end_task()
        S = opt.shared_space(p)
        for deltas in _run(opt, [p], [[g[0].to(dev)] for g in _grads([shape], 4, seed=5)]):
            d = deltas[0]
            inside = S @ (S.T @ d) if side == 0 else (d @ S) @ S.T
            assert inside.norm() <= 1e-6 * d.norm()
        runs[dev] = p.detach().cpu()
    if kind == "lora_a":
        torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("project_update", [False, True])
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_lowrank_steps_follow_the_spec_formulas(shape, project_update):
    """Several low-rank steps across a refresh, with a stored space, against SPEC §4 written out by hand:
    g = G·Qᵀ (or Uᵀ·G), g ← g − proj_S(g), Adam moments in g's shape and never rotated, bias correction at the
    optimizer's step t, u ← u − proj_S(u) only with ``project_update`` (the package's option; on before the
    option existed, off by default now as in the reference), W ← (1 − lr·wd)·W − lr·scale·lift(u)."""
    gen = torch.Generator().manual_seed(11)
    side = 0 if shape[0] >= shape[1] else 1
    d = shape[side]
    S, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    lr, b1, b2, eps, wd, scale = 0.05, 0.8, 0.95, 1e-6, 0.2, 0.5
    opt = GorpAdamW(
        [{"params": [p], "kind": "lowrank", "names": ["w"]}],
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        rank=3,
        update_proj_gap=2,
        scale=scale,
        project_update=project_update,
        shared_spaces={"w": S},
    )
    proj = (lambda X: S @ (S.T @ X)) if side == 0 else (lambda X: (X @ S) @ S.T)
    W, m, v = w0.clone(), None, None
    projectors = []
    for t, (G,) in enumerate(_grads([shape], 5, seed=12), start=1):
        p.grad = G.clone()
        opt.step()
        P = opt.state[p]["proj"]
        projectors.append(P.clone())
        g = G @ P.T if side == 0 else P.T @ G
        g = g - proj(g)
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if project_update:
            u = u - proj(u)
        W = (1 - lr * wd) * W - lr * scale * (u @ P if side == 0 else P @ u)
        torch.testing.assert_close(p.detach(), W, rtol=1e-12, atol=1e-13)
    # refreshed at steps 1, 3, 5 (every T = 2 steps) and held in between
    assert torch.equal(projectors[0], projectors[1]) and not torch.equal(projectors[1], projectors[2])
    assert torch.equal(projectors[2], projectors[3]) and not torch.equal(projectors[3], projectors[4])
    assert opt.state[p]["refreshes"] == 3


def test_a_sparse_gradient_is_refused_before_any_parameter_moves():
    w = torch.nn.Parameter(torch.ones(4, 3))
    emb = torch.nn.Parameter(torch.ones(5, 2))
    opt = GorpAdamW([{"params": [w, emb], "names": ["w", "emb"]}], lr=0.1)
    w.grad = torch.ones(4, 3)
    emb.grad = torch.ones(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="emb: GorpAdamW does not support sparse gradients"):
        opt.step()
    assert torch.equal(w, torch.ones(4, 3)) and not opt.state[w]  # w was not stepped either


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.25])
def test_a_non_finite_or_non_positive_scale_is_refused(scale):
    """A NaN scale used to be accepted and wrote NaN into the weights at the first step."""
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(GorpGroupError, match=rf"defaults: scale must be a finite number > 0, got {scale}"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"]}], rank=2, scale=scale)
    with pytest.raises(GorpGroupError, match=rf"group 0 \(lowrank\): scale must be a finite number > 0, got {scale}"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"], "scale": scale}], rank=2)


@pytest.mark.parametrize("rank", [2.7, 2.0, True, "2"])
def test_rank_must_be_a_positive_int(rank):
    """rank 2.7 used to be truncated to 2 and True taken as 1, silently."""
    w = torch.nn.Parameter(torch.zeros(6, 4))
    msg = re.escape(f"rank must be a positive integer, got {rank!r}")
    with pytest.raises(GorpGroupError, match=rf"defaults: {msg}"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"]}], rank=rank)
    with pytest.raises(GorpGroupError, match=rf"group 0 \(lowrank\): {msg}"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"], "rank": rank}])


@pytest.mark.parametrize("gap", [2.5, 0, True])
def test_update_proj_gap_must_be_a_positive_int(gap):
    """2.5 used to be truncated to 2 by int(), silently."""
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(
        GorpGroupError, match=re.escape(f"update_proj_gap must be a positive integer (steps), got {gap!r}")
    ):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"]}], rank=2, update_proj_gap=gap)


def test_a_non_floating_parameter_is_refused_naming_the_group_and_shape():
    """An integer tensor used to be accepted as a parameter (and failed or truncated at the first step)."""
    w = torch.nn.Parameter(torch.zeros(6, 4))
    opt = GorpAdamW([{"params": [w], "names": ["w"]}])
    with pytest.raises(GorpGroupError, match=r"group 1 \(adamw\): counts is a torch\.int64 tensor of shape \(5, 3\)"):
        opt.add_param_group({"params": [torch.zeros(5, 3, dtype=torch.int64)], "names": ["counts"]})
    assert len(opt.param_groups) == 1  # the bad group was not added
    with pytest.raises(GorpGroupError, match=r"group 0 \(lowrank\): group0\.param0 is a torch\.int32 tensor"):
        GorpAdamW([{"params": [torch.zeros(6, 4, dtype=torch.int32)], "kind": "lowrank", "rank": 2}])


@pytest.mark.parametrize(
    "kind,shape,other",
    [
        ("lowrank", (13, 7), (12, 7)),  # projected moments (m, r) differ, the projector (r, n) does not
        ("lowrank", (6, 11), (6, 10)),
        ("lora_a", (3, 10), (3, 9)),
        ("adamw", (9, 4), (9, 5)),
        ("adamw", (5,), (6,)),
    ],
)
def test_load_state_dict_of_other_sizes_names_the_parameter_and_loads_nothing(kind, shape, other):
    """A state dict of a model of other sizes used to load and fail later, at the next step, with a raw matmul
    (or broadcast) error."""

    def make(sh, lr):
        p = torch.nn.Parameter(torch.zeros(sh, dtype=torch.float64))
        return p, GorpAdamW([{"params": [p], "kind": kind, "names": ["layer.w"]}], lr=lr, rank=2, update_proj_gap=3)

    p, opt = make(shape, 1e-2)
    _run(opt, [p], _grads([shape], 2, seed=1))
    if kind != "adamw":
        opt.end_task()  # a shared space as well
    p2, opt2 = make(other, 5e-3)
    with pytest.raises(
        GorpGroupError,
        match=rf"'layer\.w' \(shape {re.escape(str(other))}, {kind}.*has shape \(.*needs \(.*Nothing was loaded",
    ):
        opt2.load_state_dict(opt.state_dict())
    assert not opt2.state and opt2.param_groups[0]["lr"] == 5e-3


# ---------------------------------------------------------------- the reference's parameterization (issue 15)
# Hand-computed cases; "reference" is Wcxwcxw/GORP at d4dbcdd (src/Proj_torch/adamw.py, proj_projector.py,
# src/uie_trainer_lora.py), see docs/gorp.md, "Provenance".


def test_defaults_follow_the_reference():
    opt = GorpAdamW([torch.nn.Parameter(torch.zeros(2, 2))])
    d = opt.defaults
    assert d["eps"] == 1e-6  # adamw.py:44 (torch's 1e-8 before)
    assert d["project_update"] is False  # gp_second=False, uie_trainer_lora.py:129,137
    assert d["lora_a_space"] == "rank"
    assert d["energy_rule"] == "reach"  # SPEC §4 "until it reaches 0.9"; the runner's gorp passes "reference"
    assert d["svd"] == "randomized" and d["eps_mode"] == "torch"  # the package's defaults; exact/transformers opt in


@pytest.mark.parametrize("shape", [(6, 3), (3, 6)])
def test_exact_svd_projector_is_the_top_r_singular_vectors(shape):
    """G with singular values 5 > 3 > 1 along known (permuted canonical) vectors: the exact refresh takes the
    top-2 right vectors (m ≥ n) or left vectors (m < n); one step then moves W by −lr·lift(g / (|g| + eps))."""
    m, n = shape
    G = torch.zeros(max(shape), min(shape), dtype=torch.float64)
    G[2, 1], G[0, 0], G[4, 2] = 5.0, 3.0, 1.0  # σ = 5, 3, 1 on (row 2, col 1), (row 0, col 0), (row 4, col 2)
    G = G if m >= n else G.T.contiguous()
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = GorpAdamW(
        [{"params": [p], "kind": "lowrank", "names": ["w"]}], lr=0.1, rank=2, svd="exact", eps=1e-6, eps_mode="torch"
    )
    p.grad = G.clone()
    opt.step()
    P = opt.state[p]["proj"]
    if m >= n:  # Q (2×3): right vectors e1 (σ 5), e0 (σ 3), up to sign
        assert P.shape == (2, 3)
        torch.testing.assert_close(P.abs(), torch.tensor([[0.0, 1, 0], [1, 0, 0]], dtype=torch.float64))
        g = G @ P.T
        expected = -0.1 * (g / (g.abs() + 1e-6)) @ P
    else:  # U (3×2): left vectors of Gᵀ, e1 then e0
        assert P.shape == (3, 2)
        torch.testing.assert_close(P.abs(), torch.tensor([[0.0, 1], [1, 0], [0, 0]], dtype=torch.float64))
        g = P.T @ G
        expected = -0.1 * P @ (g / (g.abs() + 1e-6))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)
    # written out: the σ = 5 and σ = 3 entries move by −0.1·5/(5 + 1e-6) and −0.1·3/(3 + 1e-6); σ = 1 is cut
    W = p.detach() if m >= n else p.detach().T
    assert W[2, 1] == pytest.approx(-0.1 * 5 / (5 + 1e-6), rel=1e-14)
    assert W[0, 0] == pytest.approx(-0.1 * 3 / (3 + 1e-6), rel=1e-14)
    assert W[4, 2] == 0.0 and int((W != 0).sum()) == 2


def test_lora_a_space_on_the_rank_side_and_on_the_input_side():
    """A is 2×3 with G = [[1, 2, 3], [4, 5, 6]] and S = e0. Rank side (R^2): g = G − S·Sᵀ·G zeroes A's first
    row; input side (R^3): g = G − G·S·Sᵀ zeroes its first column. First Adam step: −lr·g/(|g| + eps)."""
    G = torch.tensor([[1.0, 2, 3], [4, 5, 6]], dtype=torch.float64)
    for space, S, g in (
        ("rank", torch.tensor([[1.0], [0]]), torch.tensor([[0.0, 0, 0], [4, 5, 6]])),
        ("input", torch.tensor([[1.0], [0], [0]]), torch.tensor([[0.0, 2, 3], [0, 5, 6]])),
    ):
        p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
        opt = GorpAdamW(
            [{"params": [p], "kind": "lora_a", "names": ["a"]}],
            lr=0.1,
            lora_a_space=space,
            shared_spaces={"a": S.double()},
        )
        p.grad = G.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), -0.1 * g.double() / (g.double().abs() + 1e-6), rtol=1e-14, atol=0)
    with pytest.raises(GorpGroupError, match=r"needs \(2, k\)"):  # the rank side is R^r, here R^2
        GorpAdamW([{"params": [p], "kind": "lora_a", "names": ["a"]}], shared_spaces={"a": torch.zeros(3, 1)})


@pytest.mark.parametrize(
    "space,rule,expected",
    [
        # M = [[2, 2, 0], [0, 0, 1]]: energies 8 and 1 of 9; 8/9 < 0.9, so the reference's first task keeps 1
        ("rank", "reference", [[1.0], [0.0]]),
        ("rank", "reach", [[1.0, 0.0], [0.0, 1.0]]),  # 8/9 < 0.9 ≤ 9/9: both, all of R^2
        ("input", "reference", [[2**-0.5], [2**-0.5], [0.0]]),  # Mᵀ's top left vector in R^3
    ],
)
def test_lora_a_space_grows_from_the_moment_on_its_side(space, rule, expected):
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = GorpAdamW([{"params": [p], "kind": "lora_a", "names": ["a"]}], lora_a_space=space, energy_rule=rule, lr=0.1)
    M = torch.tensor([[2.0, 2, 0], [0, 0, 1]], dtype=torch.float64)
    opt.state[p].update(exp_avg=M.clone(), exp_avg_sq=M**2, step=1)
    opt.end_task()
    S = opt.shared_space(p)
    E = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(S @ S.T, E @ E.T, rtol=0, atol=1e-12)  # the same span (signs are SVD's)


@pytest.mark.parametrize("project_update", [False, True])
def test_without_the_update_projection_only_the_gradient_is_orthogonalized(project_update):
    """A is 1×3, S = (1, 2, 0)/√5 on its input side, G = (3, 1, 1) = (2, −1, 1) + (1, 2, 0): g = (2, −1, 1) ⟂ S.
    First step u = g/(|g| + eps) ≈ (1, −1, 1), whose component along S is (1 − 2)/√5 ≠ 0: the reference's step
    (project_update=False) leaves it in; project_update=True removes it, u ← u − (u·S)·S."""
    S = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64) / 5**0.5
    p = torch.nn.Parameter(torch.zeros(1, 3, dtype=torch.float64))
    opt = GorpAdamW(
        [{"params": [p], "kind": "lora_a", "names": ["a"]}],
        lr=0.1,
        eps=1e-6,
        lora_a_space="input",
        project_update=project_update,
        shared_spaces={"a": S},
    )
    p.grad = torch.tensor([[3.0, 1.0, 1.0]], dtype=torch.float64)
    opt.step()
    g = torch.tensor([[2.0, -1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * g, rtol=1e-14, atol=1e-15)  # (1 − β1)·g, ⟂ S
    u = g / (g.abs() + 1e-6)
    if project_update:
        u = u - (u @ S) @ S.T
    torch.testing.assert_close(p.detach(), -0.1 * u, rtol=1e-13, atol=1e-15)
    along = float(p.detach() @ S)
    assert along == pytest.approx(0.0, abs=1e-15) if project_update else along == pytest.approx(0.1 / 5**0.5, rel=1e-5)


def test_eps_mode_transformers_is_the_reference_adamw():
    """adamw.py:141-147: denom = √v + eps, step = lr·√(1 − β2^t)/(1 − β1^t); p −= step·m/denom. Three steps
    written out by hand on a 2×3 weight, on the fused path (adamw) and on the unfused one (lora_a with
    S = e0 on its input side and project_update: column 0 of G is removed, the rest is that formula)."""
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-3  # a large eps so that the placement shows
    grads = [torch.tensor([[1.0, -2, 3e-3], [0.5, 4, -1e-3]], dtype=torch.float64) * (k + 1) for k in range(3)]
    keep = torch.tensor([[0.0, 1, 1]], dtype=torch.float64)
    for kind, extra, mask in (
        ("adamw", {}, torch.ones(1, 3, dtype=torch.float64)),
        ("lora_a", {"project_update": True, "shared_spaces": {"w": torch.eye(3, 1, dtype=torch.float64)}}, keep),
    ):
        results = {}
        for mode in ("transformers", "torch"):
            p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
            opt = GorpAdamW(
                [{"params": [p], "kind": kind, "names": ["w"]}],
                lr=lr,
                betas=(b1, b2),
                eps=eps,
                eps_mode=mode,
                lora_a_space="input",
                **extra,
            )
            W, m, v = torch.ones(2, 3, dtype=torch.float64), 0.0, 0.0
            for t, G in enumerate(grads, start=1):
                p.grad = G.clone()
                opt.step()
                G = G * mask
                m, v = b1 * m + (1 - b1) * G, b2 * v + (1 - b2) * G * G
                if mode == "transformers":
                    W = W - lr * (1 - b2**t) ** 0.5 / (1 - b1**t) * m / (v.sqrt() + eps)
                else:
                    W = W - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                torch.testing.assert_close(p.detach(), W, rtol=1e-13, atol=1e-15)
            results[mode] = p.detach()
        # the placements differ visibly at this eps, on the small gradient entries (3e-3, 1e-3)
        assert (results["transformers"] - results["torch"]).abs()[:, 2].min() > 1e-3


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("svd", "full", r"svd must be one of \('randomized', 'exact'\)"),
        ("lora_a_space", "output", r"lora_a_space must be one of \('rank', 'input'\)"),
        ("energy_rule", "fewest", r"energy_rule must be one of \('reference', 'reach'\)"),
        ("eps_mode", "hf", r"eps_mode must be one of \('torch', 'transformers'\)"),
        ("project_update", 1, r"project_update must be True or False, got 1"),
    ],
)
def test_the_reference_options_are_validated(key, value, message):
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(GorpGroupError, match=rf"defaults: {message}"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"]}], rank=2, **{key: value})
    with pytest.raises(GorpGroupError, match=rf"group 0 \(lowrank\): {message}"):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["w"], "rank": 2, key: value}])


def test_a_state_dict_from_before_the_options_loads_with_the_options_it_was_trained_with():
    """State dicts saved before svd/lora_a_space/project_update/energy_rule/eps_mode existed have no such keys;
    they were trained with randomized, input, True, reach, torch, and their LoRA A spaces are n×k."""
    a = torch.nn.Parameter(torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    opt = GorpAdamW(
        [{"params": [a], "kind": "lora_a", "names": ["a"]}],
        lr=1e-2,
        eps=1e-8,
        lora_a_space="input",
        project_update=True,
        energy_rule="reach",
    )  # what an optimizer of that time did
    _run(opt, [a], _grads([(3, 10)], 2, seed=1))
    opt.end_task()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for k in ("svd", "lora_a_space", "project_update", "energy_rule", "eps_mode"):
            g.pop(k)
    a2 = torch.nn.Parameter(a.detach().clone())
    opt2 = GorpAdamW([{"params": [a2], "kind": "lora_a", "names": ["a"]}], lr=1e-2)  # today's defaults
    opt2.load_state_dict(sd)
    g = opt2.param_groups[0]
    assert (g["svd"], g["lora_a_space"], g["project_update"], g["energy_rule"], g["eps_mode"]) == (
        "randomized",
        "input",
        True,
        "reach",
        "torch",
    )
    assert opt2.shared_space(a2).shape[0] == 10
    later = _grads([(3, 10)], 2, seed=2)
    _run(opt, [a], later)
    _run(opt2, [a2], later)
    assert torch.equal(a, a2)


def test_a_half_precision_full_rank_weight_warns_that_small_steps_are_lost():
    """No float32 master copy: at the reference's lr 1e-6 a bf16 gate_proj would hardly move (review finding)."""
    w = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.bfloat16))
    with pytest.warns(
        UserWarning, match="steps below its rounding step .* are lost: keep the full-rank weights in float32"
    ):
        GorpAdamW([{"params": [w], "kind": "lowrank", "names": ["gate"], "rank": 2}])
