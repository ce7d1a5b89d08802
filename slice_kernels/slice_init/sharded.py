"""SLICE init of an FSDP2-sharded PEFT model (``torch.distributed.fsdp.fully_shard``), in place.

The order that works (docs/distributed.md): wrap the model with ``peft.get_peft_model`` (PEFT's default LoRA init,
B = 0, so the model is still at W^(t−1)), apply ``fully_shard`` to the PEFT model, then call ``init_sharded_``.
FSDP then owns the LoRA parameters too, so their gradients are reduced across ranks in training. The reverse order
(``get_slice_model`` on a sharded model) would create the LoRA parameters outside FSDP and is refused.

What each rank holds and does, per target layer with W ∈ R^{m×n} split over the ranks by FSDP (rows of the stored
weight):

1. collection: only its own shard of each float32 gradient accumulator (FSDP's reduce-scatter has averaged the
   gradient over the ranks' batches already), i.e. about 1/world of the replicated init's accumulator memory;
2. statistics: its shard's partial sums of D, N_p, N_c in float64, summed over the ranks in one all-reduce for
   all layers, so γ and cos are the global ones; the surgery G̃ = a·G_cur + b·G_prev runs on the shards;
3. layer-parallel SVD: each layer's full G̃ and W are gathered on the one rank that owns the layer
   (``layer_parallel.assign_owners``), which runs the SVD and the factor rule (the variance scale reads the
   gathered W, so Var(W) is exactly the single-process one) and broadcasts A and B;
4. absorb: each rank writes W − s·B·A into its own shard of W (its rows, or its columns for a Conv1D) and its rows
   of the sharded lora_A / lora_B, in place.

Every failure that can happen on one rank only (a batch missing, a refused loss, a non-finite shard, an error of
an owner's SVD) is agreed by every rank before the next collective, and every check runs before the first write:
a refusal raises on every rank with the model unmodified. An exception raised inside the model's own forward on
one rank only cannot be caught that way (FSDP's all-gathers of the other ranks wait for it), as in any FSDP job.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..errors import SliceInitError
from ..modules import PEFT_PREFIX, is_conv1d
from .artifacts import mark_changed_base
from .collect import collect_gradients, collect_replay_gradients
from .config import SliceConfig
from .factors import absorb_
from .finite import all_finite
from .init import validate_ranks
from .layer_parallel import assign_owners, decompose_and_share
from .peft import check_lora_config, check_sources, refuse_shared_weights
from .report import InitReport, lora_scaling, timed_phase, warn_zero_gradient
from .shard_layout import ShardLayout, chunk_bounds, dim0_bounds, is_dtensor, layout, local
from .surgery import describe_variant, reconcile


def _logical(name: str) -> str:
    # the name the layer has in the unwrapped model: sketch seeds and reports agree with get_slice_model's
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def sharded_targets(peft_model: nn.Module, adapter_name: str) -> dict:
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            found[_logical(name)] = mod
    if not found:
        raise SliceInitError(
            f"the model has no LoRA layer with adapter {adapter_name!r}: wrap it with peft.get_peft_model(model, "
            f"lora_config) before fully_shard, then call init_sharded_"
        )
    return found


def _adapter_bounds(name: str, p: torch.Tensor, what: str) -> tuple[int, int]:
    return dim0_bounds(name, p, what) if is_dtensor(p) else (0, p.shape[0])


def _check(peft_model, slice_config, adapter_name):
    """Every local refusal (no collective). Returns (lora config, LoRA layers, base layers, layouts)."""
    if not isinstance(slice_config, SliceConfig):
        raise SliceInitError(f"slice_config must be a SliceConfig, got {type(slice_config).__name__}")
    slice_config.validate()
    peft_config = getattr(peft_model, "peft_config", None)
    if not isinstance(peft_config, dict) or adapter_name not in peft_config:
        raise SliceInitError(
            f"init_sharded_ takes a PEFT model with adapter {adapter_name!r} (peft.get_peft_model, then fully_shard); "
            f"got {type(peft_model).__name__}"
        )
    cfg = peft_config[adapter_name]
    check_lora_config(cfg)
    lora = sharded_targets(peft_model, adapter_name)
    bases = {n: m.get_base_layer() for n, m in lora.items()}
    plain = [n for n, b in bases.items() if not is_dtensor(b.weight)]
    if plain:
        raise SliceInitError(
            f"target layer {plain[0]!r} has an unsharded weight: init_sharded_ needs every target FSDP2-sharded "
            f"(fully_shard the PEFT model first); for an unsharded model use get_slice_model"
        )
    layouts = {n: layout(n, b.weight, is_conv1d(b)) for n, b in bases.items()}
    for n, m in lora.items():
        _adapter_bounds(n, m.lora_A[adapter_name].weight, "lora_A")
        Bp = m.lora_B[adapter_name].weight
        _adapter_bounds(n, Bp, "lora_B")
        if bool(local(Bp).detach().ne(0).any()):
            raise SliceInitError(
                f"layer {n!r}: lora_B of adapter {adapter_name!r} is not zero, so the model is not at W^(t−1) and the "
                f"gradients would be taken at W + s·B·A. Wrap a fresh model (get_peft_model's default init, "
                f"init_lora_weights=True) or merge the adapter first"
            )
    validate_ranks({n: torch.empty(lay.shape, device="meta") for n, lay in layouts.items()}, cfg.r, slice_config)
    if slice_config.method != "lora":  # keyed by the base layers' own module names, which the check compares
        by_module = {m: n for n, m in peft_model.named_modules()}
        refuse_shared_weights(peft_model, {by_module[b]: b for b in bases.values()})
    for n, b in bases.items():
        if not all_finite(local(b.weight).detach()):
            raise SliceInitError(
                f"layer {n!r}: this rank's shard of the weight has non-finite (NaN or Inf) entries; nothing was "
                f"modified. Reload the model from a finite checkpoint and init again"
            )
    return cfg, lora, bases, layouts


def _gather_to(owner: int, piece: torch.Tensor, lay: ShardLayout) -> torch.Tensor | None:
    """Collective: the full (m, n) matrix on rank ``owner`` from each rank's (out, in) shard; None elsewhere."""
    world, me = distributed.world_size(), distributed.rank()
    rows = piece if lay.axis == 0 else piece.T  # the stored weight's rows, the axis FSDP splits
    total = lay.shape[lay.axis]
    per = -(-total // world)
    dev = distributed.comm_device(rows)
    buf = torch.zeros((per, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    buf[: rows.shape[0]].copy_(rows)  # uneven split: the last ranks pad their shorter (or empty) shard
    parts = [torch.empty_like(buf) for _ in range(world)] if me == owner else None
    torch.distributed.gather(buf, parts, dst=owner)
    if me != owner:
        return None
    lengths = [b - a for a, b in (chunk_bounds(total, world, k) for k in range(world))]
    full = torch.cat([p[:size] for p, size in zip(parts, lengths)]).to(piece.device)
    return full if lay.axis == 0 else full.T.contiguous()


def init_sharded_(
    peft_model: nn.Module,
    slice_config: SliceConfig | None = None,
    current=None,
    replay=None,
    loss_fn=None,
    *,
    adapter_name: str = "default",
    progress: bool = False,
) -> InitReport:
    """SLICE (or a baseline) init of the LoRA adapter of an FSDP2-sharded PEFT model, in place (module doc).

    Call it on every rank, after ``peft.get_peft_model(model, lora_config)`` and ``fully_shard``. Arguments as
    ``get_slice_model``'s: each rank passes its own ``current`` / ``replay`` batches; the gradients are the mean over
    all ranks' batches. The LoRA rank, α and rsLoRA come from the adapter's ``LoraConfig``.

    Returns the ``InitReport`` (also set as ``peft_model.slice_init_report``); on every rank the same A, B, γ and cos
    as a single process running ``get_slice_model`` on all the ranks' batches, up to float32 rounding.

    Raises ``SliceInitError`` on every rank, with the model unmodified, when any rank refuses.
    """
    slice_config = slice_config if slice_config is not None else SliceConfig()
    err = None
    try:
        cfg, lora, bases, layouts = _check(peft_model, slice_config, adapter_name)
    except Exception as e:
        err = e
    distributed.agree(err, "checking the sharded model and the configs")
    names = list(lora)
    distributed.same_signature(
        [(n, layouts[n].shape, layouts[n].axis, str(bases[n].weight.dtype)) for n in names],
        "the target layers (name, shape, shard axis, dtype)",
    )
    device = local(bases[names[0]].weight).device
    report = InitReport(method=slice_config.method)
    report.variant = describe_variant(slice_config, applied=False)
    kw = dict(offload=slice_config.offload_gradients, progress=progress, train_mode=slice_config.collect_train_mode)
    g_cur = g_prev = None
    if slice_config.uses_gradients:
        replay_given, replay_kw, replay_steps = check_sources(slice_config, current, replay, loss_fn=loss_fn)
        with timed_phase(report, "collect_current", device):
            g_cur = collect_gradients(peft_model, bases, current, slice_config.current_steps, loss_fn, **kw)
        if replay_given:
            with timed_phase(report, "collect_replay", device):
                g_prev = collect_replay_gradients(
                    peft_model, bases, replay, replay_steps, slice_config.replay_mode, loss_fn, **kw, **replay_kw
                )
    r, s = cfg.r, lora_scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora)
    shapes = {n: layouts[n].shape for n in names}
    dtypes = {n: lora[n].lora_A[adapter_name].weight.dtype for n in names}
    owner = assign_owners(shapes, r, slice_config, distributed.world_size())
    me = distributed.rank()

    g_tilde = None
    if slice_config.uses_gradients:
        prev = [g_prev[n] for n in names] if (g_prev is not None and slice_config.uses_replay) else None
        g_tilde = reconcile(
            names, [g_cur[n] for n in names], prev, slice_config, report, device, inplace=True, sharded=True
        )
        del g_cur, g_prev, prev
        for n in names:
            report.layers[n]["shape"] = list(shapes[n])
    owned = {}
    with timed_phase(report, "gather", device):
        for i, n in enumerate(names):
            lay = layouts[n]
            G = _gather_to(owner[n], g_tilde[i], lay) if g_tilde is not None else None
            if g_tilde is not None:
                g_tilde[i] = None  # the shard is no longer needed: free it before the next layer arrives
            w = local(bases[n].weight).detach()
            W = _gather_to(owner[n], w if lay.axis == 0 else w.T, lay)
            if owner[n] == me:
                owned[n] = (G, W, dtypes[n], is_conv1d(bases[n]))
    A, B = decompose_and_share(owned, names, owner, r, slice_config, report, device, s, shapes, dtypes)
    del owned
    warn_zero_gradient(report, names)

    # ---- everything is validated, computed and agreed: from here on the model is modified ----
    with timed_phase(report, "absorb", device), torch.no_grad():
        for n in names:
            lay, base = layouts[n], bases[n]
            a, b = A[n].to(device), B[n].to(device)
            if report.layers[n].get("offset", False):
                w = local(base.weight)
                if lay.axis == 0:  # this rank's rows of W
                    absorb_(w, b[lay.start : lay.stop], a, s)
                else:  # Conv1D: the stored rows are columns of W
                    absorb_(w.T, b, a[:, lay.start : lay.stop], s)
            ad = lora[n]
            for p, full, what in (
                (ad.lora_A[adapter_name].weight, a, "lora_A"),
                (ad.lora_B[adapter_name].weight, b, "lora_B"),
            ):
                lo, hi = _adapter_bounds(n, p, what)
                local(p).copy_(full[lo:hi].to(p.dtype))  # this rank's rows, in FSDP's own storage
    if any(report.layers[n].get("offset", False) for n in names):
        # the same mark get_slice_model writes, from the full factors (each rank's state dict holds shards only)
        key = {id(m): k for k, m in peft_model.named_modules()}  # state-dict keys use the wrapped names
        pairs = {key[id(lora[n])]: (A[n].to(dtypes[n]), B[n].to(dtypes[n])) for n in names}
        mark_changed_base(peft_model, adapter_name, report.method, pairs)
    else:
        cfg.init_lora_weights = True
    peft_model.slice_init_report = report
    return report
