"""Gradient collection for the initializers and the adapter's training loop (data-parallel aware)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..slice_init.collect import collect_gradients as _collect
from ..slice_init.collect import default_loss  # the initializer's loss: the same batches give the same gradients


def world_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def rank_share(batches: list) -> list:
    """This process's share of gradient batches, batches[rank::world]. The runner makes the count a multiple of
    the world size, so the mean over ranks of the per-rank means is the mean over all batches, as in one
    process."""
    world, rank = world_and_rank()
    if len(batches) % world:
        raise ValueError(
            f"{len(batches)} gradient batches cannot be split evenly over {world} processes; use a "
            f"multiple of {world} (grad_batches / replay_batches)"
        )
    return batches[rank::world]


def collect_gradients(model, targets, batches, loss_fn=default_loss, progress=True):
    """Float32 gradients of the target weights, (out, in), averaged over ``batches`` (this rank's share, then
    over ranks) through the package's ``slice_kernels.collect_gradients``, which restores the model."""
    _, rank = world_and_rank()
    mine = rank_share(batches)
    return _collect(model, list(targets), mine, len(mine), loss_fn, progress=progress and rank == 0)


LR_SCHEDULES = ("constant", "linear")


def lr_factor(step: int, steps: int, schedule: str, warmup_ratio: float) -> float:
    """The learning-rate multiplier before optimizer step ``step`` (0-based) of ``steps``, as transformers'
    ``get_linear_schedule_with_warmup`` with ``ceil(warmup_ratio · steps)`` warmup steps (the Trainer's rule):
    step/warmup during the warmup, then (steps − step)/(steps − warmup) down to 0."""
    if schedule == "constant":
        return 1.0
    warmup = math.ceil(warmup_ratio * steps)
    if step < warmup:
        return step / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train_adapter(
    peft_model,
    method,
    ctx,
    examples_batches,
    *,
    steps,
    lr,
    grad_accum,
    lr_schedule="constant",
    warmup_ratio=0.0,
    max_grad_norm=None,
    loss_fn=default_loss,
    progress=True,
    desc="train",
) -> list[float]:
    """``steps`` optimizer steps, each over ``grad_accum`` micro-batches taken in order from
    ``examples_batches`` (the caller has sharded them per rank); returns the loss per step (this rank's).
    ``lr_schedule="linear"`` scales every group's learning rate by ``lr_factor`` (a group keeps its own ratio
    to ``lr``, e.g. GORP's full-rank weights); ``max_grad_norm`` clips the norm of all trainable gradients,
    after the data-parallel average, as the HF Trainer does."""
    world, rank = world_and_rank()
    device = next(peft_model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = method.make_optimizer(ctx, peft_model, params, lr) or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    peft_model.train()
    losses = []
    it = iter(examples_batches)
    for step in tqdm(range(steps), desc=desc, disable=not progress or rank != 0, leave=False):
        factor = lr_factor(step, steps, lr_schedule, warmup_ratio)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor
        opt.zero_grad(set_to_none=True)
        tot = 0.0
        for _ in range(grad_accum):
            batch = to_device(next(it), device)
            loss = loss_fn(peft_model, batch)
            extra = method.extra_loss(ctx, peft_model, batch)
            if extra is not None:
                loss = loss + extra
            (loss / grad_accum).backward()
            tot += float(loss.detach()) / grad_accum
        bad = 0 if math.isfinite(tot) else 1
        if world > 1:  # every rank must raise, or the ranks that saw a finite loss wait in the next collective
            flag = torch.tensor([float(bad)], device=device)
            dist.all_reduce(flag)
            bad = int(flag.item())
        if bad:
            where = f" on {bad} of {world} processes" if world > 1 else ""
            raise FloatingPointError(
                f"{desc}: the training loss became non-finite{where} (this process: {tot}); lower the learning rate "
                f"(--lr)"
            )
        if world > 1 and not ctx.fsdp:  # data parallel: average the adapter gradients (FSDP reduces its own)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        opt.step()
        losses.append(tot)
    opt.zero_grad(set_to_none=True)
    peft_model.eval()
    return losses
