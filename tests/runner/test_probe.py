"""``slice-kernels probe`` on the tiny Llama: its cosine is the one a run records when the candidate really comes
next (same batches, same W^(t-1)), a killed probe resumes without recomputing a finished seed, and the refusals
write nothing."""

import json
import os

import pytest

from slice_kernels.runner import probe as probe_mod
from slice_kernels.runner import run
from slice_kernels.runner.cli import main
from slice_kernels.runner.errors import ResumeError
from tests.helpers.runner_tiny import addition_tasks, save_tiny_llama, tiny_run_config

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_inputs")
    return save_tiny_llama(str(d / "model")), addition_tasks(str(d), ks=(1, 2, 3))


def quiet(*_):
    pass


def config(inputs, **kw):
    model, (t1, _, _) = inputs
    return tiny_run_config(model, kw.pop("tasks", [t1]), **kw)


def run_probe(cfg, candidates, out, **kw):
    return probe_mod.probe(cfg, candidates, str(out), seeds=kw.pop("seeds", SEEDS), progress=False, log=quiet, **kw)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    _, (_, t2, t3) = inputs
    out = tmp_path_factory.mktemp("probe_ref") / "p"
    return out, run_probe(config(inputs), [t2, t3], out)


def test_probe_cosine_is_the_runs_stage_cosine(inputs, reference, tmp_path):
    """For every seed and candidate, the run of prefix → candidate with slice records the same cos and γ at
    stage 2 as the probe: the probe reproduces the run's W^(1) and the batches it gives its second task."""
    model, (t1, t2, t3) = inputs
    _, res = reference
    for seed in SEEDS:
        per = next(s for s in res["per_seed"] if s["seed"] == seed)
        for cand in (t2, t3):
            name = os.path.splitext(os.path.basename(cand))[0]
            out = tmp_path / f"run_{seed}_{name}"
            r = run(
                tiny_run_config(model, [t1, cand], methods=["slice"], seed=seed), str(out), progress=False, log=quiet
            )
            rep = r["methods"]["slice"]["init_reports"][1]
            assert rep["cos"] == pytest.approx(per["cos"][name], rel=1e-6, abs=1e-9)
            assert rep["gamma"] == pytest.approx(per["gamma"][name], rel=1e-6, abs=1e-9)
            # the prefix scores are the run's R[0][0]
            assert r["methods"]["slice"]["R"][0][0] == pytest.approx(per["prefix_scores"]["t1"])


