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
    "kind,shape,side",
    [("lowrank", (40, 24), 0), ("lowrank", (24, 40), 1), ("lora_a", (4, 40), 1), ("lowrank", (30, 20), 0)],
)
def test_updates_after_end_task_avoid_the_stored_space(kind, shape, side):
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    rank = 20 if shape == (30, 20) else 4  # (30, 20) with r = 20: the identity-projector path
    opt = GorpAdamW([{"params": [p], "kind": kind, "names": ["w"]}], lr=1e-2, rank=rank, update_proj_gap=3)
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


def _matrix_with_spectrum(d, c, energies, seed):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, len(energies), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(c, len(energies), generator=gen, dtype=torch.float64))
    return U, (U * torch.tensor(energies, dtype=torch.float64).sqrt()) @ V.T


@pytest.mark.parametrize("side", [0, 1])
def test_grow_space_picks_the_right_count(side):
    U, M = _matrix_with_spectrum(30, 8, [50, 30, 9, 7, 4], seed=5)
    Mx = M if side == 0 else M.T
    S = grow_space(None, Mx, side, 0.9)
    assert S.shape == (30, 4)
    # the new space is the top-4 left space of M
    torch.testing.assert_close(S @ S.T, U[:, :4] @ U[:, :4].T, rtol=0, atol=1e-10)
    # with the first direction stored, the residual needs 3 more (50 + 30 + 9 < 90 ≤ 50 + 30 + 9 + 7)
    S1 = U[:, :1].clone()
    S2 = grow_space(S1, Mx, side, 0.9)
    assert S2.shape == (30, 4)
    assert torch.equal(S2[:, :1], S1)  # existing columns are kept as they are
    torch.testing.assert_close(S2.T @ S2, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # a space that already explains ≥ 90 % adds nothing
    assert grow_space(U[:, :4].clone(), Mx, side, 0.9) is None


def test_end_task_uses_the_first_moment():
    p = torch.nn.Parameter(torch.zeros(30, 8, dtype=torch.float64))
    opt = GorpAdamW([{"params": [p], "kind": "lowrank", "names": ["w"]}], rank=8)
    U, M = _matrix_with_spectrum(30, 8, [50, 30, 9, 7, 4], seed=6)
    opt.state[p].update(exp_avg=M.clone(), exp_avg_sq=M.clone() ** 2, step=1)
    assert opt.end_task() == {"w": 4}
    torch.testing.assert_close(opt.shared_space(p) @ opt.shared_space(p).T, U[:, :4] @ U[:, :4].T, rtol=0, atol=1e-10)


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
    identity projector (lora_a) the two runs must agree to rounding."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    runs = {}
    for dev in ("cpu", "cuda"):
        p = torch.nn.Parameter(w0.clone().to(dev))
        opt = GorpAdamW([{"params": [p], "kind": kind, "names": ["w"]}], lr=1e-2, rank=4, update_proj_gap=3)
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


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_lowrank_steps_follow_the_spec_formulas(shape):
    """Several low-rank steps across a refresh, with a stored space, against SPEC §4 written out by hand:
    g = G·Qᵀ (or Uᵀ·G), g ← g − proj_S(g), Adam moments in g's shape and never rotated, bias correction at the
    optimizer's step t, u ← u − proj_S(u) (the argued addition), W ← (1 − lr·wd)·W − lr·scale·lift(u)."""
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
