"""ARCHITECTURE.md stays true: the module table, the dependency rule and the unit size it states.

These read the source with ``ast`` (nothing is imported), so they hold for every module,
including those that need a GPU or optional packages.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "porder"
ARCH = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    """'porder.x.y' -> path, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, *, top_level_only: bool):
    """(imported module, names, node) for each import in ``module``.

    ``top_level_only``: only the imports that run when the module is imported
    (module body, including ``try``/``if`` blocks there), not those inside functions.
    """
    tree = _tree(path)
    is_package = path.name == "__init__.py"
    nodes = []
    if top_level_only:
        stack = list(tree.body)
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                nodes.append(n)
            elif isinstance(n, (ast.If, ast.Try)):
                stack.extend(n.body + n.orelse + getattr(n, "finalbody", [])
                             + [h for hd in getattr(n, "handlers", []) for h in hd.body])
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for n in nodes:
        if isinstance(n, ast.Import):
            for a in n.names:
                yield a.name, [], n
        else:
            yield _absolute(module, n, is_package), [a.name for a in n.names], n


def test_every_module_is_in_the_module_table():
    missing = []
    for module, path in MODULES.items():
        rel = path.relative_to(PKG).as_posix()
        if path.name == "__init__.py" and module.count(".") >= 1:
            continue  # subpackage __init__s share one row
        if f"`{rel}`" not in ARCH:
            missing.append(rel)
    assert not missing, f"ARCHITECTURE.md's module table lacks {missing}"


def test_the_module_table_names_no_module_that_is_gone():
    named = set(re.findall(r"^\| `([a-z_/]+\.py)`", ARCH, flags=re.M))
    gone = sorted(n for n in named if not (PKG / n).exists())
    assert not gone, f"ARCHITECTURE.md names modules that do not exist: {gone}"


def test_no_function_is_longer_than_the_stated_limit():
    assert f"{MAX_FUNCTION_LINES} lines" in ARCH
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _porder_graph() -> dict[str, set[str]]:
    """Imports between porder's modules, those inside functions included."""
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for target, names, _ in _imports(module, path, top_level_only=False):
            if not target.startswith("porder"):
                continue
            for name in names or [""]:
                sub = f"{target}.{name}" if name else target
                deps.add(sub if sub in MODULES else target)
        deps.discard(module)
        graph[module] = {d for d in deps if d in MODULES}
    return graph


def test_no_import_cycle():
    graph = _porder_graph()
    # A package's __init__ importing its own submodules is how it exports them, so those
    # edges are left out; any other way back to a module is a cycle.
    def edges(m):
        return {d for d in graph[m] if not d.startswith(m + ".")}

    state: dict[str, int] = {}
    cycles = []

    def visit(m, trail):
        state[m] = 1
        for d in sorted(edges(m)):
            if state.get(d) == 1:
                cycles.append(trail[trail.index(d):] + [d] if d in trail else [m, d])
            elif d not in state:
                visit(d, trail + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_nothing_imports_the_package_root_from_inside():
    bad = []
    for module, path in MODULES.items():
        if module == "porder" or module == "porder.__main__":
            continue
        for target, names, node in _imports(module, path, top_level_only=False):
            if target == "porder" and not all(f"porder.{n}" in MODULES for n in names):
                bad.append(f"{module}:{node.lineno} imports {names or 'porder'} from the package root")
    assert not bad, bad


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for module, path in MODULES.items():
        for target, names, node in _imports(module, path, top_level_only=False):
            if not target.startswith("porder") or target == module:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in MODULES:
                    bad.append(f"{module}:{node.lineno} imports {target}.{n}")
    assert not bad, f"{len(bad)} imports of another module's private names: {bad}"


# Third-party packages and the only modules (or packages, with everything in them)
# that may import them: ARCHITECTURE.md, "Dependency rule".
ALLOWED = {
    "h5py": ("porder.store", "porder.reader", "porder.validate", "porder.scale"),
    "click": ("porder.cli",),
    "torch": ("porder.train", "porder.nn", "porder.data", "porder.patches",
              "porder.sources.gpu_decode"),
    "torchvision": ("porder.sources.gpu_decode",),
    "cupy": ("porder.backend", "porder.kernels", "porder.sources.gpu_decode", "porder.patches"),
    "distributed": ("porder.scale.dask",),
    "dask": ("porder.scale.dask",),
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_third_party_packages_stay_in_their_modules(package):
    allowed = ALLOWED[package]
    bad = []
    for module, path in MODULES.items():
        if any(module == a or module.startswith(a + ".") for a in allowed):
            continue
        for target, _, node in _imports(module, path, top_level_only=False):
            if target == package or target.startswith(package + "."):
                bad.append(f"{module}:{node.lineno}")
    assert not bad, f"{package} imported outside {allowed}: {bad}"
