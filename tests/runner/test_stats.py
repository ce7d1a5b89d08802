"""The study's statistics (runner.stats) against hand-computed cases: point estimates, percentile intervals of
small discrete bootstrap distributions, pairing, and the checks on the run outputs they read."""

import numpy as np
import pytest

from slice_kernels.runner.stats import (
    CellScores,
    StudyDataError,
    cell_scores,
    mean_R,
    paired_difference,
    percentile_interval,
    summarize,
    surgery_activity,
)


def one_task_cell(seed, scores, gp=None):
    """T = 1: AP = FP = the task's mean score, Forgetting = BWT = 0."""
    s = np.asarray(scores, dtype=float)
    return CellScores(seed=seed, R=[[s]], GP={} if gp is None else {"h": np.asarray(gp, float)}, IP={})


def two_task_cell(seed, r00, r10, r11):
    a = lambda x: np.asarray(x, dtype=float)  # noqa: E731
    return CellScores(seed=seed, R=[[a(r00), None], [a(r10), a(r11)]], GP={}, IP={})


def test_percentile_interval_is_the_inverted_cdf():
    # CDF: 0 → 0.25, 0.5 → 0.75, 1 → 1: q = 0.025 gives 0, q = 0.975 gives 1
    assert percentile_interval([0.0, 0.5, 0.5, 1.0]) == (0.0, 1.0)
    assert percentile_interval(list(range(1, 101)), level=0.9) == (5.0, 95.0)


def test_point_estimates_are_means_over_seeds_of_the_metrics():
    # seed 0: R = [[1], [0.5, 1]] (stage 1: task 1 all right; stage 2: task 1 half, task 2 all)
    # seed 1: R = [[0.5], [0.5, 0]]
    cells = [two_task_cell(0, [1, 1], [1, 0], [1, 1]), two_task_cell(1, [1, 0], [0, 1], [0, 0])]
    s = summarize(cells, n_boot=200)
    # seed 0: AP = (1 + 1)/2 = 1, FP = (0.5 + 1)/2 = 0.75, Forgetting 0.25, BWT = 0.5 − 1 = −0.5
    # seed 1: AP = (0.5 + 0)/2 = 0.25, FP = (0.5 + 0)/2 = 0.25, Forgetting 0, BWT = 0.5 − 0.5 = 0
    assert s["AP"]["mean"] == pytest.approx(0.625)
    assert s["FP"]["mean"] == pytest.approx(0.5)
    assert s["Forgetting"]["mean"] == pytest.approx(0.125)
    assert s["BWT"]["mean"] == pytest.approx(-0.25)
    assert s["AP"]["per_seed"] == pytest.approx([1.0, 0.25])
    assert s["GP"] is None and s["IP"] is None  # no held-out tasks
    assert mean_R(cells) == [[pytest.approx(0.75), None], [pytest.approx(0.5), pytest.approx(0.5)]]


def test_seed_only_spread_three_seeds():
    """One example per task, so only the seeds vary. Seeds scoring 0, 0, 1: the mean of a resample of 3 is 0
    (p = 8/27), 1/3 (12/27), 2/3 (6/27) or 1 (1/27). CDF(0) = 0.296 ≥ 0.025 → lower 0; CDF(2/3) = 0.963 < 0.975
    → upper 1."""
    cells = [one_task_cell(0, [0]), one_task_cell(1, [0]), one_task_cell(2, [1])]
    s = summarize(cells, n_boot=4000)
    assert s["AP"]["mean"] == pytest.approx(1 / 3)
    assert (s["AP"]["lo"], s["AP"]["hi"]) == (0.0, 1.0)
    assert s["Forgetting"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "per_seed": [0.0, 0.0, 0.0]}


def test_example_resampling_inside_one_seed():
    """Three identical seeds with 2 questions scored (1, 0): a replicate's mean over three seeds is the mean of 6
    independent draws of a fair coin (k/6, k ~ Binomial(6, 1/2)). CDF(0) = 1/64 = 0.0156 < 0.025 ≤ CDF(1/6) =
    7/64: lower 1/6; CDF(4/6) = 57/64 = 0.89 < 0.975 ≤ CDF(5/6) = 63/64: upper 5/6."""
    cells = [one_task_cell(s, [1, 0]) for s in range(3)]
    s = summarize(cells, n_boot=6000)
    assert s["AP"]["mean"] == pytest.approx(0.5)
    assert s["AP"]["lo"] == pytest.approx(1 / 6) and s["AP"]["hi"] == pytest.approx(5 / 6)


def test_examples_are_drawn_once_per_task_across_stages():
    """Task 1 scored (1, 0) at stage 1 and again (1, 0) at stage 2, the same questions: with one index set per
    task, R[0][0] = R[1][0] in every replicate, so BWT of task 1 is exactly 0 and its interval collapses."""
    cells = [two_task_cell(s, [1, 0], [1, 0], [1, 1]) for s in range(3)]
    s = summarize(cells, n_boot=500)
    assert s["BWT"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "per_seed": [0.0, 0.0, 0.0]}
    assert s["AP"]["lo"] < s["AP"]["hi"]  # the examples do vary


