"""End to end on a tiny Llama built from a config: R's shape, the metric identities, the real scorers,
plots, and a run killed after stage 1 then resumed giving the same results.json."""

import hashlib
import json
import os

import pytest

from slice_kernels.runner import make_config, run
from slice_kernels.runner.checkpoint import ResumeError
from slice_kernels.runner.methods import InitMethod, Option, number, register
from tests.helpers.runner_tiny import save_tiny_llama

pytestmark = pytest.mark.slow


class Probe(InitMethod):
    """A registered method using every hook: LoRA init, an extra loss, an end-of-task hook keeping state
    across stages (and across a resume), a custom optimizer. Its init report shows what the state held."""

    init = "lora"
    options = {"probe_weight": Option(0.0, number(minimum=0), "probe: a declared option with a default")}

    def init_adapter(self, ctx):
        peft_model, rep = super().init_adapter(ctx)
        rep["seen_stages"] = list(ctx.state.get("stages", []))
        rep["probe_weight_option"] = self.option(ctx, "probe_weight")  # run-config method options reach the method
        return peft_model, rep

    def extra_loss(self, ctx, peft_model, batch):
        return 1e-3 * sum(p.square().sum() for n, p in peft_model.named_parameters() if "lora_B" in n)

    def make_optimizer(self, ctx, peft_model, params, lr):
        import torch

        return torch.optim.SGD(params, lr=lr)

    def end_of_task(self, ctx, peft_model):
        ctx.state.setdefault("stages", []).append(ctx.stage)


