"""The adapter factors of each init method from one layer's inputs (SPEC §1 steps 6–7, §1 baselines), and the
absorb of step 8.

``FACTORS[method](layer) -> (A, B, info)``: A (r×n) and B (m×r) in ``layer.dtype``, and the figures the report
keeps for the layer (``offset``: whether s·B·A is absorbed into W; ``beta``; ``zero_gradient``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SliceInitError
from .config import SliceConfig

PEFT_STABLE_GAMMA = 16.0  # PEFT's LoRA-GA default: B·diag(S)·m^¼/√16 (SliceConfig.peft_stable_gamma)


@dataclass
class LayerInput:
    """What a factor rule sees of one layer."""

    W: torch.Tensor  # (m, n), the weight at W^(t-1)
    r: int
    seed: int  # the layer's own seed (config seed mixed with its name)
    dtype: torch.dtype  # the adapter dtype
    config: SliceConfig
    svd: tuple | None = None  # (U (m, k), S (k,), V (n, k)) of G̃ for the gradient methods (k = 2r, or r)
    # the module stores W transposed (transformers Conv1D, PEFT's fan_in_fan_out): its weight.shape[0] is n
    fan_in_fan_out: bool = False
    scaling: float | None = None  # the LoRA scaling s (PEFT's "gd_scale" divides A and B by it)


def kaiming_A(r: int, n: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
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
    """Unbiased variance of all entries, in float64, in one fused pass over a float64 copy (torch's Welford
    kernel): the scale phase reads every target weight through it."""
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


def svd_slices(U, S, V, r: int, direction: str):
    """(B₀, A₀, S_B) for one layer from the top triplets (SPEC §1 step 6). ``top_r_no_sigma`` (the reference's
    ``svd_selection``, cl_lora/slice/decompose.py): B₀ = U[:, :r], A₀ = V[:, :r]ᵀ from the top r triplets."""
    if direction == "A2rBr":
        return U[:, :r], V[:, r : 2 * r].T, S[:r]
    if direction == "top_r_no_sigma":
        return U[:, :r], V[:, :r].T, S[:r]
    return U[:, r : 2 * r], V[:, :r].T, S[r : 2 * r]


def _vanilla(layer: LayerInput):
    """PEFT's default LoRA init: Kaiming-uniform A, B = 0, nothing absorbed."""
    m, n = layer.W.shape
    A = kaiming_A(layer.r, n, layer.seed, layer.W.device, layer.dtype)
    return A, torch.zeros(m, layer.r, device=layer.W.device, dtype=layer.dtype), {"offset": False}


def _loram(layer: LayerInput):
    W, r = layer.W, layer.r
    m, n = W.shape
    B0 = dst_basis(m, r).to(W.device)
    A0 = dst_basis(n, r).T.contiguous().to(W.device)
    beta = variance_beta(W, B0, A0, r)
    return (beta * A0).to(layer.dtype), (beta * B0).to(layer.dtype), {"beta": beta, "offset": True}


def peft_stable_rows(layer: LayerInput) -> int:
    """The m of PEFT's LoRA-GA ``"stable"`` factor m^¼/√γ_s: PEFT reads ``weight.shape[0]`` of the module's stored
    weight (peft/tuners/lora/layer.py, ``lora_ga_init``: ``out_features = weight.shape[0]``), which is
    out_features for ``nn.Linear`` but in_features for a transformers ``Conv1D`` (stored (in, out))."""
    m, n = layer.W.shape
    return n if layer.fan_in_fan_out else m


def peft_slices(U, S, V, r: int, direction: str, seed: int):
    """(B₀·diag(S_B), A₀, S_B) by PEFT's LoRA-GA direction (peft/tuners/lora/layer.py ``lora_ga_init``), from the
    top 2r triplets. PEFT's "random" draws ``randperm(2r)[:r]`` from the global RNG; here the layer's own seed
    drives it, so the init is reproducible and independent of whatever else consumed random numbers."""
    if direction == "ArBr":
        idx_a, idx_b = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "A2rBr":
        idx_a, idx_b = torch.arange(r, 2 * r), torch.arange(0, r)
    elif direction == "ArB2r":
        idx_a, idx_b = torch.arange(0, r), torch.arange(r, 2 * r)
    else:  # "random": A and B take the same r triplets, so B₀A₀ = Σ σ_i u_i v_iᵀ over them
        idx_a = idx_b = peft_random_indices(seed, r)
    dev = U.device
    idx_a, idx_b = idx_a.to(dev), idx_b.to(dev)
    S_B = S[idx_b]
    return U[:, idx_b] * S_B, V[:, idx_a].T, S_B


