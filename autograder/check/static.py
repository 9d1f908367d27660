"""Static checks on the code a student wrote: evidence of tampering with the tests.

Each rule below names a technique that fooled in-kernel tests in the prototype or could; a hit is a
:class:`~autograder.ingest.notebook.Finding` that makes the student ``flagged`` (an instructor reviews it).
Scores are not changed here: the out-of-kernel re-check (:mod:`autograder.check.recheck`) decides whether
an answer is actually wrong. The rules look at the syntax tree of every code cell whose source
differs from the released notebook (answer cells, cells the student added, edited cells):

assign-protected-name   rebinding a name the locked helper cell defines (``check = ...``, ``np = ...``)
patch-module            assigning/deleting an attribute of a module or of a protected name
                        (``np.testing.assert_allclose = ...``, ``torch.allclose = ...``,
                        ``builtins.abs = ...``, ``torch.Tensor.__eq__ = ...``), ``setattr`` on one,
                        writing to ``globals()``, ``__builtins__``, ``sys.modules`` or a ``__dict__``
comparison-override     a class defining ``__eq__``/``__ne__``/ordering/``__bool__``/numeric
                        conversions (always-equal objects), or a type built with such a key
ipython-hooks           changing how later cells run (input/AST transformers, events, custom
                        exception handlers, ``sys.displayhook``/``excepthook``)
frame-inspection        reading the caller's frame or the heap (``sys._getframe``, ``inspect.stack``,
                        ``f_back``/``f_locals``, ``gc.get_objects``, ``sys.settrace``) or ``ctypes``
dynamic-code            calling ``exec``/``eval``/``compile``/``__import__``/``import_module`` (hide any
                        of the above)
dynamic-import*         importing ``importlib``/``runpy``
reads-protected*        a string naming ``solutions``, a gradebook, ``autograder``, ``.git`` or a
                        notebook file
signal-handling*        ``signal.signal`` (e.g. ignoring SIGINT; the grader's time limits still apply)

Rules marked * are notes (``flag=False``) when student code runs in the operating-system sandbox
(the default): they are about reaching the grader's files and processes, which do not exist inside
it, and they flagged honest code. ``patch-module`` also sees a namespace reached through an alias
(``b = vars(builtins); b["abs"] = ...``).
shell                   shell escapes and ``subprocess``/``os.system`` (informational unless they name
                        a protected path: then ``reads-protected``)
unanalysable            a cell over :data:`MAX_CELL_CHARS`, nested too deeply for the analysis, or a
                        notebook whose analysis ran past :data:`DEADLINE_S`: flagged for review
                        (what is not analysed could hide any rule above)

**What is analysed is what runs.** Every cell is turned into Python by IPython's own
``TransformerManager().transform_cell`` — the whole cell, as the kernel does — before it is parsed,
so ``_ = !true`` as a first line (IPython runs it; plain ``ast.parse`` fails) cannot hide the rest
of the cell. A cell that still does not parse is a note here; if the kernel nevertheless *ran* it
(no ``SyntaxError`` in its outputs), :func:`unparsed_cells_that_ran` makes that evidence. The
analysis is linear in the size of the source (every node is visited a bounded number of times:
a chain of ``+`` used to be re-walked at every level) and bounded by a size cap and a deadline.
"""
from __future__ import annotations

import ast
import re
import sys
import time

from autograder.ingest.notebook import (HIDDEN_BEGIN, HIDDEN_END, SOLUTION_BEGIN, SOLUTION_END, LessonSpec, cell_label, grade_id,
                       norm_source)
from autograder.results.records import Finding

MODULE_ROOTS = {"np", "numpy", "torch", "rb", "residual_bandwidth", "builtins", "__builtins__", "sklearn", "math",
                "scipy", "sys", "json", "nbgrader", "IPython", "unittest", "pytest", "operator", "functools",
                "PCA", "Tensor", "inspect", "gc"}
