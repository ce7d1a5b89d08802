"""The built-in methods ``lora``, ``lora_ga``, ``lora_ga_peft``, ``slice``, ``loram`` (SPEC §1): each stage's
adapter comes from the library's ``get_slice_model``, so the runner compares exactly the package's initializers,
with every check of the API. ``lora_ga_peft`` is PEFT's ``init_lora_weights="lora_ga"`` preset (its scale
included on Conv1D layers). Every ``SliceConfig`` field given as ``--method-option`` reaches the init, the
surgery variants included; the stage's report says which variant ran (``variant``)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from ...modules import is_conv1d, matches, resolve_targets
from ...slice_init import SliceConfig, get_slice_model, init_sharded_
from ...slice_init.peft import check_init_targets
from ..errors import RunnerError
from ..train import rank_share, world_and_rank
from .base import LoraSettings, Method, StageContext, register


class InitMethod(Method):
    """Initialize with ``get_slice_model(config=SliceConfig(method=self.init))`` and train plain LoRA."""

    init = "lora"

    def slice_config(self, ctx: StageContext, current: list, replay: list) -> SliceConfig:
        options = {k: v for k, v in ctx.options.items() if k in SliceConfig.__dataclass_fields__}
        # every replay buffer gives the same number of batches, so pooling them would be the same average: the
        # runner always passes one list per task (docs/runner.md)
        options["replay_mode"] = "per_task"
        return SliceConfig(
            method=self.init,
            seed=(ctx.seed * 1000003 + ctx.stage) % (2**63 - 1),  # fresh random init per stage, reproducible
            current_steps=max(1, len(current)),
            replay_steps=self._replay_steps(options, current, replay),
            **options,
        )

    def check_config(self, cfg) -> None:
        """The replay options of the surgery variants against the replay buffer's size (replay_batches ×
        grad_batch_size examples at most), before the model loads; ``_replay_steps`` repeats the check on the
        actual buffers, which a short task can make smaller."""
        if self.init != "slice":
            return
        opts = cfg.method_options
        if opts.get("single_retain_task_mode") and cfg.replay_batches < cfg.grad_batches:
            raise RunnerError(
                f"single_retain_task_mode replays the previous task with as many batches as the current task "
                f"(grad_batches={cfg.grad_batches}), but replay_batches={cfg.replay_batches}: set replay_batches ≥ "
                f"grad_batches"
            )
        b = opts.get("retain_batch_size")
        if b is not None and b > cfg.replay_batches * cfg.grad_batch_size:
            raise RunnerError(
                f"retain_batch_size={b} is larger than the replay buffer ({cfg.replay_batches * cfg.grad_batch_size} "
                f"examples per task: replay_batches × grad_batch_size); lower retain_batch_size or raise "
                f"replay_batches"
            )

    def _replay_steps(self, options: dict, current: list, replay: list) -> int:
        """S_prev: every replay batch of a task's buffer; with ``retain_batch_size`` b, the buffer's examples
        re-batched at b (rows // b full batches, the smallest over the tasks). ``single_retain_task_mode``
        replays task t−1 with as many batches as the current task, so its buffer must hold that many."""
        if not replay or self.init != "slice":
            return max(1, max((len(r) for r in replay), default=1))
        if options.get("single_retain_task_mode"):
            if len(replay[-1]) < len(current):
                raise RunnerError(
                    f"single_retain_task_mode replays the previous task with as many batches as the current task "
                    f"({len(current)}, grad_batches), but its replay buffer gives {len(replay[-1])} "
                    f"(replay_batches): set replay_batches ≥ grad_batches"
                )
            return max(1, len(replay[-1]))
        b = options.get("retain_batch_size")
        if b is None:
            return max(1, max(len(r) for r in replay))
        rows = [sum(int(next(iter(x.values())).shape[0]) for x in r) for r in replay]
        if min(rows) < b:
            raise RunnerError(
                f"retain_batch_size={b} is larger than a task's replay buffer ({min(rows)} examples: replay_batches "
                f"× grad_batch_size); lower retain_batch_size or raise replay_batches"
            )
        return min(rows) // b

    @staticmethod
    def lora_config(model, lora: LoraSettings) -> LoraConfig:
        # --targets names the usual linears of several architectures: adapt those this model has
        names = [n for n, _ in model.named_modules()]
        present = [t for t in lora.target_modules if any(matches(t, n, regex=False) for n in names)]
        targets = resolve_targets(model, present or list(lora.target_modules))
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            use_rslora=lora.use_rslora,
            target_modules=list(targets),
            lora_dropout=0.0,
            fan_in_fan_out=any(is_conv1d(m) for m in targets.values()),
            bias="none",
        )

    def check_model(self, model, lora: LoraSettings, options: dict) -> None:
        """The init's refusals that depend on the model (targets it lacks, shared weights, a rank too large)."""
        options = {k: v for k, v in options.items() if k in SliceConfig.__dataclass_fields__}
        check_init_targets(model, self.lora_config(model, lora), SliceConfig(method=self.init, **options))

    def init_adapter(self, ctx: StageContext):
        lora_config = self.lora_config(ctx.model, ctx.lora)
        current = rank_share(ctx.current)
        replay = [rank_share(b) for b in ctx.replay]
        cfg = self.slice_config(ctx, current, replay)
        _, rank = world_and_rank()
        if ctx.fsdp:
            return self._init_sharded(ctx, lora_config, cfg, current, replay, rank)
        with torch.random.fork_rng(devices=[]):  # PEFT's own init draws are overwritten: leave the run's RNG alone
            peft_model = get_slice_model(
                ctx.model,
                lora_config,
                cfg,
                current=current,
                replay=replay or None,
                loss_fn=ctx.loss_fn,
                progress=ctx.progress and rank == 0,
            )
        return peft_model, self._report(peft_model.slice_init_report)

    def _init_sharded(self, ctx: StageContext, lora_config, cfg: SliceConfig, current, replay, rank: int):
        """--fsdp: PEFT wrap and shard a copy of W^(t-1), then init_sharded_ on the shards (runner/fsdp.py)."""
        from ..fsdp import sharded_stage_model

        check_init_targets(ctx.model, lora_config, cfg)  # the refusals get_slice_model makes, on the plain model
        with torch.random.fork_rng(devices=[]):
            peft_model = sharded_stage_model(ctx.model, lora_config, self.init)
            rep = init_sharded_(
                peft_model,
                cfg,
                current=current,
                replay=replay or None,
                loss_fn=ctx.loss_fn,
                progress=ctx.progress and rank == 0,
            )
        return peft_model, self._report(rep)

    def merge(self, ctx: StageContext, peft_model):
        if not ctx.fsdp:
            return super().merge(ctx, peft_model)
        from ..fsdp import full_state, merge_into

        state = full_state(peft_model)  # collective: every rank gathers the trained shards
        return merge_into(ctx.model, self.lora_config(ctx.model, ctx.lora), state, self.init)  # the init's wrapping

    def _report(self, rep) -> dict:
        report = {
            "method": self.name,
            "init": self.init,
            "gamma": rep.gamma,
            "cos": rep.cos,
            "D": rep.D,
            "Np": rep.Np,
            "Nc": rep.Nc,
            "variant": rep.variant,
            "phases_seconds": {k: v["seconds"] for k, v in rep.phases.items()},
        }
        return report


def init_method(init_name: str) -> type[InitMethod]:
    """The ``InitMethod`` subclass whose init is ``init_name`` (a ``SliceConfig.method``)."""
    return type(f"InitMethod_{init_name}", (InitMethod,), {"init": init_name, "__module__": __name__})


for _name in ("lora", "lora_ga", "lora_ga_peft", "slice", "loram"):
    register(_name, init_method(_name), overwrite=True)  # overwrite: importlib.reload re-registers
