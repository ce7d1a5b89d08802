"""Statistics of a study (``runner.study``): means and 95 % bootstrap intervals of the continual metrics over
seeds *and* evaluation examples, and paired differences between methods.

One replicate of the bootstrap draws the seeds with replacement and, inside each drawn seed, the evaluation
examples of every task with replacement; the metrics are recomputed from the resampled per-example scores and
averaged over the drawn seeds. Two sources of noise are in the interval that way: which seed (data order,
init sketches, the task split) and which questions the evaluation happened to ask.

Pairing. Runs of two methods with the same seed see the same task split, hence the same evaluation examples;
a paired replicate draws one set of seeds and one set of example indices and applies them to both methods, so
the interval of the difference leaves out what the two share.

Why the examples are resampled once per (seed, task) and not per stage: every stage evaluates the same
questions of a task, so R[i][j] and R[T-1][j] are correlated; drawing one index set per task keeps that
correlation in every replicate (Forgetting = AP − FP would otherwise look noisier than it is).

The interval is the percentile interval: lower = the smallest replicate value whose empirical CDF reaches
(1 − level)/2, upper = the smallest whose CDF reaches (1 + level)/2 (numpy's ``inverted_cdf``), so hand
computation on a small discrete case gives the exact endpoints the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METRICS = ("AP", "FP", "Forgetting", "BWT", "GP", "IP")


class StudyDataError(ValueError):
    """A run's outputs cannot be aggregated (missing per-example scores, inconsistent shapes)."""


@dataclass
class CellScores:
    """Per-example scores of one finished run of one method.

    ``R[i][j]`` holds task j's per-example scores after stage i (None above the diagonal); ``GP`` and ``IP`` map
    each held-out task to its per-example scores (empty when the run has no held-out tasks)."""

    seed: int
    R: list
    GP: dict
    IP: dict

    @property
    def tasks(self) -> int:
        return len(self.R)


def cell_scores(method_result: dict, method_predictions: list, tasks: list[str], seed: int) -> CellScores:
    """Assemble a ``CellScores`` from a run's results.json entry of one method and its predictions.json entry,
    checking that the per-example means reproduce the R matrix the run reported."""
    T = len(tasks)
    if len(method_predictions) != T:
        raise StudyDataError(f"predictions have {len(method_predictions)} stage(s), the run has {T} task(s)")
    R = [[None] * T for _ in range(T)]
    for i, stage in enumerate(method_predictions):
        for j in range(i + 1):
            rows = stage.get(tasks[j])
            if not rows:
                raise StudyDataError(f"stage {i + 1} has no predictions for task {tasks[j]!r}")
            scores = np.asarray([float(r["score"]) for r in rows])
            reported = method_result["R"][i][j]
            if not math.isclose(scores.mean(), reported, rel_tol=1e-9, abs_tol=1e-12):
                raise StudyDataError(
                    f"stage {i + 1}, task {tasks[j]!r}: the mean of the per-example scores {scores.mean()} differs "
                    f"from R = {reported}; the predictions do not belong to these results"
                )
            R[i][j] = scores
    for key in ("GP", "IP"):
        if method_result.get(key) is not None and f"{key}_scores" not in method_result:
            raise StudyDataError(
                f"results have {key} but no per-example {key}_scores (written by slice-kernels ≥ 0.2.1); rerun the cell"
            )
    gp = {k: np.asarray(v, dtype=float) for k, v in (method_result.get("GP_scores") or {}).items()}
    ip = {k: np.asarray(v, dtype=float) for k, v in (method_result.get("IP_scores") or {}).items()}
    return CellScores(seed=seed, R=R, GP=gp, IP=ip)


def _metrics(cell: CellScores, pick: dict | None) -> dict:
    """The six metrics of one cell; ``pick`` maps ("R", j) / ("GP", name) / ("IP", name) to example indices."""
    T = cell.tasks

    def mean(key, scores):
        idx = None if pick is None else pick[key]
        return float(scores.mean() if idx is None else scores[idx].mean())

    R = [[mean(("R", j), cell.R[i][j]) if j <= i else None for j in range(T)] for i in range(T)]
    AP = sum(R[j][j] for j in range(T)) / T
    FP = sum(R[T - 1][j] for j in range(T)) / T
    BWT = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    out = {"AP": AP, "FP": FP, "Forgetting": AP - FP, "BWT": BWT}
    for key in ("GP", "IP"):
        d = getattr(cell, key)
        out[key] = sum(mean((key, k), v) for k, v in d.items()) / len(d) if d else None
    return out


def _draw(cell: CellScores, rng: np.random.Generator) -> dict:
    pick = {("R", j): rng.integers(0, len(cell.R[j][j]), len(cell.R[j][j])) for j in range(cell.tasks)}
    for key in ("GP", "IP"):
        for k, v in getattr(cell, key).items():
            pick[(key, k)] = rng.integers(0, len(v), len(v))
    return pick


