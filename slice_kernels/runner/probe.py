"""Stage-conflict probe: the cosine SLICE's gate would see at W^(t-1) if a candidate task came next.

The miner (runner.mining) scores task pairs by their gradients on the base model, but SLICE's gate reads
cos(G_cur, G_prev) at W^(t-1), after the earlier tasks were learned, and the two can differ in sign. For each
seed the probe

1. trains the prefix (``cfg.tasks``) with one method, exactly as a run's stages do (``run.stage_context`` and
   ``run.train_stage``: the same batches, seeds, init and training), giving W^(t-1) and the prefix's replay
   buffers, and scores the prefix tasks there (so a conflict with a task that was not learned can be told apart);
2. for every candidate, builds the batches a run would give that task at stage t, runs SLICE's init on W^(t-1)
   (whose report carries cos and γ, computed by the package's own surgery), and restores W^(t-1). Nothing is
   trained on the candidates.

Outputs in ``out``: ``probe_config.json`` (a resume must match it), ``seeds/seed<s>.json`` (one per finished
seed: a killed probe loses at most the seed in flight), ``probe.json`` and ``summary.md`` (candidates sorted by
their mean cosine, how many seeds conflict, cos < τ) and ``probe.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from .files import atomic_json, atomic_write_bytes
from .profiles import RunConfig

PROBE_FORMAT = 1
PROBE_METHOD = "slice"  # the init whose report carries the gate's cosine


def check_probe_args(cfg: RunConfig, candidates, seeds, prefix_method: str) -> None:
    """Every refusal before the model loads or anything is written."""
    from . import methods as methods_mod
    from .run import validate

    if not cfg.tasks:
        raise ValueError("the probe needs a prefix: --tasks A[,B...] are trained first, then each candidate is probed")
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise ValueError("the probe needs at least one candidate: --candidates X,Y,...")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"--candidates repeats a task: {list(candidates)}")
    inside = sorted(set(candidates) & set(cfg.tasks))
    if inside:
        raise ValueError(f"candidate(s) {inside} are already in the prefix --tasks {cfg.tasks}; a candidate comes next")
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError("the probe needs at least one seed: --seeds 0,1,2")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or len(set(seeds)) != len(
        seeds
    ):
        raise ValueError(f"--seeds must be distinct integers ≥ 0, got {list(seeds)}")
    if prefix_method not in methods_mod.available():
        raise ValueError(
            f"--prefix-method {prefix_method!r} is not a registered method; slice-kernels methods lists them"
        )
    if cfg.method_options.get("projection_scope", "global") != "global":
        raise ValueError(
            "the probe reads the gate's one global cosine; projection_scope="
            f"{cfg.method_options['projection_scope']!r} gates each module by its own (drop that --method-option)"
        )
    if cfg.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the probe runs in one process, without --fsdp")
    # the run's own checks, on the run the probe imitates: the prefix then every candidate
    validate(
        dataclasses.replace(
            cfg,
            tasks=list(cfg.tasks) + list(candidates),
            heldout=[],
            methods=list(dict.fromkeys([prefix_method, PROBE_METHOD])),
        )
    )


def probe_config(cfg: RunConfig, candidates, seeds, prefix_method: str) -> dict:
    run = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "methods", "heldout")}
    return json.loads(
        json.dumps(
            {
                "format": PROBE_FORMAT,
                "run": run,
                "candidates": list(candidates),
                "seeds": list(seeds),
                "prefix_method": prefix_method,
            }
        )
    )


def load_probe_tasks(cfg: RunConfig, candidates) -> tuple[list, list]:
    """The prefix's and the candidates' tasks for ``cfg.seed`` (a run's split), size-checked as a run checks them."""
    from .run import check_task_sizes
    from .tasks import load_task

    prefix = [load_task(s, cfg.n_train, cfg.n_eval, cfg.seed) for s in cfg.tasks]
    cands = [load_task(s, cfg.n_train, cfg.n_eval, cfg.seed) for s in candidates]
    check_task_sizes(prefix + cands, cfg)
    return prefix, cands


def _probe_seed(model, tok, base: dict, cfg: RunConfig, tasks, prefix_method, *, progress, log) -> dict:
    """One seed: train the prefix from the base weights, then the gate's cosine for every candidate."""
    from . import methods as methods_mod
    from .evaluate import evaluate_task
    from .methods.base import LoraSettings
    from .run import replay_buffer, stage_context, train_stage

    prefix, cands = tasks
    lora = LoraSettings(cfg.rank, cfg.alpha, cfg.use_rslora, list(cfg.targets))
    model.load_state_dict(base)
    method, state, replay, losses = methods_mod.get(prefix_method), {}, {}, []
    for t, task in enumerate(prefix, 1):
        ctx = stage_context(
            model, tok, task, t, cfg, lora, state, dict(replay), mname=prefix_method, world=1, rank=0, progress=progress
        )
        model, rep, ls = train_stage(
            method, ctx, tok, task, cfg, world=1, rank=0, progress=progress, desc=prefix_method
        )
        losses.append(ls)
        replay[task.name] = replay_buffer(task, cfg)
        log(f"[probe] seed {cfg.seed}: prefix stage {t} ({task.name}) trained, loss {ls[0]:.3f} -> {ls[-1]:.3f}")
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, max_len=cfg.max_len)
    scores = {
        task.name: evaluate_task(model, tok, task, progress=progress, fmt=cfg.prompt_format, **kw)[0] for task in prefix
    }
    log(f"[probe] seed {cfg.seed}: prefix scores at W^({len(prefix)}) {scores}")
    at = {k: v.detach().clone() for k, v in model.state_dict().items()}  # W^(t-1), restored after every candidate
    t = len(prefix) + 1
    probe_method = methods_mod.get(PROBE_METHOD)
    cos, gamma = {}, {}
    for task in cands:
        ctx = stage_context(
            model, tok, task, t, cfg, lora, {}, dict(replay), mname=PROBE_METHOD, world=1, rank=0, progress=progress
        )
        peft_model, rep = probe_method.init_adapter(ctx)
        model = peft_model.unload()  # the init also offsets the base weights: W^(t-1) is restored below
        model.load_state_dict(at)
        cos[task.name], gamma[task.name] = rep["cos"], rep["gamma"]
        log(f"[probe] seed {cfg.seed}: candidate {task.name}: cos {rep['cos']:+.4f}, gamma {rep['gamma']:.4g}")
    return {
        "seed": cfg.seed,
        "prefix": [x.name for x in prefix],
        "prefix_losses": losses,
        "prefix_scores": scores,
        "cos": cos,
        "gamma": gamma,
    }, model


