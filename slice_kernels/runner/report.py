"""Outputs of a run: results.json, the markdown summary, and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import contextlib
import json
import os

from .files import atomic_json, atomic_write_bytes, temp_name


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def summary_table(results: dict) -> str:
    lines = [
        f"Tasks: {' → '.join(results['tasks'])}; held-out (GP/IP): {', '.join(results['heldout']) or 'none'}; "
        f"trained on {results['train_on']} tokens.",
        "",
        "| method | AP | FP | Forgetting | BWT | GP | IP |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in results["methods"].items():
        lines.append(
            f"| {m} | {_f(r['AP'])} | {_f(r['FP'])} | {_f(r['Forgetting'])} | {_f(r['BWT'])} | "
            f"{_f(r['GP'])} | {_f(r['IP'])} |"
        )
    b = results["base"]
    lines.append(f"| base model | – | – | – | – | {_f(b['GP'])} | {_f(b['IP'])} |")
    lines += surgery_table(results)
    return "\n".join(lines) + "\n"


def _gamma_cell(gamma) -> tuple[str, bool]:
    """(the γ cell, whether the surgery changed the gradient) for the stage's global γ."""
    if gamma is None:
        return "–", False
    return f"{gamma:.3g}", gamma != 0


def surgery_table(results: dict) -> list[str]:
    """Lines of a table of every stage at which a method measured one global cos(G_cur, G_prev) (SLICE with the
    default global scope; per-module scopes report per layer, in results.json only): whether the surgery acted is
    what separates SLICE from LoRA-GA in that run."""
    rows = []
    for m, r in results["methods"].items():
        for rep in r.get("init_reports") or []:
            if rep.get("cos") is None:
                continue
            cell, acted = _gamma_cell(rep.get("gamma"))
            rows.append(
                f"| {m} | {rep.get('stage', '–')} | {rep.get('task', '–')} | {rep['cos']:.3f} | {cell} | "
                f"{'projected' if acted else 'not applied'} |"
            )
    if not rows:
        return []
    return [
        "",
        "Gradient surgery at each stage with a replay buffer (cos of the current and replay gradients at W^(t-1); "
        "γ ≠ 0: the current gradient was projected):",
        "",
        "| method | stage | task | cos | γ | surgery |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def write_outputs(results: dict, out: str, timings: list | None = None, predictions: dict | None = None) -> str:
    atomic_json(os.path.join(out, "results.json"), results)
    if predictions is not None:  # per method, stage and seen task: every answer, prediction and its score
        atomic_json(os.path.join(out, "predictions.json"), predictions)
    if timings is not None:
        atomic_json(os.path.join(out, "timings.json"), timings)
    md = summary_table(results)
    atomic_write_bytes(os.path.join(out, "summary.md"), lambda f: f.write(md.encode()))
    plot_all(results, out)
    return md


def plot_all(results: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = results["methods"]
    tasks = [t.split("?")[0] for t in results["tasks"]]  # labels: reasoning-gym options left out
    paths = []
    T = len(tasks)
    # R as a heatmap per method
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.2 * len(methods) + 0.8, 3.0), squeeze=False, layout="constrained"
    )
    for ax, (m, r) in zip(axes[0], methods.items()):
        R = np.array([[np.nan if v is None else v for v in row] for row in r["R"]], dtype=float)
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(m)
        ax.set_xticks(range(T), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(T), [f"after {i + 1}" for i in range(T)], fontsize=7)
        for i in range(T):
            for j in range(i + 1):
                ax.text(
                    j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if R[i, j] < 0.6 else "k"
                )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    paths.append(save_figure(fig, out, "R_heatmaps.png"))
    # AP / FP / Forgetting bars per method
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2.5, 3.0), layout="constrained")
    keys = ["AP", "FP", "Forgetting"]
    x = np.arange(len(methods))
    for k, key in enumerate(keys):
        ax.bar(x + (k - 1) * 0.27, [methods[m][key] for m in methods], 0.27, label=key)
    ax.set_xticks(x, list(methods))
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("AP / FP / Forgetting")
    paths.append(save_figure(fig, out, "metrics_bars.png"))
    # per-task score across stages
    fig, axes = plt.subplots(1, T, figsize=(3.0 * T, 2.8), squeeze=False, layout="constrained")
    for j, ax in enumerate(axes[0]):
        for m, r in methods.items():
            ys = [r["R"][i][j] for i in range(j, T)]
            ax.plot(range(j + 1, T + 1), ys, marker="o", label=m)
        ax.set_title(tasks[j], fontsize=9)
        ax.set_xlabel("after stage")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7)
    paths.append(save_figure(fig, out, "task_curves.png"))
    return paths


def save_figure(fig, out, name) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    tmp = temp_name(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def load_results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)
