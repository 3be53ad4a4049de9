"""Architecture rules (ARCHITECTURE.md), checked on the source tree.

* every module of ``ml/`` imports in a fresh interpreter, and importing all of them loads no
  dagster, mlflow or psqa_pipelines;
* no import cycles inside ``ml/`` nor inside ``psqa_pipelines/``. The graph is built with ``ast``
  from every ``import``/``from ... import`` in the source, function-level ones included (a cycle
  closed by an import inside a function is still two modules that need each other: the idea has
  two homes). ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
  ``pkg``; an import points at the module it names, not at its parent packages (a package's
  ``__init__`` re-exporting its submodules is not a cycle);
* ``ml/`` never imports dagster, mlflow or psqa_pipelines, at module level or inside functions.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level names ml/ must never import (the Dagster/MLflow layer depends on ml/, never the reverse).
ML_FORBIDDEN = ("dagster", "mlflow", "psqa_pipelines")


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    target: str  # imported module, resolved (`from pkg import submodule` -> pkg.submodule)
    where: str  # file:line, the file relative to the directory holding the top-level package
    in_function: bool  # inside a def/lambda body: runs on call, not at import time


def module_files(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` under ``root/package`` (``__init__`` is the package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve_relative(src: str, files: dict[str, Path], level: int, module: str | None) -> str:
    package = src if _is_package(src, files) else src.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _dynamic_import_target(node: ast.Call) -> str | None:
    """``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    f = node.func
    is_dynamic = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
    )
    if is_dynamic and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(src: str, files: dict[str, Path]) -> list[Import]:
    """Every import in module ``src`` (any depth), with targets resolved to modules where known."""
    tree = ast.parse(files[src].read_text(encoding="utf-8"), filename=str(files[src]))
    rel = files[src].relative_to(files[src.split(".")[0]].parent.parent).as_posix()
    out: list[Import] = []

    def add(target: str, node: ast.AST, in_function: bool) -> None:
        out.append(Import(src, target, f"{rel}:{node.lineno}", in_function))

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(src, files, node.level, node.module) if node.level else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in files else base, node, in_function)
        elif isinstance(node, ast.Call) and (target := _dynamic_import_target(node)):
            add(target, node, in_function)
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return out


def import_graph(package: str, root: Path = ROOT) -> dict[str, list[Import]]:
    """Module -> its imports of other modules of the same top-level package."""
    files = module_files(package, root)
    return {src: [imp for imp in imports_of(src, files) if imp.target in files and imp.target != src] for src in files}


def strongly_connected_components(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for imp in graph[v]:
            w = imp.target
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or any(imp.target == v for imp in graph[v]):
                sccs.append(sorted(scc))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return sccs


def describe_cycle(graph: dict[str, list[Import]], scc: list[str]) -> str:
    """One shortest cycle through the component's first module, each edge with its line."""
    members = set(scc)
    start = scc[0]
    prev: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for imp in graph[v]:
            if imp.target not in members or imp.target in prev:
                continue
            prev[imp.target] = imp
            if imp.target == start:
                queue.clear()
                break
            queue.append(imp.target)
    edges = []
    v = start
    while True:
        imp = prev[v]
        edges.append(imp)
        v = imp.src
        if v == start:
            break
    parts = [start] + [
        f"-> {imp.target} ({imp.where}{', in a function' if imp.in_function else ''})" for imp in reversed(edges)
    ]
    more = f" [component: {', '.join(scc)}]" if len(scc) > len(edges) else ""
    return " ".join(parts) + more


@pytest.mark.parametrize("package", ["ml", "psqa_pipelines"])
def test_no_import_cycles(package):
    graph = import_graph(package)
    cycles = [describe_cycle(graph, scc) for scc in strongly_connected_components(graph)]
    assert not cycles, f"import cycles in {package}/ (function-level imports count):\n" + "\n".join(cycles)


def test_ml_never_imports_the_orchestration_layer():
    files = module_files("ml")
    bad = [
        f"{imp.src} imports {imp.target} ({imp.where}{', in a function' if imp.in_function else ''})"
        for src in files
        for imp in imports_of(src, files)
        if imp.target.split(".")[0] in ML_FORBIDDEN or imp.target.split(".")[0].startswith("dagster")
    ]
    assert not bad, "ml/ is the pure core (torch/numpy/pandas/pyarrow); it must not import:\n" + "\n".join(bad)


def test_every_ml_module_imports_in_a_fresh_interpreter():
    script = textwrap.dedent(
        f"""
        import importlib, json, pkgutil, sys, traceback
        import ml
        failures, leaks, names = {{}}, {{}}, []
        def onerror(name):
            failures[name] = traceback.format_exc(limit=-3)
        for info in pkgutil.walk_packages(ml.__path__, "ml.", onerror=onerror):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue  # running it is the CLI
            names.append(info.name)
            try:
                importlib.import_module(info.name)
            except BaseException:
                failures[info.name] = traceback.format_exc(limit=-3)
            for top in {ML_FORBIDDEN!r}:
                if top in sys.modules and top not in leaks:
                    leaks[top] = info.name
        print(json.dumps({{"names": names, "failures": failures, "leaks": leaks}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    on_disk = {name for name in module_files("ml") if name != "ml" and not name.endswith(".__main__")}
    assert set(result["names"]) >= on_disk, f"pkgutil missed {sorted(on_disk - set(result['names']))}"
    assert not result["failures"], "ml modules that fail to import:\n" + "\n".join(
        f"{name}:\n{tb}" for name, tb in result["failures"].items()
    )
    assert not result["leaks"], "importing ml loaded the orchestration layer: " + ", ".join(
        f"{top} (first seen after {name})" for top, name in result["leaks"].items()
    )


def test_the_checker_sees_function_level_relative_and_package_imports(tmp_path):
    """The rules above are only as good as the graph: a synthetic package with known cycles."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "from pkg.a import f\n",  # re-export: points at pkg.a, not a cycle by itself
        "a.py": "import os\n\ndef f():\n    from pkg import b\n    return b\n",  # function-level -> pkg.b
        "b.py": "from . import a\nfrom .sub import c\n",  # relative -> pkg.a (cycle a<->b), pkg.sub.c
        "sub/__init__.py": "",
        "sub/c.py": "from ..sub import d\n",  # two-level relative -> pkg.sub.d
        "sub/d.py": "import importlib\nX = importlib.import_module('pkg.sub.c')\n",  # dynamic -> c (cycle)
    }
    for rel, text in sources.items():
        (pkg / rel).write_text(text)
    graph = import_graph("pkg", tmp_path)
    assert {imp.target for imp in graph["pkg"]} == {"pkg.a"}
    assert [(imp.target, imp.in_function) for imp in graph["pkg.a"]] == [("pkg.b", True)]
    assert {imp.target for imp in graph["pkg.b"]} == {"pkg.a", "pkg.sub.c"}
    sccs = strongly_connected_components(graph)
    assert sorted(sccs) == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]
    text = describe_cycle(graph, ["pkg.a", "pkg.b"])
    assert text == "pkg.a -> pkg.b (pkg/a.py:4, in a function) -> pkg.a (pkg/b.py:1)"