def test_held_out_scores_are_resampled_too():
    cells = [one_task_cell(s, [1], gp=[1, 0]) for s in range(3)]
    s = summarize(cells, n_boot=6000)
    assert s["GP"]["mean"] == pytest.approx(0.5)
    assert s["GP"]["lo"] == pytest.approx(1 / 6) and s["GP"]["hi"] == pytest.approx(5 / 6)


def test_paired_difference_cancels_what_the_methods_share():
    """Method a answers exactly the questions b answers, plus nothing: per seed a − b = 0 on every resample,
    although each method's own interval is wide (the questions differ in difficulty)."""
    a = [one_task_cell(s, [1, 0, 1, 0]) for s in range(3)]
    b = [one_task_cell(s, [1, 0, 1, 0]) for s in range(3)]
    d = paired_difference(a, b, n_boot=500)
    assert d["AP"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "per_seed": [0.0, 0.0, 0.0]}
    assert summarize(a, n_boot=500)["AP"]["hi"] > summarize(a, n_boot=500)["AP"]["lo"]


def test_paired_difference_seed_spread():
    """a − b per seed: 0, 0, 1 (one question each): the same discrete distribution as the three-seed case."""
    a = [one_task_cell(0, [1]), one_task_cell(1, [1]), one_task_cell(2, [1])]
    b = [one_task_cell(0, [1]), one_task_cell(1, [1]), one_task_cell(2, [0])]
    d = paired_difference(a, b, n_boot=4000)
    assert d["seeds"] == [0, 1, 2]
    assert d["AP"]["mean"] == pytest.approx(1 / 3)
    assert (d["AP"]["lo"], d["AP"]["hi"]) == (0.0, 1.0)


def test_paired_difference_refusals():
    a = [one_task_cell(0, [1, 0])]
    with pytest.raises(StudyDataError, match="share no seed"):
        paired_difference(a, [one_task_cell(5, [1, 0])], n_boot=100)
    with pytest.raises(StudyDataError, match="different evaluation sets"):
        paired_difference(a, [one_task_cell(0, [1, 0, 1])], n_boot=100)
    with pytest.raises(StudyDataError, match="no finished cells"):
        summarize([], n_boot=100)


def _result(R, gp_scores=None):
    out = {"R": R, "GP": None, "IP": None}
    if gp_scores is not None:
        out.update(GP=sum(gp_scores) / len(gp_scores), IP=0.0, GP_scores={"h": gp_scores}, IP_scores={"h": [0.0]})
    return out


def test_cell_scores_reads_and_checks_run_outputs():
    preds = [{"t1": [{"score": 1.0}, {"score": 0.0}]}, {"t1": [{"score": 0.0}, {"score": 0.0}], "t2": [{"score": 1}]}]
    cs = cell_scores(_result([[0.5, None], [0.0, 1.0]], [1.0, 0.0]), preds, ["t1", "t2"], seed=3)
    assert cs.seed == 3 and cs.tasks == 2 and list(cs.GP["h"]) == [1.0, 0.0]
    with pytest.raises(StudyDataError, match="do not belong to these results"):
        cell_scores(_result([[0.25, None], [0.0, 1.0]]), preds, ["t1", "t2"], seed=3)
    with pytest.raises(StudyDataError, match="no predictions for task 't2'"):
        cell_scores(_result([[0.5, None], [0.0, 1.0]]), [preds[0], {"t1": preds[1]["t1"]}], ["t1", "t2"], seed=3)
    with pytest.raises(StudyDataError, match="1 stage"):
        cell_scores(_result([[0.5, None], [0.0, 1.0]]), preds[:1], ["t1", "t2"], seed=3)
    old = {"R": [[0.5]], "GP": 0.5, "IP": 0.5}  # written before per-example held-out scores existed
    with pytest.raises(StudyDataError, match="GP_scores"):
        cell_scores(old, preds[:1], ["t1"], seed=0)


def test_surgery_activity_counts_stages_where_gamma_is_nonzero():
    seed_a = [{"gamma": 0.0, "cos": None, "Np": 0.0}, {"gamma": -0.5, "cos": -0.2, "Np": 3.0}]
    seed_b = [{"gamma": 0.0, "cos": None, "Np": 0.0}, {"gamma": 0.0, "cos": 0.3, "Np": 2.0}]
    act = surgery_activity([seed_a, seed_b])
    assert act["acted"] == 1 and act["stages_with_replay"] == 2
    s1, s2 = act["stages"]
    assert s1["acted"] == 0 and s1["mean_cos"] is None and s1["mean_abs_gamma"] is None
    assert s2["acted"] == 1 and s2["mean_cos"] == pytest.approx(0.05) and s2["mean_abs_gamma"] == pytest.approx(0.25)
    per_module = [{"gamma": {"q": 0.0, "v": -0.3}, "cos": 0.1, "Np": 1.0}]
    assert surgery_activity([per_module])["acted"] == 1
