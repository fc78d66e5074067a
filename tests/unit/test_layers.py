"""The package's shape: no import circle (imports inside functions included), layers that import
downwards only (docs/architecture.md's table; prep and the shard format need no torch), and no
objective asked for by name outside ``medscale.tasks``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "medscale"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: imports for annotations only, never executed."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(name: str) -> list[str]:
    """The medscale modules an import of `name` executes: the module and every package above it."""
    out = []
    while name.startswith("medscale"):
        if name in MODULES:
            out.append(name)
        name = name.rpartition(".")[0]
    return out


def import_graph() -> dict[str, set[str]]:
    """Every medscale module's imports of medscale modules, at any depth of the code (functions too)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges.update(_resolve(alias.name))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges.update(_resolve(node.module))
                for alias in node.names:  # `from medscale.eval import gather` imports a submodule
                    edges.update(m for m in _resolve(f"{node.module}.{alias.name}") if m == f"{node.module}.{alias.name}")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {e for e in edges if e != name and not package.startswith(e + ".") and e != package}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40 and "medscale.tasks.registry" in graph["medscale.config"]  # the graph is really read
    assert cycles(graph) == []


def test_a_planted_circle_is_found():
    """The checker itself: a circle through an import inside a function is one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from medscale.dist import barrier\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))


# docs/architecture.md's layers, bottom up: a module imports only from its own layer or those below.
LAYERS = [
    ["medscale.errors", "medscale.files", "medscale.signals", "medscale.leash", "medscale.logs", "medscale.resources",
     "medscale.tasks.registry", "medscale.testing"],
    ["medscale.config", "medscale.formats"],
    ["medscale.prep", "medscale.dist", "medscale.models", "medscale.data"],
    ["medscale.eval", "medscale.checkpoint", "medscale.report.console", "medscale.report.figures",
     "medscale.report.tables", "medscale.synthetic"],
    ["medscale.tasks"],
    ["medscale.train"],
    ["medscale.commands", "medscale.cli", "medscale.demo", "medscale.report.html"],
]


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix of `module` that the table names (packages and their __init__: None)."""
    best, found = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, found = name, i
    return found


def test_layers_import_downwards_only():
    graph = import_graph()
    unplaced = [m for m in graph if layer_of(m) is None and not m.endswith("__init__") and m not in
                ("medscale", "medscale.tasks", "medscale.report", "medscale.testing")]
    assert unplaced == [], f"modules docs/architecture.md places in no layer: {unplaced}"
    # A package's __init__ runs on the way to its modules: it is checked as an importer, not as a target.
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    upward = [f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)})" for src, dsts in graph.items()
              for dst in dsts - packages if layer_of(src) is not None and layer_of(dst) is not None
              and layer_of(dst) > layer_of(src)]
    assert upward == []


@pytest.mark.parametrize("module", ["medscale.prep.pipeline", "medscale.formats.manifest", "medscale.formats.tar",
                                    "medscale.config"])
def test_prep_and_the_shard_format_need_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules and 'webdataset' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'webdataset')))[:5]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _objective_names() -> set[str]:
    from medscale.tasks.registry import task_names

    return set(task_names())


def test_no_objective_is_asked_for_by_name_outside_tasks():
    """Code that compares against an objective's name belongs to that objective (medscale.tasks)."""
    names = _objective_names()
    assert {"classification", "mae"} <= names
    found = []
    for name, path in MODULES.items():
        if name.startswith("medscale.tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                values = [node.left, *node.comparators]
                consts = [c for v in values for c in (v.elts if isinstance(v, (ast.Tuple, ast.List, ast.Set)) else [v])
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                if any(c.value in names for c in consts):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
