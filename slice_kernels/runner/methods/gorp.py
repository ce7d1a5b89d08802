"""The runner's ``gorp`` method (SPEC §4), trained as the reference trains it by default: vanilla LoRA on
``q_proj``/``v_proj`` (r 8, α 32, dropout 0.1, PEFT's α/r scaling) and ``GorpAdamW`` as the optimizer, with LoRA A
orthogonalized and the full-rank MLP weights (never LoRA-adapted) in a low-rank gradient subspace at 1/200 of
the run's learning rate; the shared spaces grow at the end of each task and live in the method state, so
checkpoints and resumes carry them.

LoRA settings. The run's ``--rank``/``--alpha``/``--targets`` configure every method of a run; the reference's
GORP recipe is a different adapter from the runner's default one (all linears, rsLoRA), and its full-rank
``gate_proj`` must not carry an adapter. So ``gorp`` takes its adapter from ``gorp_lora``: ``reference``
(default: the reference's settings) or ``run`` (the run's, as before this option, rsLoRA and dropout 0
included), and each of ``gorp_lora_rank``/``gorp_lora_alpha``/``gorp_lora_targets``/``gorp_lora_dropout``
overrides one setting on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...gorp import REFERENCE_FULL_RANK_LR_RATIO, build_gorp_optimizer
from ...modules import base_linears, matches
from ..errors import RunnerError
from .base import LoraSettings, Option, number, one_of, positive_int, register
from .init_methods import InitMethod

# The reference's LoRA (Wcxwcxw/GORP src/run_uie_lora.py:397-399, scripts_llama/order_1.sh:44)
REFERENCE_LORA = dict(rank=8, alpha=32.0, use_rslora=False, targets=("q_proj", "v_proj"), dropout=0.1)


def _patterns(value) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) and p for p in items):
        raise ValueError(f"must be a module name or a non-empty list of module names, got {value!r}")
    return list(items)


def _boolean(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _dropout(value) -> float:
    x = number(minimum=0)(value)
    if not x < 1.0:
        raise ValueError(f"must be < 1 (a dropout probability), got {value!r}")
    return x


def full_rank_patterns(model, value) -> list[str]:
    """The module patterns GORP trains full-rank: ``value``, or the first of gate_proj/c_fc/fc1 the model has."""
    if value is not None:
        return value
    names = list(base_linears(model))
    return next(([p] for p in ("gate_proj", "c_fc", "fc1") if any(matches(p, n) for n in names)), [])


@dataclass
class GorpLora(LoraSettings):
    """The LoRA settings of the ``gorp`` method: the run's ``LoraSettings`` plus the adapter's dropout."""

    dropout: float = 0.0


def gorp_lora_settings(run_lora: LoraSettings | None, options: dict) -> GorpLora:
    """The adapter ``gorp`` trains: the reference's (``gorp_lora=reference``) or the run's (``run``), with the
    ``gorp_lora_*`` overrides applied."""
    opts = GorpMethod.options

    def get(name):
        value = options.get(name, opts[name].default)
        return value if value is None else opts[name].convert(value)

    base = get("gorp_lora")
    if base == "run":
        if run_lora is None:
            raise RunnerError("gorp: gorp_lora=run needs the run's LoRA settings (--rank, --alpha, --targets)")
        lora = GorpLora(run_lora.rank, run_lora.alpha, run_lora.use_rslora, list(run_lora.target_modules), 0.0)
    else:
        r = REFERENCE_LORA
        lora = GorpLora(r["rank"], r["alpha"], r["use_rslora"], list(r["targets"]), r["dropout"])
    for field_name, option in (
        ("rank", "gorp_lora_rank"),
        ("alpha", "gorp_lora_alpha"),
        ("target_modules", "gorp_lora_targets"),
        ("dropout", "gorp_lora_dropout"),
    ):
        value = get(option)
        if value is not None:
            lora = replace(lora, **{field_name: value})
    return lora


class GorpMethod(InitMethod):
    init = "lora"
    options = {
        "gorp_full_rank": Option(
            None,
            _patterns,
            "GORP: module patterns trained full-rank (default the first of gate_proj/c_fc/fc1 the model has)",
        ),
        "gorp_rank": Option(None, positive_int, "GORP: projection rank (default the LoRA rank, capped by the weights)"),
        "gorp_full_rank_lr_ratio": Option(
            REFERENCE_FULL_RANK_LR_RATIO,
            number(above=0),
            "GORP: learning rate of the full-rank weights over the run's --lr (default 0.005, the reference's "
            "1e-6/2e-4; 1 trains them at --lr)",
        ),
        "gorp_scale": Option(0.25, number(above=0), "GORP: update scale of the full-rank weights (GaLore's 0.25)"),
        # 20: the LLaMA recipe passes no gap, so the released code's default applies (run_uie_lora.py:250);
        # the T5 scripts pass 10, SPEC §4's value
        "gorp_gap": Option(20, positive_int, "GORP: projector refresh period T in steps"),
        "gorp_energy": Option(0.9, number(above=0, maximum=1), "GORP: explained energy kept when a shared space grows"),
        "gorp_energy_rule": Option(
            "reference",
            one_of("reference", "reach"),
            "GORP: vectors of a first space: 'reference' (those whose cumulative energy stays below gorp_energy, "
            "as the reference counts) or 'reach' (the fewest that reach it)",
        ),
        "gorp_svd": Option(
            "exact", one_of("exact", "randomized"), "GORP: projector refresh by exact SVD (the reference) or randomized"
        ),
        "gorp_lora_space": Option(
            "rank",
            one_of("rank", "input"),
            "GORP: side of LoRA A's shared space: 'rank' (R^r, the reference code's) or 'input' (R^n, A's inputs)",
        ),
        "gorp_project_update": Option(
            False, _boolean, "GORP: also project Adam's normalized update out of the shared space (not the reference)"
        ),
        "gorp_eps": Option(1e-6, number(above=0), "GORP: Adam's eps (the reference's 1e-6)"),
        "gorp_eps_mode": Option(
            "transformers",
            one_of("transformers", "torch"),
            "GORP: eps added to sqrt(v) before the bias correction ('transformers', the reference's AdamW) or after "
            "('torch')",
        ),
        "gorp_lora": Option(
            "reference",
            one_of("reference", "run"),
            "GORP: the adapter: 'reference' (r 8, alpha 32, q_proj/v_proj, dropout 0.1, no rsLoRA) or 'run' "
            "(--rank/--alpha/--targets)",
        ),
        "gorp_lora_rank": Option(None, positive_int, "GORP: LoRA rank (default from gorp_lora: 8 or --rank)"),
        "gorp_lora_alpha": Option(None, number(above=0), "GORP: LoRA alpha (default from gorp_lora: 32 or --alpha)"),
        "gorp_lora_targets": Option(
            None, _patterns, "GORP: LoRA target modules (default from gorp_lora: q_proj,v_proj or --targets)"
        ),
        "gorp_lora_dropout": Option(None, _dropout, "GORP: LoRA dropout (default from gorp_lora: 0.1 or 0)"),
        "gorp_allow_overlap": Option(
            False, _boolean, "GORP: allow a full-rank module to carry a LoRA adapter too (the reference never does)"
        ),
    }

    @staticmethod
    def lora_config(model, lora: LoraSettings):
        config = InitMethod.lora_config(model, lora)
        config.lora_dropout = float(getattr(lora, "dropout", 0.0))
        return config

    def check_model(self, model, lora, options):
        lora = gorp_lora_settings(lora, options)
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
        allow = _boolean(options.get("gorp_allow_overlap", False))
        both = sorted(set(mods) & set(self.lora_config(model, lora).target_modules))
        if both and not allow:
            raise RunnerError(
                f"gorp: {both[0]}{f' (and {len(both) - 1} more)' if len(both) > 1 else ''} would be both LoRA-adapted "
                f"(LoRA targets {lora.target_modules}) and trained full-rank (gorp_full_rank={patterns}); GORP trains "
                f"a weight one way, never both (the reference: LoRA on q_proj/v_proj, gate_proj full-rank). Drop it "
                f"from the LoRA targets (--method-option gorp_lora_targets=..., or --targets with gorp_lora=run) or "
                f"from gorp_full_rank, or set gorp_allow_overlap=true to train both"
            )

    def _full_rank(self, ctx, peft_model):
        patterns = full_rank_patterns(peft_model, self.option(ctx, "gorp_full_rank"))
        return patterns, [m for n, m in base_linears(peft_model).items() if any(matches(p, n) for p in patterns)]

    def init_adapter(self, ctx):
        peft_model, report = super().init_adapter(replace(ctx, lora=gorp_lora_settings(ctx.lora, ctx.options)))
        # unfreeze the full-rank weights now, so the runner counts them as trainable (it all-reduces the
        # gradients of what is trainable when training starts)
        for mod in self._full_rank(ctx, peft_model)[1]:
            mod.weight.requires_grad_(True)
        return peft_model, report

    def make_optimizer(self, ctx, peft_model, params, lr):
        patterns, mods = self._full_rank(ctx, peft_model)
        rank = self.option(ctx, "gorp_rank")
        if rank is None:
            rank = min([gorp_lora_settings(ctx.lora, ctx.options).rank] + [min(m.weight.shape) for m in mods])
        self.opt = build_gorp_optimizer(
            peft_model,
            full_rank=patterns,
            rank=rank,
            full_rank_lr_ratio=self.option(ctx, "gorp_full_rank_lr_ratio"),
            allow_lora_overlap=self.option(ctx, "gorp_allow_overlap"),
            shared_spaces=dict(ctx.state.get("spaces", {})),
            lr=lr,
            eps=self.option(ctx, "gorp_eps"),
            weight_decay=0.0,
            update_proj_gap=self.option(ctx, "gorp_gap"),
            energy=self.option(ctx, "gorp_energy"),
            energy_rule=self.option(ctx, "gorp_energy_rule"),
            svd=self.option(ctx, "gorp_svd"),
            lora_a_space=self.option(ctx, "gorp_lora_space"),
            project_update=self.option(ctx, "gorp_project_update"),
            eps_mode=self.option(ctx, "gorp_eps_mode"),
            seed=int(ctx.seed) * 1000003 + int(ctx.stage),
            lowrank_options={"scale": self.option(ctx, "gorp_scale")},
        )
        return self.opt

    def end_of_task(self, ctx, peft_model):
        # stage 1 is the reference's first task (no stored space at all), whatever any one weight stored
        self.opt.end_task(first_task=int(ctx.stage) == 1)
        ctx.state["spaces"] = {k: v.cpu() for k, v in self.opt.shared_spaces().items()}
        self.opt = None  # the next stage builds a fresh optimizer around the new adapter


register("gorp", GorpMethod, overwrite=True)  # overwrite: importlib.reload re-registers
