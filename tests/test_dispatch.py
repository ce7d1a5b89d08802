import pytest
import torch

from slice_kernels import dispatch


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(dispatch.BackendUnavailableError) as e:
        dispatch.select("conflict_stats", "cpu")
    msg = str(e.value)
    for b in dispatch.BACKENDS:
        assert f"- {b}:" in msg
    assert "cuda:" in msg and "conflict_stats" in msg


def test_unknown_forced_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "opencl")
    with pytest.raises(dispatch.BackendUnavailableError, match="unknown backend"):
        dispatch.select("conflict_stats", "cpu")


def test_use_backend_forces_torch():
    with dispatch.use_backend("torch"):
        assert dispatch.select("conflict_stats", "cpu")[0] == "torch"


def test_default_never_picks_triton_on_cpu():
    b, _ = dispatch.select("randomized_svd", torch.device("cpu"))
    assert b in ("cpp", "torch")


def test_unknown_op():
    with pytest.raises(KeyError, match="no op named"):
        dispatch.select("nope", "cpu")
