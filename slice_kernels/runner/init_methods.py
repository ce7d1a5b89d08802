"""The built-in methods: ``lora``, ``lora_ga``, ``slice``, ``loram`` (SPEC §1), all through
``slice_kernels.init_from_gradients`` so the runner compares exactly the package's initializers."""
from __future__ import annotations

from ..config import SliceConfig
from ..init import init_from_gradients
from .adapters import install_lora, target_weights
from .methods import Method, StageContext, register


class InitMethod(Method):
    """Initialize with ``init_from_gradients(config=SliceConfig(method=...))`` and train plain LoRA."""

    init = "lora"

    def init_adapter(self, ctx: StageContext):
        opts = dict(ctx.options)
        cfg = SliceConfig(
            method=self.init,
            seed=(ctx.seed * 1000003 + ctx.stage) % (2**63 - 1),  # fresh random init per stage, reproducible
            current_steps=max(1, len(ctx.current)),
            replay_steps=max(1, max((len(r) for r in ctx.replay), default=1)),
            **{k: v for k, v in opts.items() if k in SliceConfig.__dataclass_fields__},
        )
        weights = target_weights(ctx.model, ctx.lora.target_modules)
        g_cur = g_prev = None
        if cfg.uses_gradients:
            g_cur = ctx.collect_gradients(ctx.current)
            if cfg.uses_replay and ctx.replay:
                per_task = [ctx.collect_gradients(b) for b in ctx.replay]  # equal weight per earlier task
                g_prev = {n: sum(g[n] for g in per_task) / len(per_task) for n in g_cur}
        res = init_from_gradients(
            {n: w.detach() for n, w in weights.items()}, g_cur, g_prev,
            r=ctx.lora.rank, lora_alpha=ctx.lora.alpha, use_rslora=ctx.lora.use_rslora, config=cfg,
        )
        peft_model = install_lora(ctx.model, ctx.lora, res.A, res.B, res.weights)
        rep = res.report
        report = {
            "method": self.name, "init": self.init, "gamma": rep.gamma, "cos": rep.cos,
            "D": rep.D, "Np": rep.Np, "Nc": rep.Nc,
            "phases_seconds": {k: v["seconds"] for k, v in rep.phases.items()},
        }
        return peft_model, report


def _make(init_name: str):
    def factory():
        m = InitMethod()
        m.init = init_name
        return m

    return factory


for _name in ("lora", "lora_ga", "slice", "loram"):
    register(_name, _make(_name))
