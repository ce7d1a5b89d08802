"""A study: one task sequence × methods × seeds (× a learning-rate grid per method), every cell a resumable run,
aggregated into means, 95 % bootstrap intervals and paired differences (runner.stats).

Layout of a study directory::

    <out>/study_config.json                 what the study was started with (a resume must match it)
    <out>/cells/<method>/lr<lr>/seed<s>/    one ``runner.run`` each: its own checkpoints, results, plots
    <out>/study.json, summary.md            the aggregate, rewritten when the study finishes
    <out>/plane.png, R_mean.png, surgery.png

A cell is a run of one method at one learning rate and one seed. A killed study resumes cell by cell: a cell
with results is never recomputed, the cell in flight continues from its own last checkpoint (so a kill loses
at most the stage in flight), and the cells not started yet start fresh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from .errors import ResumeError
from .files import atomic_json, atomic_write_bytes
from .lock import LOCK_NAME, RunDirLock
from .profiles import RunConfig
from .stats import StudyDataError, cell_scores, mean_R, paired_difference, summarize, surgery_activity

MIN_SEEDS = 3
STUDY_FORMAT = 1


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def normalize_lr_grid(cfg: RunConfig, lr_grid) -> dict[str, list[float]]:
    """{method: [lr, ...]} for every method of ``cfg``: a list applies to all methods, a dict to the methods it
    names (the others keep ``cfg.lr``), None gives every method ``cfg.lr``."""
    if lr_grid is None:
        grid = {}
    elif isinstance(lr_grid, dict):
        unknown = sorted(set(lr_grid) - set(cfg.methods))
        if unknown:
            raise ValueError(f"learning-rate grid names method(s) {unknown} that are not in --methods {cfg.methods}")
        grid = dict(lr_grid)
    elif isinstance(lr_grid, (list, tuple)):
        grid = {m: list(lr_grid) for m in cfg.methods}
    else:
        raise ValueError(f"lr_grid must be a list of learning rates or {{method: [lr, ...]}}, got {lr_grid!r}")
    out = {}
    for m in cfg.methods:
        lrs = grid.get(m, [cfg.lr])
        if not isinstance(lrs, (list, tuple)) or not lrs:
            raise ValueError(f"learning-rate grid of {m!r}: expected a non-empty list, got {lrs!r}")
        for lr in lrs:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"learning-rate grid of {m!r}: {lr!r} is not a positive finite number")
        if len({_lr_tag(float(x)) for x in lrs}) != len(lrs):
            raise ValueError(f"learning-rate grid of {m!r} repeats a value: {lrs}")
        out[m] = [float(x) for x in lrs]
    return out


def _check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a list of integers, got {seeds!r}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be ≥ 0, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat a value: {list(seeds)}")
    if len(seeds) < MIN_SEEDS:
        raise ValueError(
            f"a study needs at least {MIN_SEEDS} seeds (got {list(seeds)}): an interval over fewer seeds says almost "
            f"nothing about the seed-to-seed spread; pass e.g. --seeds 0,1,2"
        )
    return list(seeds)


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    lr: float
    seed: int

    def directory(self, out: str) -> str:
        return os.path.join(out, "cells", self.method, _lr_tag(self.lr), f"seed{self.seed}")

    def label(self) -> str:
        return f"{self.method} lr {self.lr:g} seed {self.seed}"


def plan_cells(cfg: RunConfig, seeds, lr_grid) -> list[Cell]:
    """Seed-major order: after every seed the study holds a complete comparison of all methods."""
    grid = normalize_lr_grid(cfg, lr_grid)
    return [Cell(m, lr, s) for s in _check_seeds(seeds) for m in cfg.methods for lr in grid[m]]


def cell_config(cfg: RunConfig, cell: Cell) -> RunConfig:
    return dataclasses.replace(cfg, methods=[cell.method], lr=cell.lr, seed=cell.seed)


def _study_config(cfg: RunConfig, seeds, grid) -> dict:
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "lr")}
    return json.loads(json.dumps({"format": STUDY_FORMAT, "run": base, "seeds": list(seeds), "lr_grid": grid}))


def _finished(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in ("results.json", "predictions.json"))


def study(
    cfg: RunConfig,
    out: str,
    *,
    seeds=(0, 1, 2),
    lr_grid=None,
    resume: bool = False,
    progress: bool = True,
    log=print,
    n_boot: int = 2000,
    level: float = 0.95,
    stop_after_cells: int | None = None,
    _stop_in_cell_after: int | None = None,
) -> dict:
    """Run (or resume) every cell of the study in ``out`` and write study.json, summary.md and the plots.

    Args:
        cfg: the run's configuration (``make_config``); its ``methods`` are compared, its ``seed`` and ``lr`` are
            replaced per cell.
        seeds: at least three seeds; each seed gives every method the same data, split and evaluation questions.
        lr_grid: None (every method at ``cfg.lr``), a list (every method at each of them) or {method: [lr, ...]}.
        n_boot, level: bootstrap replicates and the interval's level.
        stop_after_cells: (tests) return after that many cells were run in this call, as if killed.

    Returns the aggregate (the content of study.json); ``{"stopped_after_cells": k}`` when stopped early.
    """
    from .run import run, validate

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "slice-kernels study runs in one process (it loops over many runs); to use several processes for each "
            "cell, run the cells with torchrun ... slice-kernels run"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot={n_boot!r}: use at least 100 bootstrap replicates (2000 by default)")
    if not (isinstance(level, float) and 0.5 <= level < 1.0):
        raise ValueError(f"level={level!r}: the interval's level must be a float in [0.5, 1), e.g. 0.95")
    cells = plan_cells(cfg, seeds, lr_grid)
    grid = normalize_lr_grid(cfg, lr_grid)
    for c in cells:  # every cell's configuration checked before anything is written
        validate(cell_config(cfg, c))
    config = _study_config(cfg, seeds, grid)

    lock = open_experiment_dir(out, config, resume)
    try:
        ran = 0
        t0 = time.perf_counter()
        for i, c in enumerate(cells, 1):
            d = c.directory(out)
            if _finished(d):
                log(f"[study] cell {i}/{len(cells)} ({c.label()}): finished earlier, read from {d}")
                continue
            if stop_after_cells is not None and ran >= stop_after_cells:
                return {"stopped_after_cells": ran}
            cont = os.path.isfile(os.path.join(d, "checkpoints", "run.json"))
            log(f"[study] cell {i}/{len(cells)} ({c.label()}): {'resuming' if cont else 'starting'} in {d}")
            stop = _stop_in_cell_after if (stop_after_cells is not None and ran + 1 == stop_after_cells) else None
            res = run(cell_config(cfg, c), d, resume=cont, progress=progress, log=log, stop_after=stop)
            ran += 1
            if "stopped_after" in res:
                return {"stopped_after_cells": ran - 1, "stopped_in": c.label()}
            log(f"[study] cell {i}/{len(cells)} done; {time.perf_counter() - t0:.0f}s in this call")
        result = aggregate(out, cfg, cells, grid, n_boot=n_boot, level=level)
        write_study_outputs(result, out)
        log(summary_markdown(result))
        return result
    finally:
        lock.release()


def open_experiment_dir(
    out: str, config: dict, resume: bool, *, config_name: str = "study_config.json", what: str = "study"
) -> RunDirLock:
    """Lock ``out`` for a study (or a probe, ``what``): a fresh one needs it new or empty and records ``config`` in
    ``config_name``; a resume needs the same config there. Refusals change nothing."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ResumeError(
            f"--out {out!r} names no directory; pass a new or empty directory, e.g. --out runs/{what.replace(' ', '_')}"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ResumeError(f"--out {str(out)!r} is a file, not a directory")
    path = os.path.join(out, config_name)
    if resume:
        if not os.path.isfile(path):
            raise ResumeError(f"--resume: {out!r} holds no {what} ({path} is missing); drop --resume to start one")
    else:
        os.makedirs(out, exist_ok=True)
    lock = RunDirLock(out).acquire()
    try:
        if resume:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved != config:
                diff = sorted(
                    k for k in set(saved) | set(config) if saved.get(k) != config.get(k) and k != "run"
                ) + sorted(
                    f"run.{k}"
                    for k in set(saved.get("run", {})) | set(config["run"])
                    if saved.get("run", {}).get(k) != config["run"].get(k)
                )
                raise ResumeError(
                    f"--resume: the {what} in {out!r} was started with other settings (differences: {', '.join(diff)}); "
                    f"rerun with the same options, or choose another --out. Nothing was changed."
                )
        else:
            entries = [e for e in os.listdir(out) if e != LOCK_NAME]
            if entries:
                raise ResumeError(
                    f"{out!r} is not empty (it holds {', '.join(sorted(entries)[:5])}); a fresh {what} writes only into "
                    f"a new or empty directory: pass --resume to continue the {what} there, or choose another --out"
                )
            atomic_json(path, config)
    except BaseException:
        lock.release()
        raise
    return lock