def _mean_of(rows: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows]
        out[m] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    return out


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    a = np.asarray(samples, dtype=float)
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    return float(np.quantile(a, lo, method="inverted_cdf")), float(np.quantile(a, hi, method="inverted_cdf"))


def _check_cells(cells: list[CellScores], what: str) -> None:
    if not cells:
        raise StudyDataError(f"{what}: no finished cells to aggregate")
    T = cells[0].tasks
    if any(c.tasks != T for c in cells):
        raise StudyDataError(f"{what}: cells have different numbers of tasks {[c.tasks for c in cells]}")


def summarize(cells: list[CellScores], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean over seeds and bootstrap interval of every metric for one (method, learning rate) group."""
    _check_cells(cells, "summarize")
    point = _mean_of([_metrics(c, None) for c in cells])
    per_seed = {m: [_metrics(c, None)[m] for c in cells] for m in METRICS}
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(cells), len(cells))
        reps.append(_mean_of([_metrics(cells[s], _draw(cells[s], rng)) for s in drawn]))
    out = {}
    for m in METRICS:
        if point[m] is None:
            out[m] = None
            continue
        lo, hi = percentile_interval([r[m] for r in reps], level)
        out[m] = {"mean": point[m], "lo": lo, "hi": hi, "per_seed": per_seed[m]}
    return out


def paired_difference(
    a: list[CellScores], b: list[CellScores], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict:
    """Mean over seeds and bootstrap interval of metric(a) − metric(b), paired by seed and by example."""
    _check_cells(a + b, "paired_difference")
    by_seed_b = {c.seed: c for c in b}
    pairs = [(c, by_seed_b[c.seed]) for c in a if c.seed in by_seed_b]
    if not pairs:
        raise StudyDataError("paired_difference: the two groups share no seed")
    for x, y in pairs:
        for j in range(x.tasks):
            if len(x.R[j][j]) != len(y.R[j][j]):
                raise StudyDataError(f"seed {x.seed}: task {j + 1} has different evaluation sets in the two groups")

    def diff(x, y, pick):
        mx, my = _metrics(x, pick), _metrics(y, pick)
        return {m: None if mx[m] is None or my[m] is None else mx[m] - my[m] for m in METRICS}

    point = _mean_of([diff(x, y, None) for x, y in pairs])
    per_seed = {m: [diff(x, y, None)[m] for x, y in pairs] for m in METRICS}
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(pairs), len(pairs))
        reps.append(_mean_of([diff(*pairs[s], _draw(pairs[s][0], rng)) for s in drawn]))
    out = {"seeds": [x.seed for x, _ in pairs]}
    for m in METRICS:
        if point[m] is None:
            out[m] = None
            continue
        lo, hi = percentile_interval([r[m] for r in reps], level)
        out[m] = {"mean": point[m], "lo": lo, "hi": hi, "per_seed": per_seed[m]}
    return out


def mean_R(cells: list[CellScores]) -> list:
    """The R matrix averaged over seeds (None above the diagonal)."""
    _check_cells(cells, "mean_R")
    T = cells[0].tasks
    return [[float(np.mean([c.R[i][j].mean() for c in cells])) if j <= i else None for j in range(T)] for i in range(T)]


def surgery_activity(init_reports_by_seed: list[list[dict]]) -> dict:
    """How often and how strongly the surgery acted, per stage over seeds: the fraction of seeds with γ ≠ 0,
    the mean |γ| and the mean cos(G_cur, G_prev) (None where no replay gradient existed, e.g. stage 1)."""
    if not init_reports_by_seed:
        return {"stages": [], "acted": 0, "stages_with_replay": 0}
    T = max(len(r) for r in init_reports_by_seed)
    stages, acted_total, replay_total = [], 0, 0
    for t in range(T):
        reps = [r[t] for r in init_reports_by_seed if t < len(r)]
        gammas = [_gamma_magnitude(rep.get("gamma")) for rep in reps]
        cos = [rep.get("cos") for rep in reps if isinstance(rep.get("cos"), (int, float))]
        with_replay = [g for g, rep in zip(gammas, reps) if rep.get("cos") is not None or rep.get("Np")]
        acted = sum(1 for g in gammas if g is not None and g != 0.0)
        acted_total += acted
        replay_total += len(with_replay)
        stages.append(
            {
                "stage": t + 1,
                "seeds": len(reps),
                "acted": acted,
                "mean_abs_gamma": float(np.mean([g for g in gammas if g is not None])) if with_replay else None,
                "mean_cos": float(np.mean(cos)) if cos else None,
                "cos": cos,
            }
        )
    return {"stages": stages, "acted": acted_total, "stages_with_replay": replay_total}


def _gamma_magnitude(g) -> float | None:
    # global scope: one float; per_module: {layer: γ} (the largest |γ| says whether and how strongly it acted)
    if g is None:
        return None
    if isinstance(g, dict):
        vals = [abs(float(v)) for v in g.values() if v is not None]
        return max(vals) if vals else None
    return abs(float(g))