def peft_random_indices(seed: int, r: int) -> torch.Tensor:
    """The r indices of 2r the "random" PEFT direction picks for a layer of this seed (for tests and reports)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randperm(2 * r, generator=gen)[:r]


def top_weight_singular_value(W: torch.Tensor, r: int, config: SliceConfig, seed: int) -> float:
    """σ₁(W) for PEFT's "weight_svd" scale. PEFT takes ``svd_lowrank(W, q=r, niter=4)[1][0]``; the exact SVD
    with ``svd="exact"``, else the package's seeded randomized SVD with the same sketch (q = r) and
    ``svd_niter`` power iterations: the same algorithm, a reproducible sketch."""
    from ..ops import rsvd

    Wf = W.detach().to(torch.float32).unsqueeze(0)
    if config.svd == "exact":
        return float(torch.linalg.svdvals(Wf[0].double())[0])
    q = min(r, min(W.shape))
    omega = rsvd.sketch([seed ^ 0x5EED], W.shape[1], q, W.device)
    _, S, _ = rsvd.randomized_svd(Wf, omega, 1, config.svd_niter)
    return float(S[0, 0])


def _peft_preset(layer: LayerInput, U, S, V):
    """PEFT's ``lora_ga_init`` with the options of its ``LoraGAConfig`` (``SliceConfig.peft_*``)."""
    cfg, r = layer.config, layer.r
    B, A, S_B = peft_slices(U, S, V, r, cfg.peft_direction, layer.seed)
    info: dict = {"peft_direction": cfg.peft_direction, "peft_scale": cfg.peft_scale}
    if cfg.peft_scale == "stable":
        rows = peft_stable_rows(layer)
        factor = rows**0.25 / math.sqrt(cfg.peft_stable_gamma)
        B = B * factor
        info.update(beta=factor, stable_rows=rows)
    elif cfg.peft_scale == "weight_svd":
        # PEFT leaves B as it is when S_B[0] is not positive (it cannot be negative: singular values)
        sigma_w = top_weight_singular_value(layer.W, r, cfg, layer.seed)
        factor = sigma_w / float(S_B[0]) if float(S_B[0]) > 0 else 1.0
        B = B * factor
        info.update(beta=factor, weight_sigma1=sigma_w)
    elif cfg.peft_scale == "gd_scale":
        if layer.scaling is None:
            raise SliceInitError("peft_scale='gd_scale' needs the LoRA scaling s: pass LayerInput(scaling=...)")
        A, B = A / layer.scaling, B / layer.scaling
        info.update(beta=1.0 / layer.scaling)
    else:
        info.update(beta=1.0)
    if cfg.peft_direction == "random":
        info["peft_indices"] = peft_random_indices(layer.seed, r).tolist()
    return A.to(layer.dtype), B.to(layer.dtype), info


def _scaled_slices(layer: LayerInput, U, S, V):
    cfg = layer.config
    B0, A0, _ = svd_slices(U, S, V, layer.r, cfg.direction)
    if cfg.scale == "variance":
        beta = variance_beta(layer.W, B0, A0, layer.r)
    elif cfg.scale == "stable":
        beta = layer.W.shape[0] ** 0.25 / math.sqrt(cfg.stable_gamma)
    else:
        beta = 1.0
    return (beta * A0).to(layer.dtype), (beta * B0).to(layer.dtype), {"beta": beta}


def _from_gradient(rule: Callable):
    """A gradient method's factor rule; a layer whose G̃ is exactly zero gets the vanilla init (SPEC §1 step 9)."""

    def factors(layer: LayerInput):
        # the SVD ran on the first weight's device: factors go to this layer's (a model split over GPUs)
        U, S, V = (t.to(layer.W.device) for t in layer.svd)
        if float(S[0]) == 0.0:
            A, B, info = _vanilla(layer)
            return A, B, {"zero_gradient": True, **info}
        A, B, info = rule(layer, U, S, V)
        return A, B, {**info, "zero_gradient": False, "offset": True}

    return factors


FACTORS: dict[str, Callable[[LayerInput], tuple]] = {
    "lora": _vanilla,
    "loram": _loram,
    "lora_ga": _from_gradient(_scaled_slices),
    "slice": _from_gradient(_scaled_slices),
    "lora_ga_peft": _from_gradient(_peft_preset),
}


@torch.no_grad()
def absorb_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float) -> None:
    """In place: W ← W − s·B·A (SPEC §1 step 8), the product in float32 from A and B as stored in the adapter
    dtype (so it cancels exactly what the adapter's forward adds back), written in W's dtype. ``W`` may be a
    transposed view (Conv1D)."""
    off = (B.float() @ A.float()).mul_(s)
    W.copy_((W.float() - off).to(W.dtype))