def _read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def aggregate(out: str, cfg: RunConfig, cells: list[Cell], grid: dict, *, n_boot: int, level: float) -> dict:
    """Read every cell's outputs and compute the study's statistics."""
    scores: dict = {}  # (method, lr) -> [CellScores]
    reports: dict = {}
    base = []
    for c in cells:
        d = c.directory(out)
        res, pred = _read(os.path.join(d, "results.json")), _read(os.path.join(d, "predictions.json"))
        try:
            cs = cell_scores(res["methods"][c.method], pred[c.method], res["tasks"], c.seed)
        except StudyDataError as e:
            raise StudyDataError(f"cell {d}: {e}") from None
        scores.setdefault((c.method, c.lr), []).append(cs)
        reports.setdefault((c.method, c.lr), []).append(res["methods"][c.method]["init_reports"])
        if c.method == cfg.methods[0] and c.lr == grid[c.method][0]:
            base.append(res["base"])
    groups = []
    for (m, lr), cs in scores.items():
        groups.append(
            {
                "method": m,
                "lr": lr,
                "seeds": [x.seed for x in cs],
                "metrics": summarize(cs, n_boot=n_boot, level=level, seed=0),
                "R_mean": mean_R(cs),
                "surgery": surgery_activity(reports[(m, lr)]),
            }
        )
    comparisons = _comparisons(cfg.methods, grid, scores, groups, n_boot=n_boot, level=level)
    mean = lambda xs: sum(xs) / len(xs) if xs and all(x is not None for x in xs) else None  # noqa: E731
    return {
        "format": STUDY_FORMAT,
        "tasks": list(cfg.tasks),
        "heldout": list(cfg.heldout),
        "methods": list(cfg.methods),
        "lr_grid": grid,
        "seeds": sorted({c.seed for c in cells}),
        "n_eval": cfg.n_eval,
        "n_boot": n_boot,
        "level": level,
        "base": {"GP": mean([b["GP"] for b in base]), "IP": mean([b["IP"] for b in base])},
        "groups": groups,
        "comparisons": comparisons,
    }


