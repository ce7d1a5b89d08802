"""The import paths of 0.1 that moved in the layout redesign still work for this release, each with a
DeprecationWarning naming the new path, and give the very module that now holds the code."""

import importlib
import sys
import warnings

import pytest

import slice_kernels
from slice_kernels import _compat


@pytest.mark.parametrize("old,new", sorted(_compat.MOVED.items()))
def test_an_old_path_warns_and_is_the_new_module(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # the warning comes with the first import only
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)
    assert mod.__spec__.name == new  # the real module keeps its own spec


@pytest.mark.parametrize(
    "stmt,name",
    [
        ("from slice_kernels.init import init_from_gradients, dst_basis, absorb_", "init_from_gradients"),
        ("from slice_kernels.collect import collect_gradients, resolve_targets, is_conv1d", "collect_gradients"),
        ("from slice_kernels.config import SliceConfig, SliceConfigError", "SliceConfig"),
        ("from slice_kernels.history import History, HistoryStore, lora_layers, pack_sign_bits", "History"),
        (
            "from slice_kernels.stability import ParameterStabilityLoss, merge_magnitude_into_base",
            "ParameterStabilityLoss",
        ),
        ("from slice_kernels.peft_integration import get_slice_model, save_as_lora", "get_slice_model"),
        ("from slice_kernels.gorp_groups import gorp_param_groups, build_gorp_optimizer", "gorp_param_groups"),
        ("from slice_kernels.gorp import GorpAdamW, GorpGroupError, grow_space, energy_count", "GorpAdamW"),
    ],
)
def test_names_users_imported_from_the_old_paths_still_import(stmt, name, monkeypatch):
    old = stmt.split()[1]
    monkeypatch.delitem(sys.modules, old, raising=False)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(stmt, ns)
    assert ns[name] is getattr(slice_kernels, name)


def test_the_warning_points_at_the_importing_code(monkeypatch):
    monkeypatch.delitem(sys.modules, "slice_kernels.history", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import slice_kernels.history  # noqa: F401
    assert [w.filename for w in caught if issubclass(w.category, DeprecationWarning)] == [__file__]


def test_an_old_module_as_an_attribute_of_the_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "slice_kernels.stability", raising=False)
    monkeypatch.delattr(slice_kernels, "stability", raising=False)  # set by an earlier import of the old path
    with pytest.warns(DeprecationWarning):
        assert slice_kernels.stability.ParameterStabilityLoss is slice_kernels.ParameterStabilityLoss


def test_a_name_that_never_existed_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        slice_kernels.nonexistent  # noqa: B018


@pytest.mark.parametrize(
    "module,name",
    [(m, n) for m, table in sorted(_compat.NAMES.items()) for n in sorted(table)],
)
def test_a_name_that_left_its_module_is_forwarded_with_a_warning(module, name):
    target, attr = _compat.NAMES[module][name]
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} moved to {target}\.{attr}"):
        got = getattr(importlib.import_module(module), name)
    assert got is getattr(importlib.import_module(target), attr)


def test_names_a_module_defines_itself_are_not_forwarded():
    from slice_kernels.ops import sign_loss

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert sign_loss.MODES["tanh"] == 0
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        sign_loss.nonexistent  # noqa: B018


def test_registration_by_name_still_works_with_a_warning():
    import torch

    from slice_kernels import dispatch

    with pytest.warns(DeprecationWarning, match="dispatch.register"):

        @dispatch.register("test_deprecated_by_name_op", "torch")
        def _double(x):
            return 2 * x

    with pytest.warns(DeprecationWarning, match="dispatch.call"):
        assert dispatch.call("test_deprecated_by_name_op", "cpu", torch.ones(2)).tolist() == [2.0, 2.0]


def test_python_m_on_an_old_path_runs_the_new_module():
    import subprocess

    cmd = [sys.executable, "-W", "always::DeprecationWarning", "-m", "slice_kernels.cli", "methods"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "slice" in out.stdout.split() and "gorp" in out.stdout.split()
    assert "slice_kernels.cli moved to slice_kernels.runner.cli" in out.stderr


def test_an_op_module_and_a_method_module_can_be_reloaded():
    from slice_kernels.ops import conflict
    from slice_kernels.runner.methods import gorp

    handle = conflict.CONFLICT_STATS
    importlib.reload(conflict)
    assert conflict.CONFLICT_STATS is handle and "torch" in handle.implementations()
    importlib.reload(gorp)


def test_another_module_cannot_redefine_an_op():
    from slice_kernels import dispatch

    with pytest.raises(ValueError, match="'conflict_stats' is already defined by slice_kernels.ops.conflict"):
        dispatch.define("conflict_stats")