register("probe", Probe, overwrite=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


def _cfg(model, **kw):
    base = dict(
        model=model,
        tasks=["basic_arithmetic", "chain_sum"],
        heldout=["letter_counting"],
        methods=["slice", "probe"],
        rank=2,
        steps=3,
        n_train=24,
        n_eval=4,
        n_heldout=3,
        ip_shots=1,
        max_new_tokens=4,
        grad_batches=2,
        replay_batches=1,
        grad_batch_size=4,
        batch_size=4,
        max_len=48,
        lr=5e-3,
        targets=["q_proj", "v_proj", "down_proj"],
        seed=3,
        conflict_threshold=1.0,  # surgery whenever cos < 1, so the SLICE path with γ ≠ 0 runs here
        method_options={"probe_weight": 0.25},
    )
    base.update(kw)
    return make_config("default", **base)


def _tree_hashes(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def full_run(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    res = run(_cfg(tiny_dir), out, progress=False, log=lambda *a: None)
    return out, res


@pytest.mark.reasoning_gym
def test_results_shape_metrics_and_outputs(full_run):
    out, _ = full_run
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res["methods"]) == {"probe", "slice"}
    assert [r["seen_stages"] for r in res["methods"]["probe"]["init_reports"]] == [[], [1]]
    assert [r["probe_weight_option"] for r in res["methods"]["probe"]["init_reports"]] == [0.25, 0.25]
    for m, r in res["methods"].items():
        for key in ("R", "AP", "FP", "Forgetting", "BWT", "GP", "IP", "init_reports"):
            assert key in r, (m, key)
        R = r["R"]
        assert len(R) == 2 and all(len(row) == 2 for row in R)
        assert R[0][1] is None and all(isinstance(R[i][j], float) for i in range(2) for j in range(i + 1))
        assert r["AP"] == pytest.approx((R[0][0] + R[1][1]) / 2)
        assert r["FP"] == pytest.approx((R[1][0] + R[1][1]) / 2)
        assert r["AP"] - r["FP"] == pytest.approx(r["Forgetting"])
        assert r["BWT"] == pytest.approx(R[1][0] - R[0][0])
        assert [rep["stage"] for rep in r["init_reports"]] == [1, 2]
        assert all("gamma" in rep and "cos" in rep for rep in r["init_reports"])
    # SLICE at stage 2 has a replay gradient: its cosine is a real number in [-1, 1]
    rep2 = res["methods"]["slice"]["init_reports"][1]
    assert rep2["cos"] is not None and -1.0 <= rep2["cos"] < 1.0
    # SPEC §1 step 4 with c = 1: γ = −D / N_p
    assert rep2["gamma"] == pytest.approx(-rep2["D"] / rep2["Np"], rel=1e-9) and rep2["gamma"] != 0.0
    assert res["methods"]["slice"]["init_reports"][0]["gamma"] == 0.0  # stage 1: no replay, no surgery
    assert res["base"]["GP"] is not None and res["base"]["IP"] is not None
    assert res["train_on"] == "answer"
    for png in ("R_heatmaps.png", "metrics_bars.png", "task_curves.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    assert "| slice |" in open(os.path.join(out, "summary.md")).read()


@pytest.mark.reasoning_gym
def test_scores_come_from_the_reasoning_gym_scorers(full_run):
    """Every R entry is the mean of reasoning-gym's own score_answer over the saved predictions."""
    import reasoning_gym as rg

    from slice_kernels.runner.tasks import task_seed

    out, _ = full_run
    res = json.load(open(os.path.join(out, "results.json")))
    preds = json.load(open(os.path.join(out, "predictions.json")))
    n_train, n_eval = res["config"]["n_train"], res["config"]["n_eval"]
    for m, stages in preds.items():
        for i, per_task in enumerate(stages):
            for j, name in enumerate(res["tasks"][: i + 1]):
                ds = rg.create_dataset(name, size=100_000, seed=task_seed(res["config"]["seed"], name))
                seen = {ds[k]["question"] for k in range(n_train)}
                entries = []  # the first n_eval later items with a question unseen in training (or earlier)
                for k in range(n_train, 100_000):
                    if len(entries) == n_eval:
                        break
                    if ds[k]["question"] not in seen:
                        seen.add(ds[k]["question"])
                        entries.append(ds[k])
                rows = per_task[name]
                assert [r["answer"] for r in rows] == [str(e["answer"]) for e in entries]
                scores = [ds.score_answer(r["prediction"], e) for r, e in zip(rows, entries)]
                assert res["methods"][m]["R"][i][j] == pytest.approx(sum(scores) / len(scores))


# 1: killed inside the first method; 3: after "slice" finished and "probe" stage 1, so the resume restores a
# finished method's results, the second method's merged weights and its ctx.state (probe's seen_stages)
@pytest.mark.reasoning_gym
@pytest.mark.parametrize("stop", [1, 3])
def test_killed_after_stage_1_then_resumed_equals_uninterrupted(full_run, tiny_dir, tmp_path, stop):
    out_full, _ = full_run
    out = str(tmp_path / "resumed")
    stopped = run(_cfg(tiny_dir), out, progress=False, log=lambda *a: None, stop_after=stop)
    assert stopped == {"stopped_after": stop}
    assert not os.path.exists(os.path.join(out, "results.json"))
    latest = json.load(open(os.path.join(out, "checkpoints", "latest.json")))
    assert (latest["method"], latest["stage"]) == (("slice", 1) if stop == 1 else ("probe", 1))
    # the newest checkpoint and the one before it are kept, and no temporary file is left behind
    kept = ["ckpt_%04d.safetensors" % i for i in range(max(1, stop - 1), stop + 1)]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == kept + ["latest.json", "run.json"]
    # a fresh run into the same directory is refused and changes nothing
    before = _tree_hashes(out)
    with pytest.raises(ResumeError, match="already holds a run"):
        run(_cfg(tiny_dir), out, progress=False, log=lambda *a: None)
    # a resume with a different configuration is refused and changes nothing
    with pytest.raises(ResumeError, match="different configuration.*rank"):
        run(_cfg(tiny_dir, rank=3), out, resume=True, progress=False, log=lambda *a: None)
    assert _tree_hashes(out) == before
    run(_cfg(tiny_dir), out, resume=True, progress=False, log=lambda *a: None)
    a = json.load(open(os.path.join(out_full, "results.json")))
    b = json.load(open(os.path.join(out, "results.json")))
    assert a == b
    assert json.load(open(os.path.join(out_full, "predictions.json"))) == json.load(
        open(os.path.join(out, "predictions.json"))
    )
