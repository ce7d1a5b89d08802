"""SLICE initialization and its baselines on plain tensors (SPEC §1).

``init_from_gradients`` takes weights and gradients keyed by layer name, all in (out, in) orientation, and
returns the adapter factors and the absorbed weights. It validates everything before it computes, and
computes everything before it returns: the inputs are never modified (unless ``inplace_gradients=True``,
which lets the surgery reuse the current-gradient buffers).
"""

from __future__ import annotations

import contextlib
import math
from typing import Collection, Mapping

import torch

from .. import distributed
from ..errors import SliceInitError
from ..ops import rsvd
from .config import SliceConfig
from .factors import FACTORS, LayerInput, absorb_
from .finite import all_finite
from .layer_parallel import assign_owners, decompose_and_share
from .report import InitReport, InitResult, lora_scaling, timed_phase, warn_zero_gradient
from .surgery import describe_variant, reconcile
from .svd import top_triplets


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
    validate_finite_weights(weights)
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
                raise SliceInitError(
                    f"layer {name!r}: {what} on {g.device} but the weight is on {weights[name].device}"
                )

    same_layers(g_cur, "current-task gradients (g_cur)")
    if g_prev is not None and config.uses_replay:
        same_layers(g_prev, "replay gradients (g_prev)")
        for name in weights:
            if g_prev[name].device != g_cur[name].device:
                raise SliceInitError(
                    f"layer {name!r}: g_prev on {g_prev[name].device} but g_cur on "
                    f"{g_cur[name].device}; keep both on one device (offload both or neither)"
                )


def validate_ranks(weights: Mapping[str, torch.Tensor], r: int, config: SliceConfig) -> None:
    """2r ≤ min(m, n) for the gradient methods (SPEC §1 step 6; r ≤ min(m, n) with the ``top_r_no_sigma``
    slices, which use the top r triplets only), r ≤ min(m, n) for loram (its r DST-I bases must be distinct), no
    bound for lora (PEFT's default init accepts any rank) — for every layer."""
    if config.method == "lora":
        return
    k = config.svd_rank_factor if config.uses_gradients else 1
    need = k * r
    for name, w in weights.items():
        m, n = w.shape
        if need > min(m, n):
            what = f"direction {config.direction!r}" if config.direction == "top_r_no_sigma" else ""
            raise SliceInitError(
                f"layer {name!r} of shape ({m}, {n}): method {config.method!r}{' with ' + what if what else ''} "
                f"needs {'2r' if k == 2 else 'r'} = {need} ≤ min(m, n) = {min(m, n)}; lower the rank to "
                f"at most {min(m, n) // k} or drop this layer from the targets"
            )


