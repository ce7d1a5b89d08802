"""The runner's ``gorp`` method (SPEC §4): vanilla LoRA on the run's targets and ``GorpAdamW`` as the optimizer
(LoRA A orthogonalized, full-rank MLP weights in a low-rank gradient subspace); the shared spaces grow at the
end of each task and live in the method state, so checkpoints and resumes carry them."""

from __future__ import annotations

from ...gorp import build_gorp_optimizer
from ...modules import base_linears, matches
from ..errors import RunnerError
from .base import Option, number, positive_int, register
from .init_methods import InitMethod


def _patterns(value) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) and p for p in items):
        raise ValueError(f"must be a module name or a non-empty list of module names, got {value!r}")
    return list(items)


def full_rank_patterns(model, value) -> list[str]:
    """The module patterns GORP trains full-rank: ``value``, or the first of gate_proj/c_fc/fc1 the model has."""
    if value is not None:
        return value
    names = list(base_linears(model))
    return next(([p] for p in ("gate_proj", "c_fc", "fc1") if any(matches(p, n) for n in names)), [])


class GorpMethod(InitMethod):
    init = "lora"
    options = {
        "gorp_full_rank": Option(
            None,
            _patterns,
            "GORP: module patterns trained full-rank (default the first of gate_proj/c_fc/fc1 the model has)",
        ),
        "gorp_rank": Option(None, positive_int, "GORP: projection rank (default the LoRA rank, capped by the weights)"),
        "gorp_scale": Option(0.25, number(above=0), "GORP: update scale of the full-rank weights (GaLore's 0.25)"),
        "gorp_gap": Option(10, positive_int, "GORP: projector refresh period T in steps"),
        "gorp_energy": Option(0.9, number(above=0, maximum=1), "GORP: explained energy kept when a shared space grows"),
    }

    def check_model(self, model, lora, options):
        super().check_model(model, lora, options)
        value = options.get("gorp_full_rank")
        patterns = full_rank_patterns(model, None if value is None else _patterns(value))
        linears = base_linears(model)
        mods = {n: m for n, m in linears.items() if any(matches(p, n) for p in patterns)}
        if not mods:
            raise RunnerError(
                f"gorp: no linear layer of the model matches the full-rank module(s) {patterns or '(none found)'}; "
                f"pass --method-option gorp_full_rank=<name> with one of its layers (e.g. "
                f"{sorted({n.rsplit('.', 1)[-1] for n in linears})[:6]})"
            )
        rank = options.get("gorp_rank")
        if rank is not None:
            smallest = min(min(m.weight.shape) for m in mods.values())
            if positive_int(rank) > smallest:
                raise RunnerError(
                    f"gorp: gorp_rank={rank} exceeds min(m, n) = {smallest} of the full-rank weights {patterns}; "
                    f"pass a gorp_rank of at most {smallest}"
                )

    def _full_rank(self, ctx, peft_model):
        patterns = full_rank_patterns(peft_model, self.option(ctx, "gorp_full_rank"))
        return patterns, [m for n, m in base_linears(peft_model).items() if any(matches(p, n) for p in patterns)]

    def init_adapter(self, ctx):
        peft_model, report = super().init_adapter(ctx)
        # unfreeze the full-rank weights now, so the runner counts them as trainable (it all-reduces the
        # gradients of what is trainable when training starts)
        for mod in self._full_rank(ctx, peft_model)[1]:
            mod.weight.requires_grad_(True)
        return peft_model, report

    def make_optimizer(self, ctx, peft_model, params, lr):
        patterns, mods = self._full_rank(ctx, peft_model)
        rank = self.option(ctx, "gorp_rank")
        if rank is None:
            rank = min([ctx.lora.rank] + [min(m.weight.shape) for m in mods])
        self.opt = build_gorp_optimizer(
            peft_model,
            full_rank=patterns,
            rank=rank,
            shared_spaces=dict(ctx.state.get("spaces", {})),
            lr=lr,
            weight_decay=0.0,
            update_proj_gap=self.option(ctx, "gorp_gap"),
            energy=self.option(ctx, "gorp_energy"),
            seed=int(ctx.seed) * 1000003 + int(ctx.stage),
            lowrank_options={"scale": self.option(ctx, "gorp_scale")},
        )
        return self.opt

    def end_of_task(self, ctx, peft_model):
        self.opt.end_task()
        ctx.state["spaces"] = {k: v.cpu() for k, v in self.opt.shared_spaces().items()}
        self.opt = None  # the next stage builds a fresh optimizer around the new adapter


register("gorp", GorpMethod, overwrite=True)  # overwrite: importlib.reload re-registers