def _comparisons(methods, grid, scores, groups, *, n_boot, level) -> list[dict]:
    """Every pair of methods, the later one in --methods minus the earlier (slice − lora_ga, slice − lora, …):
    at each learning rate both were run with, and, when a grid has several, each at its best mean AP (a choice
    made on the same data, labelled as such)."""
    best = {}
    for g in groups:
        cur = best.get(g["method"])
        if cur is None or g["metrics"]["AP"]["mean"] > cur[1]:
            best[g["method"]] = (g["lr"], g["metrics"]["AP"]["mean"])
    out = []
    for i, a in enumerate(methods):
        for b in methods[:i]:
            for lr in [x for x in grid[a] if x in grid[b]]:
                out.append(
                    {
                        "a": a,
                        "b": b,
                        "lr_a": lr,
                        "lr_b": lr,
                        "selection": "same lr",
                        **paired_difference(scores[(a, lr)], scores[(b, lr)], n_boot=n_boot, level=level, seed=1),
                    }
                )
            if len(grid[a]) > 1 or len(grid[b]) > 1:
                la, lb = best[a][0], best[b][0]
                out.append(
                    {
                        "a": a,
                        "b": b,
                        "lr_a": la,
                        "lr_b": lb,
                        "selection": "best mean AP of each (chosen on the same data)",
                        **paired_difference(scores[(a, la)], scores[(b, lb)], n_boot=n_boot, level=level, seed=1),
                    }
                )
    return out


# ----------------------------------------------------------------------------------------------- outputs