def validate_finite_weights(weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse a NaN/Inf weight, naming the layer. Every method would carry it into the factors (the variance
    scale reads Var(W)) or into the trained model; one read-only pass per layer (``all_finite``)."""
    for name, w in weights.items():
        if not all_finite(w):
            raise SliceInitError(
                f"layer {name!r}: the weight has non-finite (NaN or Inf) entries, so the model's weights are "
                f"non-finite and no adapter init can fit them. Nothing was modified. Reload the model from a "
                f"finite checkpoint (a diverged training step or a bad merge writes NaN/Inf into W) and init again."
            )


def _check_fan_in_fan_out(names, weights) -> frozenset:
    if isinstance(names, (str, bytes)) or not isinstance(names, Collection):
        raise SliceInitError(
            f"fan_in_fan_out must be a collection of layer names (the Conv1D layers), got {type(names).__name__}"
        )
    unknown = sorted(set(names) - set(weights))
    if unknown:
        raise SliceInitError(f"fan_in_fan_out names layer(s) {unknown[:5]} that are not in the weights")
    return frozenset(names)


def _adapter_dtype(adapter_dtype, name: str, W: torch.Tensor, method: str) -> torch.dtype:
    dt = adapter_dtype.get(name) if isinstance(adapter_dtype, Mapping) else adapter_dtype
    # float32 is PEFT's adapter dtype for bf16/fp16 models too; its LoRA-GA preset uses the weight's dtype
    return dt or (W.dtype if method == "lora_ga_peft" else torch.float32)


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
    fan_in_fan_out: Collection[str] = (),
    layer_parallel: bool = False,
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
        fan_in_fan_out: names of the layers whose module stores W transposed (transformers ``Conv1D``; PEFT's
            ``fan_in_fan_out``). Weights and gradients are still passed (out, in); only ``lora_ga_peft`` reads it,
            because PEFT's stable factor uses the stored ``weight.shape[0]`` (in_features for Conv1D).
        layer_parallel: with torch.distributed active and every rank holding the same weights and gradients
            (``get_slice_model`` sets it then): collective; each layer's SVD and factor rule run on one rank
            (``layer_parallel.assign_owners``) and its A, B are broadcast, instead of every rank decomposing
            every layer. Ignored on one process and by the methods without gradients.

    Returns:
        ``InitResult`` with ``A``, ``B``, absorbed ``weights`` (W − s·B·A) and a ``report``.

    Phases: conflict statistics and surgery (``surgery.reconcile``), the batched truncated SVD
    (``svd.top_triplets``), the method's factor rule (``factors.FACTORS``), the absorb.
    """
    config = config if config is not None else SliceConfig()
    if isinstance(g_prev, Mapping) and len(g_prev) == 0:
        g_prev = None  # no earlier task (t = 1)
    _validate(weights, g_cur, g_prev, r, lora_alpha, config)
    transposed = _check_fan_in_fan_out(fan_in_fan_out, weights)
    names = list(weights)
    device = weights[names[0]].device
    s = lora_scaling(r, lora_alpha, use_rslora)
    report = InitReport(method=config.method)
    report.variant = describe_variant(config, applied=False)  # reconcile says what ran for the gradient methods

    svd_out: dict = {}
    A: dict = {}
    B: dict = {}
    parallel = layer_parallel and config.uses_gradients and distributed.active()
    if config.uses_gradients:
        prev = [g_prev[n] for n in names] if (g_prev is not None and config.uses_replay) else None
        g_tilde = reconcile(names, [g_cur[n] for n in names], prev, config, report, device, inplace=inplace_gradients)
        if parallel:
            _layer_parallel(names, weights, g_tilde, r, s, config, report, device, adapter_dtype, transposed, A, B)
        else:
            svd_out = top_triplets(names, g_tilde, r, config, report, device)
        del g_tilde

    rule = FACTORS[config.method]
    # layer-parallel: the owned layers' scale phase was timed in ``_layer_parallel``
    with timed_phase(report, "scale", device) if not parallel else contextlib.nullcontext():
        for n in names if not parallel else ():
            W = weights[n]
            layer = LayerInput(
                W=W,
                r=r,
                seed=rsvd.layer_seed(config.seed, n),
                dtype=_adapter_dtype(adapter_dtype, n, W, config.method),
                config=config,
                svd=svd_out.get(n),
                fan_in_fan_out=n in transposed,
                scaling=s,
            )
            A[n], B[n], info = rule(layer)
            report.layers.setdefault(n, {"shape": list(W.shape)}).update(info)
    warn_zero_gradient(report, names)
    new_w: dict = {}
    with timed_phase(report, "absorb", device):
        for n in names if absorb else ():
            new_w[n] = weights[n].clone()
            if report.layers[n].get("offset", False):
                absorb_(new_w[n], B[n], A[n], s)
    return InitResult(A=A, B=B, weights=new_w, scaling=s, report=report)


def _layer_parallel(names, weights, g_tilde, r, s, config, report, device, adapter_dtype, transposed, A, B) -> None:
    """Replicated ranks (identical W and G̃ everywhere): SVD and factor rule of this rank's layers only, then A, B
    and the per-layer figures broadcast from each layer's owner (collective; fills ``A``, ``B``, the report)."""
    shapes = {n: tuple(weights[n].shape) for n in names}
    owner = assign_owners(shapes, r, config, distributed.world_size())
    me = distributed.rank()
    dtypes = {n: _adapter_dtype(adapter_dtype, n, weights[n], config.method) for n in names}
    owned = {n: (g_tilde[i], weights[n], dtypes[n], n in transposed) for i, n in enumerate(names) if owner[n] == me}
    got_a, got_b = decompose_and_share(owned, names, owner, r, config, report, device, s, shapes, dtypes)
    A.update(got_a)
    B.update(got_b)
