"""SLICE initialization and its baselines on plain tensors (SPEC §1).

``init_from_gradients`` takes weights and gradients keyed by layer name, all in (out, in) orientation, and
returns the adapter factors and the absorbed weights. It validates everything before it computes, and
computes everything before it returns: the inputs are never modified (unless ``inplace_gradients=True``,
which lets the surgery reuse the current-gradient buffers).
"""
from __future__ import annotations

import math
import resource
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch

from . import dispatch
from .config import SliceConfig
from .errors import NonFiniteGradientError, SliceInitError, all_finite
from .ops import conflict, rsvd

# Layers stacked per randomized-SVD call are capped so the batch holds at most this many float32 elements.
_SVD_BATCH_ELEMENTS = 1 << 28


@dataclass
class InitReport:
    """What the initializer did. ``gamma``/``cos`` are the global figures (None with per-module scope)."""

    method: str
    gamma: float | None = None
    cos: float | None = None
    D: float | None = None
    Np: float | None = None
    Nc: float | None = None
    layers: dict = field(default_factory=dict)  # name -> per-layer figures
    phases: dict = field(default_factory=dict)  # phase -> {"seconds", "peak_bytes", "memory"}
    backends: dict = field(default_factory=dict)  # op -> backend that ran it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InitResult:
    A: dict  # name -> (r, n) in the adapter dtype
    B: dict  # name -> (m, r) in the adapter dtype
    weights: dict  # name -> absorbed W (m, n) in W's dtype
    scaling: float
    report: InitReport


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@contextmanager
def _phase(report: InitReport, name: str, device: torch.device):
    """Time a phase and record its peak memory: the CUDA allocator's peak on GPU, the process's RSS
    high-water mark on CPU (monotonic, so it reads as 'peak so far')."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
    report.phases[name] = {"seconds": time.perf_counter() - t0, "peak_bytes": int(peak), "memory": kind}


def _validate(weights, g_cur, g_prev, r, lora_alpha, config: SliceConfig):
    if not isinstance(config, SliceConfig):
        raise SliceInitError(f"config must be a SliceConfig, got {type(config).__name__}")
    config.validate()
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise SliceInitError(f"rank r={r!r} must be a positive integer")
    if not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise SliceInitError(f"lora_alpha={lora_alpha!r} must be a finite number")
    if not isinstance(weights, Mapping) or len(weights) == 0:
        raise SliceInitError("weights must be a non-empty mapping of layer name -> (out, in) weight tensor")
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise SliceInitError(
                f"layer {name!r}: weight must be a 2-D floating-point tensor (out, in); got "
                f"{type(w).__name__} {tuple(getattr(w, 'shape', ()))} {getattr(w, 'dtype', '')}. Quantized or "
                f"embedding layers cannot be initialized: remove them from the targets."
            )
    validate_ranks(weights, r, config)
    if not config.uses_gradients:
        return
    if g_cur is None:
        raise SliceInitError(f"method {config.method!r} needs the current-task gradients g_cur")

    def same_layers(grads, what):
        missing = sorted(set(weights) - set(grads))
        extra = sorted(set(grads) - set(weights))
        if missing or extra:
            raise SliceInitError(
                f"{what} cover a different set of layers than the weights: missing {missing[:5]}"
                f"{'…' if len(missing) > 5 else ''}, extra {extra[:5]}{'…' if len(extra) > 5 else ''}. "
                f"Collect them with the same target modules."
            )
        for name, g in grads.items():
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(weights[name].shape):
                raise SliceInitError(
                    f"layer {name!r}: {what} shape {tuple(getattr(g, 'shape', ()))} != weight shape "
                    f"{tuple(weights[name].shape)} (weights and gradients must both be (out, in))"
                )
            # offloaded gradients (CPU) with weights elsewhere are fine: the SVD moves them one group at a time
            if g.device != weights[name].device and g.device.type != "cpu":
                raise SliceInitError(f"layer {name!r}: {what} on {g.device} but the weight is on {weights[name].device}")

    same_layers(g_cur, "current-task gradients (g_cur)")
    if g_prev is not None and config.uses_replay:
        same_layers(g_prev, "replay gradients (g_prev)")
        for name in weights:
            if g_prev[name].device != g_cur[name].device:
                raise SliceInitError(f"layer {name!r}: g_prev on {g_prev[name].device} but g_cur on "
                                     f"{g_cur[name].device}; keep both on one device (offload both or neither)")


def validate_ranks(weights: Mapping[str, torch.Tensor], r: int, config: SliceConfig) -> None:
    """2r ≤ min(m, n) for the gradient methods (SPEC §1 step 6), r ≤ min(m, n) for loram (its r DST-I bases
    must be distinct), no bound for lora (PEFT's default init accepts any rank) — for every layer."""
    if config.method == "lora":
        return
    need = 2 * r if config.uses_gradients else r
    for name, w in weights.items():
        m, n = w.shape
        if need > min(m, n):
            raise SliceInitError(
                f"layer {name!r} of shape ({m}, {n}): method {config.method!r} needs "
                f"{'2r' if config.uses_gradients else 'r'} = {need} ≤ min(m, n) = {min(m, n)}; lower the rank to "
                f"at most {min(m, n) // (2 if config.uses_gradients else 1)} or drop this layer from the targets"
            )


def _kaiming_A(r: int, n: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    # PEFT's default: kaiming_uniform_(a=√5) on (r, n), i.e. U(−1/√n, 1/√n); drawn from a per-layer generator.
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(r, n, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(device, dtype)


def dst_basis(size: int, r: int, dtype=torch.float64) -> torch.Tensor:
    """First r DST-I basis vectors of length ``size`` as columns (size, r): √(2/(size+1))·sin((i+1)(k+1)π/(size+1))."""
    i = torch.arange(1, size + 1, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(1, r + 1, dtype=torch.float64).unsqueeze(0)
    return (math.sqrt(2.0 / (size + 1)) * torch.sin(i * k * math.pi / (size + 1))).to(dtype)


def unbiased_var(x: torch.Tensor) -> float:
    """Unbiased variance of all entries, in float64. One fused pass over the float64 copy (torch's Welford
    kernel): the two-pass formula took five passes and three m×n float64 temporaries, 8–10× slower on CPU for
    a SmolLM2-sized weight, and the whole-init "scale" phase reads every target weight through it."""
    if x.numel() < 2:
        return 0.0
    return float(torch.var(x.double(), correction=1))


def product_var(B: torch.Tensor, A: torch.Tensor) -> float:
    """Unbiased variance of the entries of B·A without forming it: Σ(BA)² = tr((BᵀB)(AAᵀ)), Σ BA = (1ᵀB)(A1)."""
    B, A = B.double(), A.double()
    n_el = B.shape[0] * A.shape[1]
    sq = float(((B.T @ B) * (A @ A.T)).sum())
    tot = float(B.sum(0) @ A.sum(1))
    return (sq - tot * tot / n_el) / max(n_el - 1, 1)


def variance_beta(W: torch.Tensor, B0: torch.Tensor, A0: torch.Tensor, r: int) -> float:
    """β with Var(βB₀·βA₀) = ρ·Var(W), ρ = ln(max(2, r)) / ln(max(2, min(m, n)))."""
    m, n = W.shape
    rho = math.log(max(2, r)) / math.log(max(2, min(m, n)))
    vw, vba = unbiased_var(W), product_var(B0, A0)
    if vba <= 0.0 or vw <= 0.0:
        return 1.0  # nothing to match (constant W, or degenerate factors): keep the unit scale
    return (rho * vw / vba) ** 0.25


def _slices(U, S, V, r, direction):
    """(B₀, A₀, S_B) for one layer from the top-2r triplets."""
    if direction == "A2rBr":
        return U[:, :r], V[:, r : 2 * r].T, S[:r]
    return U[:, r : 2 * r], V[:, :r].T, S[r : 2 * r]


def _gammas(stats: torch.Tensor, config: SliceConfig, has_prev: bool):
    """Per-layer γ (float64, (L,)) and the global figures (SPEC §1 step 4)."""
    L = stats.shape[0]
    c, tau, eps = config.projection_strength, config.conflict_threshold, config.eps
    if not has_prev or not config.uses_replay:
        return torch.zeros(L, dtype=torch.float64), None

    def gate(D, Np, Nc):
        denom = math.sqrt(Np * Nc)
        cos = D / denom if denom > 0 else 0.0
        # N_p + ε = 0 (a zero replay gradient with eps=0, gated on by τ > 0): then D = 0 too and there is
        # nothing to project out; γ = 0 instead of 0/0
        if cos < tau and Np + eps > 0:
            return -c * D / (Np + eps), cos
        return 0.0, cos

    s = stats.cpu()
    if config.projection_scope == "global":
        D, Np, Nc = (float(v) for v in s.sum(0))
        gamma, cos = gate(D, Np, Nc)
        return torch.full((L,), gamma, dtype=torch.float64), (gamma, cos)
    gam = [gate(*(float(v) for v in s[i]))[0] for i in range(L)]
    return torch.tensor(gam, dtype=torch.float64), None


@torch.no_grad()  # weights may be nn.Parameters: the returned factors and absorbed W carry no autograd history
def init_from_gradients(
    weights: Mapping[str, torch.Tensor],
    g_cur: Mapping[str, torch.Tensor] | None = None,
    g_prev: Mapping[str, torch.Tensor] | None = None,
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool = True,
    config: SliceConfig | None = None,
    adapter_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    inplace_gradients: bool = False,
    absorb: bool = True,
) -> InitResult:
    """Initialize LoRA factors for every layer of ``weights`` (SPEC §1).

    Args:
        weights: layer name -> W (out, in). Not modified; absorbed copies are returned.
        g_cur: layer name -> averaged current-task gradient (out, in); needed by slice / lora_ga / lora_ga_peft.
        g_prev: layer name -> averaged replay gradient; used by "slice" only; None (or {}) at task 1.
        r, lora_alpha, use_rslora: the LoRA rank and scaling s = α/√r (rsLoRA) or α/r.
        config: a ``SliceConfig`` (defaults: the paper's).
        adapter_dtype: dtype of A and B, one for all layers or a mapping name -> dtype (default float32,
            PEFT's adapter dtype for bf16/fp16 models too); ``lora_ga_peft`` defaults to W's dtype as PEFT does.
        inplace_gradients: let the surgery overwrite ``g_cur`` instead of copying it (saves one gradient set).
        absorb: compute the absorbed weights; False returns ``weights={}`` so a caller that writes W in place
            (``absorb_`` per layer, as ``get_slice_model`` does) never holds a second copy of every weight.

    Returns:
        ``InitResult`` with ``A``, ``B``, absorbed ``weights`` (W − s·B·A) and a ``report``.
    """
    config = config if config is not None else SliceConfig()
    if isinstance(g_prev, Mapping) and len(g_prev) == 0:
        g_prev = None  # no earlier task (t = 1)
    _validate(weights, g_cur, g_prev, r, lora_alpha, config)
    names = list(weights)
    device = weights[names[0]].device
    s = lora_scaling(r, lora_alpha, use_rslora)
    report = InitReport(method=config.method)
    A: dict = {}
    B: dict = {}
    zero_layers: list[str] = []

    if config.uses_gradients:
        has_prev = g_prev is not None and config.uses_replay
        cur = [g_cur[n] for n in names]
        prev = [g_prev[n] for n in names] if has_prev else None
        with _phase(report, "statistics", device):
            report.backends["conflict_stats"] = dispatch.select("conflict_stats", cur[0].device)[0]
            stats = conflict.conflict_stats(cur, prev).cpu()
        for i, n in enumerate(names):  # every layer is checked before anything is modified
            if not math.isfinite(float(stats[i, 2])):
                raise NonFiniteGradientError(n, "current-task gradient (g_cur)")
            if has_prev and not (math.isfinite(float(stats[i, 1])) and math.isfinite(float(stats[i, 0]))):
                raise NonFiniteGradientError(n, "replay gradient (g_prev)")
        gammas, glob = _gammas(stats, config, has_prev)
        tot = stats.sum(0)
        report.D, report.Np, report.Nc = float(tot[0]), float(tot[1]), float(tot[2])
        if glob is not None:
            report.gamma, report.cos = glob
        elif not has_prev:
            report.gamma, report.cos = 0.0, None
        if has_prev:
            # finite inputs can still overflow when N_p is tiny and γ huge: refuse before touching anything
            fmax = max(float(torch.finfo(c.dtype).max) for c in cur)
            for i, n in enumerate(names):
                if not abs(float(gammas[i])) < fmax:
                    raise NonFiniteGradientError(
                        n, f"surgery result G̃ = G_cur + γ·G_prev (γ = {float(gammas[i]):.3e} overflows "
                           f"{cur[i].dtype}; N_p = {float(stats[i, 1]):.3e}: raise SliceConfig.eps)")
        with _phase(report, "surgery", device):
            if has_prev and bool((gammas != 0).any()):
                if not inplace_gradients:
                    cur = [c.clone() for c in cur]
                report.backends["surgery"] = dispatch.select("surgery", cur[0].device)[0]
                conflict.surgery_(cur, prev, gammas)
                # a representable γ can still overflow the product γ·G_prev in some entry: check G̃ itself
                for i, n in enumerate(names):
                    if float(gammas[i]) != 0.0 and not all_finite(cur[i]):
                        raise NonFiniteGradientError(
                            n, f"surgery result G̃ = G_cur + γ·G_prev (γ = {float(gammas[i]):.3e}; N_p of the replay "
                               f"gradient is {float(stats[i, 1]):.3e}, raise SliceConfig.eps)")
        for i, n in enumerate(names):
            D, Np, Nc = (float(v) for v in stats[i])
            g = float(gammas[i])
            denom = math.sqrt(Np * Nc)
            report.layers[n] = {
                "shape": list(weights[n].shape),
                "D": D, "Np": Np, "Nc": Nc,
                "cos": D / denom if denom > 0 else 0.0,
                "gamma": g,
                # ‖G̃‖² = N_c + 2γD + γ²N_p: no extra pass over the gradient
                "grad_norm": math.sqrt(max(Nc + 2 * g * D + g * g * Np, 0.0)),
            }

        with _phase(report, "svd", device):
            k = 2 * r
            groups: dict = {}
            for i, n in enumerate(names):
                groups.setdefault(tuple(cur[i].shape), []).append(i)
            svd_out: dict = {}
            for (m, nn_), idxs in groups.items():
                q = min(config.svd_sketch or 4 * r, min(m, nn_))
                q = max(q, k)
                per = max(1, _SVD_BATCH_ELEMENTS // (m * nn_))
                for j in range(0, len(idxs), per):
                    chunk = idxs[j : j + per]
                    G = torch.stack([cur[i].to(device, torch.float32) for i in chunk])
                    if config.svd == "exact":
                        U, S, V = rsvd.exact_svd(G, k)
                    else:
                        seeds = [rsvd.layer_seed(config.seed, names[i]) for i in chunk]
                        omega = rsvd.sketch(seeds, nn_, q, G.device)
                        report.backends["randomized_svd"] = dispatch.select("randomized_svd", G.device)[0]
                        U, S, V = rsvd.randomized_svd(G, omega, k, config.svd_niter)
                    del G
                    for b, i in enumerate(chunk):
                        svd_out[names[i]] = (U[b], S[b], V[b])
    with _phase(report, "scale", device):
        for n in names:
            W = weights[n]
            m, nn_ = W.shape
            seed = rsvd.layer_seed(config.seed, n)
            dt = adapter_dtype.get(n) if isinstance(adapter_dtype, Mapping) else adapter_dtype
            dt = dt or (W.dtype if config.method == "lora_ga_peft" else torch.float32)
            info = report.layers.setdefault(n, {"shape": [m, nn_]})
            if config.method == "lora":
                A[n], B[n] = _kaiming_A(r, nn_, seed, W.device, dt), torch.zeros(m, r, device=W.device, dtype=dt)
                info["offset"] = False
                continue
            if config.method == "loram":
                B0 = dst_basis(m, r).to(W.device)
                A0 = dst_basis(nn_, r).T.contiguous().to(W.device)
                beta = variance_beta(W, B0, A0, r)
                A[n], B[n] = (beta * A0).to(dt), (beta * B0).to(dt)
                info.update(beta=beta, offset=True)
                continue
            # the SVD ran on the first weight's device: factors go to this layer's (a model split over GPUs)
            U, S, V = (t.to(W.device) for t in svd_out[n])
            if float(S[0]) == 0.0:
                zero_layers.append(n)
                A[n], B[n] = _kaiming_A(r, nn_, seed, W.device, dt), torch.zeros(m, r, device=W.device, dtype=dt)
                info.update(zero_gradient=True, offset=False)
                continue
            if config.method == "lora_ga_peft":
                B0, A0, S_B = _slices(U, S, V, r, "ArB2r")
                B0 = B0 @ torch.diag(S_B) * (m**0.25 / math.sqrt(16.0))
                A[n], B[n] = A0.to(dt), B0.to(dt)
                info.update(zero_gradient=False, offset=True)
                continue
            B0, A0, _ = _slices(U, S, V, r, config.direction)
            if config.scale == "variance":
                beta_a = beta_b = variance_beta(W, B0, A0, r)
            elif config.scale == "stable":
                beta_a = beta_b = m**0.25 / math.sqrt(config.stable_gamma)
            else:
                beta_a = beta_b = 1.0
            A[n], B[n] = (beta_a * A0).to(dt), (beta_b * B0).to(dt)
            info.update(beta=beta_a, zero_gradient=False, offset=True)
    if zero_layers:
        warnings.warn(
            f"{len(zero_layers)} layer(s) had an exactly zero gradient after surgery and got the vanilla LoRA "
            f"init (A random, B = 0, no offset): {zero_layers[:5]}{'…' if len(zero_layers) > 5 else ''}. "
            f"They receive no gradient from the task loss: check the target modules or the batches.",
            stacklevel=2,
        )
    new_w: dict = {}
    with _phase(report, "absorb", device):
        for n in names if absorb else ():
            W = weights[n]
            new_w[n] = W.clone()
            if report.layers[n].get("offset", False):
                absorb_(new_w[n], B[n], A[n], s)
    return InitResult(A=A, B=B, weights=new_w, scaling=s, report=report)


@torch.no_grad()
def absorb_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float) -> None:
    """In place: W ← W − s·B·A (SPEC §1 step 8), the product in float32 from A and B as stored in the adapter
    dtype (so it cancels exactly what the adapter's forward adds back), written in W's dtype. ``W`` may be a
    transposed view (Conv1D)."""
    off = (B.float() @ A.float()).mul_(s)
    W.copy_((W.float() - off).to(W.dtype))
