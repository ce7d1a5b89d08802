"""The runner's PS-LoRA methods on a tiny Llama: ``ps_lora`` (LoRA init + stability loss + magnitude merge)
and ``slice+ps`` (SLICE init + stability loss) over two tasks, the history carried in the method state."""

import pytest

from slice_kernels.runner import make_config, run
from slice_kernels.runner.checkpoint import RunDirectory
from tests.helpers.runner_tiny import save_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama_ps")))


def _cfg(model, methods):
    return make_config(
        "default",
        model=model,
        tasks=["basic_arithmetic", "chain_sum"],
        heldout=[],
        methods=methods,
        rank=2,
        steps=3,
        n_train=16,
        n_eval=2,
        n_heldout=0,
        ip_shots=1,
        max_new_tokens=2,
        grad_batches=1,
        replay_batches=1,
        grad_batch_size=4,
        batch_size=4,
        max_len=40,
        lr=5e-3,
        targets=["q_proj", "v_proj"],
        seed=5,
    )


@pytest.mark.reasoning_gym
def test_two_stage_run_with_both_methods(tiny_dir, tmp_path):
    res = run(_cfg(tiny_dir, ["ps_lora", "slice+ps"]), str(tmp_path / "run"), progress=False, log=lambda *a: None)
    for name in ("ps_lora", "slice+ps"):
        m = res["methods"][name]
        assert len(m["R"]) == 2 and all(x is not None for x in m["R"][1]), name
        reps = m["init_reports"]
        # stage 1 has no history (loss 0); stage 2 sees all 4 adapted layers (2 blocks × q_proj, v_proj)
        assert reps[0]["ps_history_layers"] == 0 and reps[1]["ps_history_layers"] == 4, reps


@pytest.mark.reasoning_gym
def test_history_travels_in_the_method_state(tiny_dir, tmp_path):
    out = str(tmp_path / "part")
    assert run(_cfg(tiny_dir, ["slice+ps"]), out, progress=False, log=lambda *a: None, stop_after=1) == {
        "stopped_after": 1
    }
    state = RunDirectory(out).newest()["current"]["state"]
    ups = state["updates"]
    assert len(ups) == 4 and all(len(v) == 1 for v in ups.values())
    # SLICE absorbed s·B₀·A₀ into W, so the recorded update is [B, −B₀]·[A; A₀]: rank 2r = 4
    assert all(v[0]["B"].shape[1] == 4 and v[0]["A"].shape[0] == 4 for v in ups.values())


def test_runner_methods_are_registered():
    from slice_kernels.runner import methods

    names = methods.available()
    assert "ps_lora" in names and "slice+ps" in names
    assert methods.get("ps_lora").magnitude and not methods.get("slice+ps").magnitude