def summarize_probe(per_seed: list[dict], candidates: list[str], tau: float) -> list[dict]:
    """Per candidate: the cosines over seeds, their mean, min, max, and the seeds where the gate opens (cos < τ);
    sorted by mean cosine, most conflicting first (ties by name)."""
    rows = []
    for c in candidates:
        vals = [s["cos"][c] for s in per_seed]
        rows.append(
            {
                "candidate": c,
                "cos": vals,
                "mean_cos": sum(vals) / len(vals),
                "min_cos": min(vals),
                "max_cos": max(vals),
                "conflicting_seeds": sum(v < tau for v in vals),
                "seeds": len(vals),
            }
        )
    return sorted(rows, key=lambda r: (r["mean_cos"], r["candidate"]))


def probe_markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [
        f"# Stage-conflict probe: cos(G_cur, G_prev) at W^({len(result['prefix'])})",
        "",
        f"Prefix trained with `{result['prefix_method']}`: {' → '.join(result['prefix'])}. The gate opens when "
        f"cos < τ = {result['tau']:g}.",
        "",
        "Prefix scores at W^(t-1), per seed: "
        + "; ".join(
            f"seed {s['seed']}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["prefix_scores"].items())
            for s in result["per_seed"]
        ),
        "",
        "Candidates whose gate opens, per seed: "
        + "; ".join(
            f"seed {s['seed']}: {sum(c < result['tau'] for c in s['cos'].values())} of {len(s['cos'])}"
            for s in result["per_seed"]
        ),
        "",
        "| candidate | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | conflicts |",
        "|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for r in result["summary"]:
        cells = " | ".join(f"{v:+.3f}" for v in r["cos"])
        lines.append(
            f"| {r['candidate']} | {cells} | {r['mean_cos']:+.3f} | {r['conflicting_seeds']} of {r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def plot_probe(result: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    rows = result["summary"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    colors = plt.get_cmap("tab10")
    for j, seed in enumerate(result["seeds"]):  # one colour per seed: a seed that shifts every candidate shows
        ax.plot(
            [r["cos"][j] for r in rows], range(len(rows)), "o", color=colors(j % 10), alpha=0.8, label=f"seed {seed}"
        )
    ax.plot([r["mean_cos"] for r in rows], range(len(rows)), "|", color="black", markersize=14, label="mean")
    ax.axvline(result["tau"], color="tab:red", linestyle="--", label=f"τ = {result['tau']:g}")
    ax.set_yticks(range(len(rows)), [r["candidate"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"cos(G_cur, G_prev) at W^({len(result['prefix'])})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, "probe.png")


def probe(
    cfg: RunConfig,
    candidates,
    out: str,
    *,
    seeds=(0, 1, 2),
    prefix_method: str = "slice",
    resume: bool = False,
    progress: bool = True,
    log=print,
    stop_after_seeds: int | None = None,
) -> dict:
    """Probe every candidate after the prefix ``cfg.tasks`` for every seed (see the module docstring).

    ``stop_after_seeds`` (tests): return after that many seeds were probed in this call, as if killed.
    Returns the content of probe.json, or ``{"stopped_after_seeds": k}``.
    """
    from .model import load_model
    from .study import open_experiment_dir

    candidates, seeds = list(candidates), list(seeds)
    check_probe_args(cfg, candidates, seeds, prefix_method)
    config = probe_config(cfg, candidates, seeds, prefix_method)
    # every seed's tasks are built (and refused) before the directory is touched
    tasks = {s: load_probe_tasks(dataclasses.replace(cfg, seed=s), candidates) for s in seeds}
    lock = open_experiment_dir(out, config, resume, config_name="probe_config.json", what="probe")
    try:
        os.makedirs(os.path.join(out, "seeds"), exist_ok=True)
        model = tok = base = None
        per_seed, ran, t0 = [], 0, time.perf_counter()
        for s in seeds:
            path = os.path.join(out, "seeds", f"seed{s}.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    per_seed.append(json.load(f))
                log(f"[probe] seed {s}: finished earlier, read from {path}")
                continue
            if stop_after_seeds is not None and ran >= stop_after_seeds:
                return {"stopped_after_seeds": ran}
            if model is None:
                model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
                base = {k: v.detach().clone() for k, v in model.state_dict().items()}
            res, model = _probe_seed(
                model,
                tok,
                base,
                dataclasses.replace(cfg, seed=s),
                tasks[s],
                prefix_method,
                progress=progress,
                log=log,
            )
            atomic_json(path, res)
            per_seed.append(res)
            ran += 1
            log(f"[probe] seed {s} done; {time.perf_counter() - t0:.0f}s in this call")
        names = [c for c in per_seed[0]["cos"]]  # the candidates' task names (a file task is named by its stem)
        result = {
            "format": PROBE_FORMAT,
            "prefix": per_seed[0]["prefix"],
            "prefix_method": prefix_method,
            "candidates": names,
            "seeds": seeds,
            "tau": cfg.conflict_threshold,
            "per_seed": per_seed,
            "summary": summarize_probe(per_seed, names, cfg.conflict_threshold),
        }
        atomic_json(os.path.join(out, "probe.json"), result)
        md = probe_markdown(result)
        atomic_write_bytes(os.path.join(out, "summary.md"), md.encode("utf-8"))
        plot_probe(result, out)
        log(md)
        return result
    finally:
        lock.release()
