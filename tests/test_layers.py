"""The package's layers (docs/architecture.md): imports flow one way, and there is no circle.

An AST walk over ``onwards_trio/``: every import of a package module, except those under
``if TYPE_CHECKING:`` (types only, never executed), must point at the same layer or a lower one,
and the module-level import graph must be acyclic. A new sub-package must be placed in ``LAYERS``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onwards_trio"

# Lowest first. A module may import from its own layer and any layer before it.
LAYERS: tuple[str, ...] = (
    "_errors",
    "_config",
    "_transport",
    "_ops",
    "_proxy",
    "_loop",
    "_stores",
    "_responses",
    "_anthropic",
    "_app",
    "testing",
    "__init__",
    "__main__",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    """The layer of ``onwards_trio.<layer>[.…]``; the package itself is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported package module, line, at module level) for every executed import."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, top)
                continue
            if isinstance(node, ast.Import):
                found.extend((a.name, node.lineno, top) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = resolve(node)
                found.append((target, node.lineno, top))
                # ``from pkg import module`` imports the module too.
                found.extend((f"{target}.{a.name}", node.lineno, top) for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list) and children and isinstance(children[0], ast.AST):
                    nested_top = top and not isinstance(
                        node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                    )
                    visit(
                        [c for c in children if isinstance(c, ast.stmt)]
                        + [s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body],
                        nested_top,
                    )

    visit(tree.body, True)
    return [(name, line, top) for name, line, top in found if name.startswith("onwards_trio")]


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (``from pkg import Name`` names no module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_belongs_to_a_layer() -> None:
    unknown = sorted({_layer(m) for m in _modules()} - set(LAYERS))
    assert not unknown, f"place these in LAYERS (tests/test_layers.py) and docs: {unknown}"


def test_imports_never_reach_a_higher_layer() -> None:
    modules = _modules()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    wrong = []
    for module, path in modules.items():
        for name, line, _ in _imports(path, module):
            target = _existing(name, modules)
            if target is None or target == "onwards_trio":
                continue
            if rank[_layer(target)] > rank[_layer(module)]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "lower layer imports a higher one:\n" + "\n".join(sorted(set(wrong)))


def test_no_import_circle_at_module_level() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _, top in _imports(path, module):
            target = _existing(name, modules)
            if top and target is not None and target != module:
                graph[module].add(target)
    # A package's __init__ importing its own submodules is not a circle with them.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_top_level_stays_small_and_every_subpackage_says_what_it_holds() -> None:
    top = [p for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    # 13: the eleven of the layout, the _anthropic ingress and the public testing package.
    assert len(top) <= 13, sorted(p.name for p in top)
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init} needs a docstring naming its responsibility"


def test_importing_the_package_loads_each_module_once() -> None:
    code = (
        "import sys, onwards_trio, onwards_trio._app.cli\n"
        "files = [m.__file__ for n, m in list(sys.modules.items())"
        " if n.startswith('onwards_trio') and getattr(m, '__file__', None)]\n"
        "assert len(files) == len(set(files)), files\n"
        "print(len(files))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 10
