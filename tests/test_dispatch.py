import warnings

import pytest
import torch

from slice_kernels import dispatch, extension


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


@pytest.mark.skipif(extension.load() is None, reason="native extension not built (python setup.py build_ext --inplace)")
def test_every_declared_native_op_has_its_cpu_kernel():
    """The registry check gpu_all.sh runs for CUDA after its build, here for CPU: every schema of
    csrc/bindings.cpp has a CPU kernel, and an op without one is named."""
    ops = extension.declared_ops()
    assert {"conflict_stats", "surgery_", "sign_loss_fwd", "magnitude_merge_factors", "gorp_update"} <= set(ops)
    extension.require_kernels("cpu")
    if not extension.load().with_cuda:  # a CPU-only build: the check must name what is missing
        with pytest.raises(RuntimeError, match="no cuda kernel for"):
            extension.require_kernels("cuda")


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " 1 "])
def test_skip_ext_accepts_the_usual_true_spellings(monkeypatch, value):
    monkeypatch.setenv(extension.SKIP_ENV, value)
    monkeypatch.setattr(extension, "_state", {"tried": False, "module": None, "error": None})  # restored afterwards
    assert extension.skip_requested()
    assert extension.load() is None and extension.SKIP_ENV in extension.load_error()


@pytest.mark.parametrize("value", ["0", "false", "No", "OFF", ""])
def test_skip_ext_false_spellings_do_not_skip(monkeypatch, value):
    monkeypatch.setenv(extension.SKIP_ENV, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not extension.skip_requested()


def test_skip_ext_unrecognised_value_warns_and_loads(monkeypatch):
    monkeypatch.setenv(extension.SKIP_ENV, "skip")
    with pytest.warns(
        RuntimeWarning,
        match=r"SLICE_KERNELS_SKIP_EXT='skip' is not recognised; use one of "
        r"1/true/yes/on .* 0/false/no/off/empty",
    ):
        assert not extension.skip_requested()
