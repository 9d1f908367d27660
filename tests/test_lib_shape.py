"""The shape of lib/: its size (tools/loc.py), function length, one public API, no import cycle."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib"
sys.path.insert(0, str(ROOT / "tools"))
import loc  # noqa: E402

LESSON = next(ROOT.glob("solutions/*/lesson.py"))

#: issue 23's target for lib/ (code lines: no docstrings, comments or blank lines). Not reached yet:
#: CODE_BUDGET is the ceiling measured after this branch's cuts and may only go down towards it.
CODE_TARGET = 4_700
CODE_BUDGET = 6_170   # ratchet: measured after the null counts chance 3-std flags (2026-12-08); lower it as code goes
MAX_FUNCTION_LINES = 60
#: functions still longer than MAX_FUNCTION_LINES (to be split; the list may only shrink)
LONG_FUNCTIONS: set[str] = set()


def test_loc_counts_code_not_docstrings_comments_or_blank_lines():
    source = ('"""Module docstring\n\nwith two lines."""\nimport os  # a comment\n\n# only a comment\n'
              'def f(x):\n    """Doc."""\n    s = """not a docstring:\n    data"""\n    return x\n')
    assert loc.code_lines(source) == 5   # import, def, the two lines of s, return


def test_lib_lines_of_code_within_budget():
    counts = loc.count(LIB)
    code = sum(c for c, _ in counts.values())
    assert code <= CODE_BUDGET, f"lib/ has {code} lines of code; the budget is {CODE_BUDGET} (target {CODE_TARGET})"


def _functions():
    for path in sorted((LIB / "residual_bandwidth").rglob("*.py")):
        rel = path.relative_to(LIB / "residual_bandwidth").as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{rel}:{node.name}", node.end_lineno - node.lineno + 1


def test_no_new_function_over_60_lines():
    long = {name for name, n in _functions() if n > MAX_FUNCTION_LINES}
    assert long <= LONG_FUNCTIONS, f"functions over {MAX_FUNCTION_LINES} lines: {sorted(long - LONG_FUNCTIONS)}"
    assert LONG_FUNCTIONS <= long, f"split already, remove from LONG_FUNCTIONS: {sorted(LONG_FUNCTIONS - long)}"


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``residual_bandwidth`` that ``path`` (in package ``package``) imports outside its
    functions (also under ``if TYPE_CHECKING:``, which is a cycle in the design even if not at run time)."""
    out, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            out.update([f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names])
        todo += list(ast.iter_child_nodes(node))
    return out


def import_cycle(root: Path) -> list[str] | None:
    """The first import cycle between the modules under ``root`` (a package folder's parent), or None."""
    graph = {}
    for path in (root / "residual_bandwidth").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else ".".join(parts[:-1])
        graph[name] = _imports(path, package)
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if m not in graph or n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules
            if state.get(m) == 1:
                return stack + [m]
            found = None if state.get(m) else visit(m, stack + [m])
            if found:
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        found = None if state.get(n) else visit(n, [n])
        if found:
            return found
    return None


def test_no_import_cycle_in_lib(tmp_path):
    assert import_cycle(LIB) is None
    # the check finds the cycle this test was written for (monitor/core.py <-> monitor/export.py)
    (tmp_path / "residual_bandwidth" / "monitor").mkdir(parents=True)
    (tmp_path / "residual_bandwidth" / "monitor" / "core.py").write_text("from .export import ExportMixin\n")
    (tmp_path / "residual_bandwidth" / "monitor" / "export.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .core import BandwidthMonitor\n")
    assert import_cycle(tmp_path) is not None


def test_monitor_is_composed_of_parts_with_a_small_constructor():
    from residual_bandwidth.monitor import BandwidthMonitor
    params = [p for p in inspect.signature(BandwidthMonitor.__init__).parameters if p != "self"]
    assert len(params) <= 8, params
    assert BandwidthMonitor.__mro__ == (BandwidthMonitor, object)  # no mixins


def test_the_lesson_imports_only_the_public_api():
    """The lesson imports from residual_bandwidth, residual_bandwidth.viz and residual_bandwidth.course
    only, and every name it imports is in that module's __all__."""
    allowed = {"residual_bandwidth", "residual_bandwidth.viz", "residual_bandwidth.course"}
    found = 0
    for node in ast.walk(ast.parse(LESSON.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("residual_bandwidth"):
            assert node.module in allowed, f"the lesson imports from {node.module}"
            public = importlib.import_module(node.module).__all__
            for alias in node.names:
                assert alias.name in public, f"{alias.name} is not in {node.module}.__all__"
                found += 1
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("residual_bandwidth"):
                    assert alias.name in allowed, alias.name
    assert found >= 20
    for module in allowed:
        mod = importlib.import_module(module)
        assert all(hasattr(mod, n) for n in mod.__all__), module
        assert not any(re.match(r"_", n) for n in mod.__all__)