def _ci(v) -> str:
    if v is None:
        return "–"
    return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def summary_markdown(result: dict) -> str:
    from .stats import METRICS

    pct = f"{result['level'] * 100:g} %"
    lines = [
        f"Study: {' → '.join(result['tasks'])}; held-out: {', '.join(result['heldout']) or 'none'}; seeds "
        f"{result['seeds']}; {result['n_eval']} evaluation questions per task; mean over seeds [{pct} bootstrap "
        f"interval over seeds and evaluation questions, {result['n_boot']} replicates].",
        "",
        "| method | lr | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for g in result["groups"]:
        lines.append(f"| {g['method']} | {g['lr']:g} | " + " | ".join(_ci(g["metrics"][m]) for m in METRICS) + " |")
    b = result["base"]
    f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    lines.append("| base model | – | – | – | – | – | " + f"{f(b['GP'])} | {f(b['IP'])} |")
    if result["comparisons"]:
        lines += ["", f"Paired differences (a − b, same seeds and questions; {pct} interval):", ""]
        lines += ["| a − b | lr | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for c in result["comparisons"]:
            lr = f"{c['lr_a']:g}" if c["lr_a"] == c["lr_b"] else f"{c['lr_a']:g} vs {c['lr_b']:g} (best AP)"
            lines.append(f"| {c['a']} − {c['b']} | {lr} | " + " | ".join(_ci(c[m]) for m in METRICS) + " |")
    acting = [g for g in result["groups"] if g["surgery"]["stages_with_replay"]]
    if acting:
        lines += ["", "Surgery (γ ≠ 0: the projection acted), per stage over seeds:", ""]
        for g in acting:
            st = [
                f"stage {s['stage']}: {s['acted']}/{s['seeds']}"
                + (f", cos {s['mean_cos']:.3f}" if s["mean_cos"] is not None else "")
                + (f", |γ| {s['mean_abs_gamma']:.3g}" if s["mean_abs_gamma"] is not None and s["acted"] else "")
                for s in g["surgery"]["stages"]
            ]
            lines.append(f"- {g['method']} lr {g['lr']:g}: " + "; ".join(st))
    return "\n".join(lines) + "\n"


def write_study_outputs(result: dict, out: str) -> None:
    atomic_json(os.path.join(out, "study.json"), result)
    md = summary_markdown(result)
    atomic_write_bytes(os.path.join(out, "summary.md"), lambda f: f.write(md.encode()))
    plot_study(result, out)


def plot_study(result: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import save_figure

    groups = result["groups"]
    paths = []
    # the stability-plasticity plane: plasticity (AP) against forgetting, one point per method and lr
    fig, ax = plt.subplots(figsize=(5.6, 4.4), layout="constrained")
    for g in groups:
        ap, fg = g["metrics"]["AP"], g["metrics"]["Forgetting"]
        ax.errorbar(
            fg["mean"],
            ap["mean"],
            xerr=[[fg["mean"] - fg["lo"]], [fg["hi"] - fg["mean"]]],
            yerr=[[ap["mean"] - ap["lo"]], [ap["hi"] - ap["mean"]]],
            fmt="o",
            capsize=3,
            label=f"{g['method']} (lr {g['lr']:g})",
        )
    ax.set_xlabel("Forgetting (AP − FP), lower is better")
    ax.set_ylabel("AP (score right after learning), higher is better")
    ax.set_title(f"stability–plasticity, {len(result['seeds'])} seeds, {result['level'] * 100:g} % intervals")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out, "plane.png"))

    T = len(result["tasks"])
    fig, axes = plt.subplots(
        1, len(groups), figsize=(3.2 * len(groups) + 0.8, 3.0), squeeze=False, layout="constrained"
    )
    for ax, g in zip(axes[0], groups):
        R = np.array([[np.nan if v is None else v for v in row] for row in g["R_mean"]])
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(T):
            for j in range(i + 1):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(f"{g['method']} lr {g['lr']:g}", fontsize=9)
        ax.set_xlabel("task")
        ax.set_ylabel("after stage")
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
        ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean score over seeds")
    paths.append(save_figure(fig, out, "R_mean.png"))

    acting = [g for g in groups if g["surgery"]["stages_with_replay"]]
    if acting:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
        width = 0.8 / len(acting)
        for k, g in enumerate(acting):
            st = g["surgery"]["stages"]
            x = [s["stage"] for s in st]
            label = f"{g['method']} lr {g['lr']:g}"
            (line,) = a1.plot(x, [np.nan if s["mean_cos"] is None else s["mean_cos"] for s in st], "o-", label=label)
            for s in st:  # every seed's cosine beside the mean
                a1.scatter([s["stage"]] * len(s["cos"]), s["cos"], s=10, alpha=0.5, color=line.get_color())
            a2.bar(
                [v - 0.4 + width * (k + 0.5) for v in x],
                [s["acted"] / max(s["seeds"], 1) for s in st],
                width=width,
                label=label,
                color=line.get_color(),
            )
        stages = list(range(1, len(result["tasks"]) + 1))
        for ax in (a1, a2):
            ax.set_xticks(stages)
        a1.axhline(0.0, color="k", lw=0.6)
        a1.set_xlabel("stage")
        a1.set_ylabel("cos(G_cur, G_prev)")
        a1.set_title("gradient conflict at W^(t-1)")
        a2.set_xlabel("stage")
        a2.set_ylabel("fraction of seeds with γ ≠ 0")
        a2.set_ylim(0, 1)
        a2.set_title("how often the surgery acted")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        paths.append(save_figure(fig, out, "surgery.png"))
    return paths
