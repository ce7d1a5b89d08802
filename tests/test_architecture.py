"""The layering of docs/architecture.md, read from the source: the import graph of slice_kernels has no circle,
the library never imports the runner, an op knows no method, PEFT or runner, and no module imports another
module's private names (an op's own ``_<op>_triton`` sibling excepted)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "slice_kernels"
ENTRY_POINTS = {"slice_kernels.__main__"}  # the application's entry point (python -m slice_kernels)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str):
    """(imported module, private names taken from it, line) for every import statement of module ``name``, at
    any depth (function-level imports count: a lazy import is still an arrow)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    base = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("slice_kernels"):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("slice_kernels"):
                continue
            plain = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in MODULES:  # "from pkg import submodule"
                    yield sub, [], node.lineno
                elif a.name != "_C":  # the compiled extension: no Python source, no arrow
                    plain.append(a.name)
            if plain:
                private = [n for n in plain if n.startswith("_") and not n.startswith("__")]
                yield mod, private, node.lineno


def _graph() -> dict[str, set[str]]:
    g = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in _imports(m):
            if target in MODULES and target != m:
                g[m].add(target)
    return g


def test_the_import_graph_is_read():
    g = _graph()
    assert len(MODULES) > 30
    assert "slice_kernels.ops.conflict" in g["slice_kernels.slice_init.surgery"]
    assert "slice_kernels.dispatch" in g["slice_kernels.ops.conflict"]


def test_no_import_circles():
    g = _graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def _inside(m: str, prefix: str) -> bool:
    return m == prefix or m.startswith(prefix + ".")


def _arrows(sources, dst_prefix):
    found = []
    for m in sources:
        for target, _, line in _imports(m):
            if _inside(target, dst_prefix):
                found.append(f"{m}:{line} -> {target}")
    return found


def test_the_library_never_imports_the_runner():
    library = [m for m in MODULES if not _inside(m, "slice_kernels.runner") and m not in ENTRY_POINTS]
    assert _arrows(library, "slice_kernels.runner") == []


@pytest.mark.parametrize(
    "layer",
    [
        "slice_kernels.slice_init",
        "slice_kernels.ps_lora",
        "slice_kernels.gorp",
        "slice_kernels.modules",
        "slice_kernels.runner",
    ],
)
def test_ops_know_no_method_peft_or_runner(layer):
    assert _arrows([m for m in MODULES if _inside(m, "slice_kernels.ops")], layer) == []


def test_ops_import_no_peft_or_transformers():
    bad = []
    for m, path in MODULES.items():
        if m.startswith("slice_kernels.ops"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                )
                bad += [f"{m}: {n}" for n in names if n.split(".")[0] in ("peft", "transformers")]
    assert bad == []


def test_the_methods_do_not_import_each_other():
    for a, b in [
        ("slice_kernels.slice_init", "slice_kernels.ps_lora"),
        ("slice_kernels.slice_init", "slice_kernels.gorp"),
        ("slice_kernels.ps_lora", "slice_kernels.slice_init"),
        ("slice_kernels.ps_lora", "slice_kernels.gorp"),
        ("slice_kernels.gorp", "slice_kernels.slice_init"),
        ("slice_kernels.gorp", "slice_kernels.ps_lora"),
    ]:
        assert _arrows([m for m in MODULES if _inside(m, a)], b) == [], (a, b)


def _allowed_private(importer: str, target: str) -> bool:
    tgt_leaf = target.rpartition(".")[2]
    if importer.startswith("slice_kernels.ops.") and tgt_leaf.startswith("_") and tgt_leaf.endswith("_triton"):
        return True  # an op module and its Triton sibling
    return _is_package(importer) and target.rpartition(".")[0] == importer  # a package's own private module


def test_no_private_names_cross_modules():
    bad = []
    for m in MODULES:
        for target, private, line in _imports(m):
            if private:
                bad.append(f"{m}:{line} imports {private} from {target}")
            leaf = target.rpartition(".")[2]
            if (
                target in MODULES
                and leaf.startswith("_")
                and not leaf.startswith("__")
                and not _allowed_private(m, target)
            ):
                bad.append(f"{m}:{line} imports the private module {target}")
    assert bad == []