COMPARISON_DUNDERS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__",
                      "__int__", "__index__", "__abs__", "__round__", "__array__", "__array_ufunc__",
                      "__array_function__", "__torch_function__", "__instancecheck__", "__subclasscheck__",
                      "__contains__", "__len__", "__iter__"}
# __len__/__iter__/__contains__ only count together with a builtin/numeric base (see _class_rules)
STRONG_DUNDERS = COMPARISON_DUNDERS - {"__contains__", "__len__", "__iter__"}
# IPython internals that change how later cells (the tests) run: flagged wherever they appear
IPYTHON_STRONG = {"input_transformers_cleanup", "input_transformers_post", "input_transformer_manager",
                  "ast_transformers", "set_custom_exc", "run_cell", "run_cell_async", "user_ns", "user_global_ns",
                  "register_magic_function", "display_pub", "showtraceback", "InteractiveTB", "transform_cell",
                  "set_hook", "run_code", "prefilter_manager"}
# generic names: flagged only on the IPython shell object (get_ipython() or a name bound to it)
IPYTHON_ATTRS = IPYTHON_STRONG | {"events", "displayhook", "ex", "ev", "execution_count", "kernel", "shell"}
FRAME_ATTRS = {"_getframe", "currentframe", "stack", "getouterframes", "getinnerframes", "trace", "f_back",
               "f_locals", "f_globals", "f_code", "tb_frame", "settrace", "setprofile", "get_objects",
               "get_referrers", "get_referents", "gi_frame", "cr_frame", "_current_frames"}
DYNAMIC_CALLS = {"exec", "eval", "compile", "__import__", "execfile", "runpy"}
PROTECTED_TEXT = re.compile("|".join([r"solutions|gradebook|autograde|\.git\b|nbgrader|\.ipynb",
                                      *(re.escape(m) for m in (HIDDEN_BEGIN, HIDDEN_END, SOLUTION_BEGIN.lstrip("# "),
                                                               SOLUTION_END.lstrip("# ")))]), re.IGNORECASE)
# with the sandbox these are notes: they are about reaching the grader, which the sandbox prevents
SANDBOX_NOTES = {"reads-protected", "signal-handling", "dynamic-import"}
NUMERIC_BASES = {"float", "int", "str", "bool", "complex", "dict", "list", "tuple", "Tensor", "ndarray", "Number",
                 "Real", "object"}


def _root_name(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        parts.append(_dotted(node.func) + "()")
    return ".".join(reversed(parts))


MAX_CELL_CHARS = 2_000_000   # larger cells are not analysed (flagged for review)
DEADLINE_S = 60.0            # the whole notebook's analysis; past it the rest is flagged for review
RECURSION = 20_000           # nesting the analysis follows (deeper: flagged for review)


class _Unanalysable(Exception):
    """The analysis stopped (deadline, nesting): what is left is flagged for review."""


def _is_add(node) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)


def _add_chain(node) -> list[str]:
    """The string constants of a ``+`` chain, left to right (iterative: chains can be very long)."""
    parts, stack = [], [node]
    while stack:
        n = stack.pop()
        if _is_add(n):
            stack += [n.right, n.left]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            parts.append(n.value)
    return parts


def _strings(tree) -> list[tuple[int, str]]:
    """String constants (with adjacent ``+`` concatenations joined) and their line numbers.

    Linear in the tree: a ``+`` chain is joined once, at its top node (its inner ``+`` nodes are
    skipped), not again at every level of the chain."""
    out = []
    inner = set()
    for node in ast.walk(tree):
        if _is_add(node):
            inner.update(id(c) for c in (node.left, node.right) if _is_add(c))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            value = node.value.decode(errors="replace") if isinstance(node.value, bytes) else node.value
            out.append((node.lineno, value))
        elif _is_add(node) and id(node) not in inner:
            parts = _add_chain(node)
            if len(parts) > 1:
                out.append((node.lineno, "".join(parts)))
        elif isinstance(node, ast.JoinedStr):
            parts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            out.append((node.lineno, "".join(parts)))
    return out