def test_probe_outputs_and_summary(reference):
    out, res = reference
    assert res["prefix"] == ["t1"] and res["candidates"] == ["t2", "t3"] and res["seeds"] == SEEDS
    for name in ("probe.json", "summary.md", "probe.png", "probe_config.json", "seeds/seed0.json", "seeds/seed1.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "probe.json").read_text()) == json.loads(json.dumps(res))
    means = [r["mean_cos"] for r in res["summary"]]
    assert means == sorted(means)
    for r in res["summary"]:
        vals = [s["cos"][r["candidate"]] for s in res["per_seed"]]
        assert r["cos"] == vals and r["mean_cos"] == pytest.approx(sum(vals) / 2)
        assert r["conflicting_seeds"] == sum(v < 0.0 for v in vals)
    md = (out / "summary.md").read_text()
    assert "| t2 |" in md and "| t3 |" in md and "of 2 |" in md
    n0 = sum(c < 0.0 for c in res["per_seed"][0]["cos"].values())
    assert f"seed 0: {n0} of 2;" in md


def test_summarize_probe_by_hand():
    per_seed = [{"cos": {"a": 0.2, "b": -0.1, "c": -0.3}}, {"cos": {"a": -0.4, "b": -0.2, "c": 0.1}}]
    rows = probe_mod.summarize_probe(per_seed, ["a", "b", "c"], tau=0.0)
    assert [r["candidate"] for r in rows] == ["b", "a", "c"]  # means -0.15, -0.1, -0.1: ties by name
    assert [r["conflicting_seeds"] for r in rows] == [2, 1, 1]
    assert rows[0]["min_cos"] == -0.2 and rows[0]["max_cos"] == -0.1
    rows = probe_mod.summarize_probe(per_seed, ["a", "b", "c"], tau=-0.25)
    assert {r["candidate"]: r["conflicting_seeds"] for r in rows} == {"a": 1, "b": 0, "c": 1}


def test_killed_probe_resumes_without_recomputing(inputs, reference, tmp_path):
    _, (_, t2, t3) = inputs
    _, ref = reference
    out = tmp_path / "p"
    cfg = config(inputs)
    assert run_probe(cfg, [t2, t3], out, stop_after_seeds=1) == {"stopped_after_seeds": 1}
    first = out / "seeds" / "seed0.json"
    stamp = os.stat(first).st_mtime_ns
    assert not (out / "seeds" / "seed1.json").exists() and not (out / "probe.json").exists()
    with pytest.raises(ResumeError, match="not empty"):  # a fresh probe refuses the folder
        run_probe(cfg, [t2, t3], out)
    with pytest.raises(ResumeError, match="other settings"):  # a resume with other options changes nothing
        run_probe(cfg, [t3], out, resume=True)
    res = run_probe(cfg, [t2, t3], out, resume=True)
    assert os.stat(first).st_mtime_ns == stamp
    assert res["summary"] == ref["summary"] and res["per_seed"] == ref["per_seed"]


@pytest.mark.parametrize(
    "candidates, seeds, kw, match",
    [
        ([], SEEDS, {}, "at least one candidate"),
        (["T2", "T2"], SEEDS, {}, "repeats a task"),
        (["T1"], SEEDS, {}, "already in the prefix"),
        (["T2"], [], {}, "at least one seed"),
        (["T2"], [0, 0], {}, "distinct integers"),
        (["T2"], SEEDS, {"prefix_method": "nope"}, "not a registered method"),
        (["T2"], SEEDS, {"cfg": {"method_options": {"projection_scope": "per_module"}}}, "global cosine"),
        (["T2"], SEEDS, {"cfg": {"tasks": []}}, "needs a prefix"),
        (["T2"], SEEDS, {"cfg": {"batch_size": 0}}, "batch"),
    ],
)
def test_probe_refusals_write_nothing(inputs, tmp_path, candidates, seeds, kw, match):
    _, (t1, t2, _) = inputs
    names = {"T1": t1, "T2": t2}
    cfg = config(inputs, **kw.pop("cfg", {}))
    out = tmp_path / "p"
    with pytest.raises(ValueError, match=match):
        run_probe(cfg, [names[c] for c in candidates], out, seeds=seeds, **kw)
    assert not out.exists()


def test_probe_cli(inputs, tmp_path, capsys):
    model, (t1, t2, t3) = inputs
    out = tmp_path / "p"
    args = ["probe", "--model", model, "--tasks", t1, "--candidates", f"{t2},{t3}", "--seeds", "3", "--rank", "2"]
    args += ["--steps", "1", "--n-train", "12", "--n-eval", "3", "--batch-size", "4", "--targets", "q_proj,v_proj"]
    args += ["--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "Stage-conflict probe" in capsys.readouterr().out
    assert json.loads((out / "probe.json").read_text())["seeds"] == [3]
    with pytest.raises(SystemExit, match="takes --seeds"):
        main(args[:-3] + ["--seed", "1", "--out", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()


def test_probe_refuses_a_short_candidate_before_writing(inputs, tmp_path):
    """A candidate with too few examples for a seed's split is refused before the directory is made."""
    from tests.helpers.runner_tiny import write_jsonl

    short = write_jsonl(str(tmp_path / "short.jsonl"), [{"prompt": f"{i}-1=", "answer": str(i - 1)} for i in range(4)])
    out = tmp_path / "p"
    with pytest.raises(ValueError, match="short"):
        run_probe(config(inputs), [short], out)
    assert not out.exists()


def test_gradient_buffer_options_reach_the_config():
    """--grad-batches / --replay-batches / --grad-batch-size (run, study and probe take them) set the buffers."""
    import argparse

    from slice_kernels.runner import cli

    parser = argparse.ArgumentParser()
    cli._add_run_options(parser)
    a = parser.parse_args(
        ["--profile", "study", "--grad-batches", "12", "--replay-batches", "6", "--grad-batch-size", "4"]
    )
    cfg = cli._config_from_args(a)
    assert (cfg.grad_batches, cfg.replay_batches, cfg.grad_batch_size, cfg.n_eval) == (12, 6, 4, 100)
    cfg = cli._config_from_args(parser.parse_args([]))
    assert (cfg.grad_batches, cfg.replay_batches, cfg.grad_batch_size) == (2, 2, 8)