def _docstring_nodes(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


class _Scanner(ast.NodeVisitor):
    def __init__(self, where: str, protected: frozenset[str], imported: set[str], same_imports: dict[str, str],
                 deadline: float | None = None):
        self.where, self.protected, self.imported = where, protected, imported
        self.deadline, self.visited = deadline, 0
        self.same_imports = same_imports
        self.hits: list[Finding] = []
        self.globals_declared: set[str] = set()
        self.ipython_names: set[str] = {"get_ipython"}
        self.namespaces: set[str] = set()   # names bound to vars(...)/globals()/a __dict__/a module
        self.depth = 0

    def generic_visit(self, node):
        self.visited += 1
        if self.deadline is not None and self.visited % 4096 == 0 and time.monotonic() > self.deadline:
            raise _Unanalysable(f"the analysis ran past its {DEADLINE_S:g} s deadline")
        super().generic_visit(node)

    def hit(self, rule: str, node, detail: str, flag: bool = True) -> None:
        self.hits.append(Finding("static", rule, f"{self.where}, line {getattr(node, 'lineno', '?')}", detail, flag))

    # -- names and attributes -----------------------------------------------------------------
    def _modulish(self, name: str | None) -> bool:
        return bool(name) and (name in MODULE_ROOTS or name in self.imported or name in self.protected)

    def _check_target(self, target, node, verb: str) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._check_target(t, node, verb)
            return
        if isinstance(target, ast.Starred):
            self._check_target(target.value, node, verb)
            return
        if isinstance(target, ast.Name):
            if target.id in self.protected and (self.depth == 0 or target.id in self.globals_declared):
                self.hit("assign-protected-name", node, f"{verb} {target.id!r}, which the locked helper cell defines")
            elif target.id in ("__builtins__", "__builtin__"):
                self.hit("patch-module", node, f"{verb} {target.id}")
            return
        if isinstance(target, ast.Attribute):
            root = _root_name(target)
            if self._modulish(root):
                self.hit("patch-module", node, f"{verb} {_dotted(target)}")
            elif target.attr in COMPARISON_DUNDERS or target.attr == "__class__":
                self.hit("comparison-override", node, f"{verb} {_dotted(target)}")
            elif target.attr in IPYTHON_STRONG or target.attr in ("displayhook", "excepthook"):
                self.hit("ipython-hooks", node, f"{verb} {_dotted(target)}")
            return
        if isinstance(target, ast.Subscript):
            base = target.value
            text = _dotted(base) if isinstance(base, (ast.Attribute, ast.Name, ast.Call)) else ""
            if (isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id in ("globals", "vars", "locals")) \
                    or text.endswith("__dict__") or text in ("sys.modules", "__builtins__", "builtins.__dict__") \
                    or self._modulish(_root_name(base)) or (isinstance(base, ast.Name) and base.id in self.namespaces):
                self.hit("patch-module", node, f"{verb} an item of {text or 'a namespace'}")

    def _is_namespace(self, value) -> bool:
        """``vars(x)``, ``globals()``, ``x.__dict__``, a module or an alias of one of these."""
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("vars", "globals", "locals"):
            return True
        if isinstance(value, ast.Attribute) and value.attr == "__dict__":
            return True
        return isinstance(value, ast.Name) and (value.id in self.namespaces or value.id in ("builtins", "__builtins__"))

    def visit_Assign(self, node):
        for t in node.targets:
            self._check_target(t, node, "assigns")
        if self._is_namespace(node.value):
            self.namespaces.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if _root_name(node.value) in self.ipython_names:
            self.ipython_names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        self.generic_visit(node)

    def visit_For(self, node):
        self._check_target(node.target, node, "rebinds (loop variable)")
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_With(self, node):
        for item in node.items:
            if item.optional_vars is not None:
                self._check_target(item.optional_vars, node, "rebinds (with ... as)")
        self.generic_visit(node)

    visit_AsyncWith = visit_With

    def visit_NamedExpr(self, node):
        self._check_target(node.target, node, "assigns (:=)")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._check_target(node.target, node, "assigns")
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self._check_target(node.target, node, "assigns")
        self.generic_visit(node)

    def visit_Delete(self, node):
        for t in node.targets:
            self._check_target(t, node, "deletes")
        self.generic_visit(node)

    def visit_Global(self, node):
        self.globals_declared.update(node.names)
        bad = sorted(set(node.names) & self.protected)
        if bad:
            self.hit("assign-protected-name", node, f"declares global {', '.join(bad)} (helper names)")

    def _scoped(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_FunctionDef(self, node):
        if self.depth == 0 and node.name in self.protected:
            self.hit("assign-protected-name", node, f"redefines {node.name!r}, which the locked helper cell defines")
        self._scoped(node)

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = _scoped

    def visit_ClassDef(self, node):
        if self.depth == 0 and node.name in self.protected:
            self.hit("assign-protected-name", node, f"redefines {node.name!r}")
        bases = {_dotted(b).split(".")[-1] for b in node.bases}
        methods = set()
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                methods.add(stmt.name)
            elif isinstance(stmt, ast.Assign):
                methods.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
        strong = sorted(methods & STRONG_DUNDERS)
        weak = sorted(methods & (COMPARISON_DUNDERS - STRONG_DUNDERS))
        if strong or (weak and bases & NUMERIC_BASES):
            self.hit("comparison-override", node,
                     f"class {node.name}({', '.join(sorted(bases)) or 'object'}) overrides {', '.join(strong + weak)}")
        self._scoped(node)

    def _import_binds(self, node, bound: str, origin: str) -> None:
        """Flag an import that rebinds a helper name to something else (``import numpy as np`` is fine)."""
        if bound in self.protected and (self.depth == 0 or bound in self.globals_declared) \
                and self.same_imports.get(bound) != origin:
            self.hit("assign-protected-name", node, f"rebinds {bound!r} by importing {origin}")

    def visit_Import(self, node):
        for a in node.names:
            self.imported.add((a.asname or a.name).split(".")[0])
            if a.asname:
                self._import_binds(node, a.asname, a.name)
            if a.name.split(".")[0] in ("ctypes", "importlib", "runpy"):
                self.hit("frame-inspection" if a.name.startswith("ctypes") else "dynamic-import", node, f"imports {a.name}")
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        mod = node.module or ""
        for a in node.names:
            self.imported.add(a.asname or a.name)
            self._import_binds(node, a.asname or a.name, f"{mod}.{a.name}")
            if a.name in FRAME_ATTRS or mod.split(".")[0] == "ctypes":
                self.hit("frame-inspection", node, f"imports {a.name} from {mod}")
            if mod.split(".")[0] in ("importlib", "runpy"):
                self.hit("dynamic-import", node, f"imports {a.name} from {mod}")
            elif a.name in DYNAMIC_CALLS:
                self.hit("dynamic-code", node, f"imports {a.name} from {mod}")
            if mod == "unittest.mock" or a.name in ("mock", "patch"):
                self.hit("patch-module", node, f"imports {a.name} from {mod} (monkeypatching)")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr in FRAME_ATTRS and not (node.attr == "stack" and _root_name(node) in ("np", "numpy", "torch")) \
                and not (node.attr == "trace" and _root_name(node) in ("np", "numpy", "torch")):
            self.hit("frame-inspection", node, f"uses {_dotted(node)}")
        if node.attr in IPYTHON_STRONG or (
                node.attr in IPYTHON_ATTRS and _root_name(node) in self.ipython_names) or (
                node.attr in ("displayhook", "excepthook") and _root_name(node) == "sys"):
            self.hit("ipython-hooks", node, f"uses {_dotted(node)}")
        if node.attr in ("system", "popen", "spawnl", "spawnv", "execv", "execl", "posix_spawn") and _root_name(node) == "os":
            self.hit("shell", node, f"runs a command with {_dotted(node)}", flag=False)
        if node.attr == "_exit" and _root_name(node) == "os":
            self.hit("process-exit", node, "calls os._exit (kills the kernel)", flag=False)
        self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if (isinstance(func, ast.Name) and name in DYNAMIC_CALLS) or name == "import_module" or (
                isinstance(func, ast.Attribute) and name in DYNAMIC_CALLS and _root_name(func) in ("builtins", "__builtins__")):
            self.hit("dynamic-code", node, f"calls {name}()")
        if name in ("setattr", "delattr") and node.args:
            target = node.args[0]
            if self._modulish(_root_name(target)) or isinstance(target, ast.Name) and target.id in ("builtins",):
                self.hit("patch-module", node, f"calls {name}({_dotted(target)}, ...)")
            elif len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in COMPARISON_DUNDERS:
                self.hit("comparison-override", node, f"calls {name}(..., {node.args[1].value!r})")
        if name == "type" and len(node.args) == 3:
            keys = [k.value for k in getattr(node.args[2], "keys", []) if isinstance(k, ast.Constant)]
            if set(keys) & STRONG_DUNDERS:
                self.hit("comparison-override", node, f"builds a class with {sorted(set(keys) & STRONG_DUNDERS)}")
        if name == "signal" and _root_name(func) == "signal":
            self.hit("signal-handling", node, "installs a signal handler (e.g. ignoring SIGINT defeats timeouts)")
        if name in ("run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput") and \
                _root_name(func) in ("subprocess", "sp"):
            self.hit("shell", node, f"runs a command with {_dotted(func)}", flag=False)
        self.generic_visit(node)


_MAGIC_LINE = re.compile(r"^\s*(?:[\w.,\s]+=\s*)?[!%]")


def _ipython_to_python(source: str) -> tuple[str, list[str]]:
    """The whole cell turned into Python exactly as the kernel does (IPython's TransformerManager),
    and the shell/magic lines found (also ``x = !cmd``, anywhere in the cell)."""
    magics = [line.strip() for line in source.splitlines() if _MAGIC_LINE.match(line)]
    try:
        from IPython.core.inputtransformer2 import TransformerManager
        return TransformerManager().transform_cell(source), magics
    except Exception:
        return source, magics


def parses(source: str) -> bool:
    """Whether the kernel's transformation of the cell is valid Python."""
    try:
        ast.parse(_ipython_to_python(source)[0])
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def scan_source(source: str, where: str, protected: frozenset[str],
                same_imports: dict[str, str] | None = None, sandboxed: bool = True,
                deadline: float | None = None) -> list[Finding]:
    """All findings for one cell's source (``same_imports``: helper names that may be re-imported as is).

    ``sandboxed``: student code runs in the operating-system sandbox, where the grader's files do
    not exist. Then the rules about *reaching the grader's files or processes* (strings naming
    protected paths, ``import importlib``/``runpy``, signal handlers) are notes, not flags: they
    flagged honest code (an error message mentioning "solutions") and protect nothing the
    sandbox does not. The rules about tampering with the tests inside the kernel stay.
    """
    if len(source) > MAX_CELL_CHARS:
        return [Finding("static", "unanalysable", where, f"the cell has {len(source)} characters, over the "
                        f"{MAX_CELL_CHARS} the analysis reads; review it by hand")]
    if sys.getrecursionlimit() < RECURSION:   # the visitor recurses once per level of the tree (frames
        sys.setrecursionlimit(RECURSION)       # on the heap since Python 3.11); the parser has its own limit
    try:
        return _scan(source, where, protected, same_imports, sandboxed, deadline)
    except (_Unanalysable, RecursionError) as e:
        why = str(e) if isinstance(e, _Unanalysable) else "the code is nested too deeply to analyse"
        return [Finding("static", "unanalysable", where, f"{why}; review it by hand")]


def _scan(source, where, protected, same_imports, sandboxed, deadline) -> list[Finding]:
    python, magics = _ipython_to_python(source)
    findings: list[Finding] = []
    for line in magics:
        if PROTECTED_TEXT.search(line):
            findings.append(Finding("static", "reads-protected", where, f"shell/magic line names a protected path: {line[:160]}",
                                    flag=not sandboxed))
        elif line.startswith(("!", "%%bash", "%%sh", "%sx", "%system", "%%script")):
            findings.append(Finding("static", "shell", where, f"shell command: {line[:160]}", flag=False))
    try:
        tree = ast.parse(python)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        line = getattr(e, "lineno", None)
        findings.append(Finding("static", "syntax-error", f"{where}, line {line}" if line else where,
                                f"the cell does not parse ({getattr(e, 'msg', type(e).__name__)}); not analysed "
                                "(evidence if the kernel ran it anyway)", flag=False))
        return findings
    scanner = _Scanner(where, protected, set(), same_imports or {}, deadline)
    scanner.visit(tree)
    findings.extend(scanner.hits)
    docs = _docstring_nodes(tree)
    doc_values = {n.value for n in ast.walk(tree) if id(n) in docs}
    for lineno, text in _strings(tree):
        if text in doc_values:
            continue
        m = PROTECTED_TEXT.search(text)
        if m:
            findings.append(Finding("static", "reads-protected", f"{where}, line {lineno}",
                                    f"a string names {m.group(0)!r}: {text[:120]!r}", flag=not sandboxed))
    if sandboxed:
        findings = [Finding(f.kind, f.rule, f.where, f.detail, False) if f.rule in SANDBOX_NOTES else f for f in findings]
    return findings


def scan_notebook(nb, spec: LessonSpec, sandboxed: bool = True) -> list[Finding]:
    """Findings for every code cell whose source differs from the released notebook's same cell."""
    released_by_id = {c.get("id"): norm_source(c.source) for c in spec.release.cells if c.get("id")}
    released_sources = {norm_source(c.source) for c in spec.release.cells if c.cell_type == "code"}
    out: list[Finding] = []
    deadline = time.monotonic() + DEADLINE_S
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        src = norm_source(cell.source)
        gid = grade_id(cell)
        if gid and src == spec.release_sources.get(gid):
            continue
        if not gid and (released_by_id.get(cell.get("id")) == src or src in released_sources):
            continue
        where = cell_label(cell, i)
        if time.monotonic() > deadline:
            out.append(Finding("static", "unanalysable", where, f"the analysis ran past its {DEADLINE_S:g} s "
                               "deadline; this and the following cells were not analysed; review them by hand"))
            break
        out.extend(scan_source(cell.source, where, spec.protected_names, spec.protected_imports, sandboxed, deadline))
    # one finding per rule and place is enough
    unique: dict[tuple, Finding] = {}
    for f in out:
        unique.setdefault((f.rule, f.where, f.detail), f)
    return list(unique.values())


def unparsed_cells_that_ran(graded_nb) -> list[Finding]:
    """Cells of the executed notebook that do not parse (so the analysis never saw them) but that
    the kernel ran without a ``SyntaxError``: something changed how the kernel reads cells."""
    out = []
    deadline = time.monotonic() + DEADLINE_S
    for i, cell in enumerate(graded_nb.cells):
        if cell.cell_type != "code" or cell.get("execution_count") is None or not cell.source.strip():
            continue
        if time.monotonic() > deadline:
            out.append(Finding("static", "unanalysable", cell_label(cell, i), f"checking which cells ran ran past its "
                               f"{DEADLINE_S:g} s deadline; review the rest by hand"))
            break
        errors = {o.get("ename") for o in cell.get("outputs", []) if o.get("output_type") == "error"}
        if errors & {"SyntaxError", "IndentationError", "TabError"} or len(cell.source) > MAX_CELL_CHARS:
            continue
        if not parses(cell.source):
            out.append(Finding("static", "unparsed-cell-ran", cell_label(cell, i),
                               "the kernel ran this cell, but it is not valid (IPython) Python: a transformer "
                               "or hook changed how cells are read"))
    return out
