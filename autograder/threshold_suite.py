"""Generate the threshold-logic suite: student submissions with known outcomes, from the source notebook.

``python -m autograder.threshold_suite OUT`` writes ``OUT/<variant>/<lesson>/<notebook>`` (a few in
other layouts) and ``OUT/expected.json``; ``tests/test_autograder.py`` grades the folder with the
real pipeline and checks every outcome. Everything is derived from the lesson metadata and the
notebooks (grade cells, points, answer cells and the names they define), so the suite follows the
lesson as items are added.

How scores are controlled without item-specific wrong answers: every answer cell gets the source
solution, and each name it defines is wrapped in a *gate* that raises while the item's name is in
the global ``_VARIANT_FAIL``; a small added cell before each grade cell sets ``_VARIANT_FAIL`` to
that cell's item when the cell should fail (and to nothing otherwise), and a last cell clears it.
So any set of grade cells can be made to fail, and any achievable score can be produced — e.g.
exactly the passing threshold, or the largest score below it. (An item whose answer calls another
item's function still works: gates only fire while their own item is failing.)

Tamper variants use *wrong* answers (results corrupted by a wrapper) plus one cheating technique,
so that a technique that worked would show up as points the answers do not deserve.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from .notebook import LessonSpec, grade_id, load_spec, strip_solution_markers

GATE = '''

# --- threshold-suite variant: gate (raises while this item is set to fail) ---
def _variant_gate(_item, _orig):
    def _gated(*args, **kwargs):
        if _item in globals().get("_VARIANT_FAIL", ()):
            raise AssertionError(f"variant: {_item} is set to fail here")
        return _orig(*args, **kwargs)
    return _gated
'''

CORRUPT = '''

# --- threshold-suite variant: wrong answers (every result corrupted) ---
def _variant_corrupt(_orig):
    def _bad(v):
        if isinstance(v, bool):
            return not v
        if isinstance(v, int):
            return v + 7
        if isinstance(v, float):
            return v * 1.5 + 1.0
        if isinstance(v, str):
            return v + "_wrong"
        if isinstance(v, dict):
            return {k: _bad(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(_bad(x) for x in v)
        if isinstance(v, torch.Tensor):
            return v * 1.5 + 1.0 if v.is_floating_point() else v + 7
        return _Wrong(v, _bad)

    class _Wrong:
        def __init__(self, obj, bad):
            object.__setattr__(self, "_obj", obj)
            object.__setattr__(self, "_bad", bad)

        def __getattr__(self, name):
            value = getattr(self._obj, name)
            if callable(value):
                def call(*args, **kwargs):
                    out = value(*args, **kwargs)
                    return self if out is self._obj else self._bad(out)
                return call
            return self._bad(value)

    def wrapped(*args, **kwargs):
        return _bad(_orig(*args, **kwargs))
    return wrapped
'''

ALWAYS_EQUAL = '''

# --- threshold-suite variant: wrong integers that compare equal to anything ---
class _AlwaysEqual(int):
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = int.__hash__


def _variant_always_equal(_orig):
    def _ae(v):
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            return _AlwaysEqual(v + 7)
        if isinstance(v, dict):
            return {k: _ae(x) for k, x in v.items()}
        return v

    def wrapped(*args, **kwargs):
        return _ae(_orig(*args, **kwargs))
    return wrapped
'''

TAMPER = {
    "tamper_check": "check = lambda condition, message=None: True   # every test assertion passes",
    "tamper_builtins": "import builtins\nbuiltins.abs = lambda x: 0.0   # close() now always agrees",
    "tamper_numpy_torch": ("np.testing.assert_allclose = lambda *a, **k: None\n"
                           "torch.allclose = lambda *a, **k: True"),
    "tamper_ipython": ("get_ipython().input_transformers_cleanup.append(\n"
                       "    lambda lines: [] if any('check(' in line for line in lines) else lines)"),
    "tamper_read_solutions": ("import json as _json, pathlib as _pl, residual_bandwidth as _rbm\n"
                              "_root = _pl.Path(_rbm.__file__).resolve().parents[2]\n"
                              "_sol = _json.loads((_root / 'solutions' / '{lesson}' / '{notebook}').read_text())\n"
                              "_stolen = {{c['metadata']['nbgrader']['grade_id']: ''.join(c['source'])\n"
                              "           for c in _sol['cells'] if c.get('metadata', {{}}).get('nbgrader', {{}}).get('solution')}}"),
    "tamper_read_gradebook": ("import glob as _glob, sqlite3 as _sq, pathlib as _pl, residual_bandwidth as _rbm\n"
                              "_root = _pl.Path(_rbm.__file__).resolve().parents[2]\n"
                              "_dbs = _glob.glob(str(_root / 'autograder' / 'work' / '**' / '*.db'), recursive=True)\n"
                              "_rows = [_sq.connect(p).execute('select * from grade').fetchall() for p in _dbs]"),
}


@dataclass
class Variant:
    """One generated submission and what the grader must report for it."""
    name: str
    layout: str                     # "nested" (<student>/<lesson>/<nb>), "student" (<student>/<nb>), "flat"
    status: str                     # expected status: graded | flagged | errored
    score: float | None = None      # expected score (None: not asserted, e.g. tamper variants)
    passed: bool | None = None
    reason_contains: str = ""       # a fragment the reason must contain (errored)
    evidence_rules: list[str] = field(default_factory=list)   # rules that must appear in the evidence
    failing: list[str] = field(default_factory=list)          # grade cells made to fail


def _code(source: str, cid: str):
    cell = nbformat.v4.new_code_cell(source)
    cell.id = cid
    return cell


def solved(spec: LessonSpec, wrap: str | None = None, wrapper: str = "") -> nbformat.NotebookNode:
    """The released notebook with every answer cell holding the source solution.

    ``wrap``: name of a wrapper function (defined by ``wrapper`` code) applied to every top-level
    name an answer defines; ``_variant_gate`` wrapping is always added (it is inert until
    ``_VARIANT_FAIL`` is set).
    """
    nb = copy.deepcopy(spec.release)
    src = {grade_id(c): c for c in spec.source.cells if grade_id(c)}
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in spec.answer_cells:
            a = spec.answer_cells[gid]
            body = strip_solution_markers(src[gid].source) + GATE + wrapper
            for name in a.defines:
                if wrap:
                    body += f"\n{name} = {wrap}({name})"
                body += f"\n{name} = _variant_gate({a.item!r}, {name})"
            cell.source = body
    return nb


def with_failing(nb, spec: LessonSpec, failing: set[str]) -> nbformat.NotebookNode:
    """Insert the cells that make exactly the grade cells in ``failing`` fail."""
    nb = copy.deepcopy(nb)
    out, k = [], 0
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in spec.grade_cells:
            items = {spec.grade_cells[gid].item} if gid in failing else set()
            out.append(_code(f"_VARIANT_FAIL = {sorted(items)!r}", f"variant-flag-{k}"))
            k += 1
        out.append(cell)
    out.append(_code("_VARIANT_FAIL = []", "variant-flag-end"))
    nb.cells = out
    return nb


def insert_after_setup(nb, spec: LessonSpec, source: str, cid: str) -> nbformat.NotebookNode:
    """Add a code cell right after the last locked helper cell (before any answer)."""
    nb = copy.deepcopy(nb)
    idx = max((i for i, c in enumerate(nb.cells) if grade_id(c) in spec.locked_cells), default=0)
    nb.cells.insert(idx + 1, _code(source, cid))
    return nb


def achievable(spec: LessonSpec) -> list[tuple[float, tuple[str, ...]]]:
    """(score, failing grade cells) for every subset of grade cells, best-first canonical order."""
    order = {g: i for i, g in enumerate(spec.grade_cells)}
    total = spec.total_points
    # prefer failing hidden cells and few cells: realistic ("passes what it can see") and stable
    cells = sorted(order, key=lambda g: (not spec.grade_cells[g].hidden, order[g]))
    out = []
    for r in range(len(cells) + 1):
        for combo in itertools.combinations(cells, r):
            out.append((total - sum(spec.grade_cells[g].points for g in combo), combo))
    return out


def threshold_choices(spec: LessonSpec) -> tuple[tuple[float, tuple], tuple[float, tuple]]:
    """(lowest passing score and how to get it, highest failing score and how to get it)."""
    line = spec.meta.passing_threshold * spec.total_points
    combos = achievable(spec)
    passing = min((s for s, _ in combos if s >= line - 1e-9))
    failing = max((s for s, _ in combos if s < line - 1e-9))
    pick = lambda target: next(c for s, c in combos if abs(s - target) < 1e-9)  # noqa: E731
    return (passing, pick(passing)), (failing, pick(failing))


def generate(out: Path, spec: LessonSpec) -> list[Variant]:
    """Write every variant under ``out`` and ``out/expected.json``; return the variants."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    total = spec.total_points
    (pass_score, pass_fail), (fail_score, fail_fail) = threshold_choices(spec)
    nbs: dict[str, tuple[Variant, object]] = {}

    def add(v: Variant, nb) -> None:
        nbs[v.name] = (v, nb)

    base = solved(spec)
    add(Variant("all_correct", "nested", "graded", total, True), with_failing(base, spec, set()))
    add(Variant("at_threshold", "nested", "graded", pass_score, True, failing=list(pass_fail)),
        with_failing(base, spec, set(pass_fail)))
    add(Variant("below_threshold", "student", "graded", fail_score, False, failing=list(fail_fail)),
        with_failing(base, spec, set(fail_fail)))
    add(Variant("untouched", "nested", "graded", 0.0, False), copy.deepcopy(spec.release))
    wrong = solved(spec, "_variant_corrupt", CORRUPT)
    add(Variant("wrong_answers", "nested", "graded", None, False), wrong)

    # robustness
    add(Variant("crash", "nested", "errored", reason_contains="kernel died"),
        insert_after_setup(base, spec, "import os\nos._exit(1)", "variant-crash"))
    add(Variant("infinite_loop", "nested", "errored", reason_contains="time limit"),
        insert_after_setup(base, spec, "while True:\n    pass", "variant-loop"))
    add(Variant("loop_ignoring_sigint", "nested", "errored", reason_contains="ignores interrupts"),
        insert_after_setup(base, spec, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
                           "variant-loop-sigint"))
    add(Variant("huge_output", "nested", "errored", reason_contains="output too large"),
        insert_after_setup(base, spec, "print('x' * 30_000_000)", "variant-huge"))

    # tampering
    for name, code in TAMPER.items():
        code = code.format(lesson=spec.lesson_id, notebook=spec.notebook_name)
        if name == "tamper_ipython":
            nb, rules = copy.deepcopy(spec.release), ["ipython-hooks"]
        elif name == "tamper_read_solutions":
            nb, rules = copy.deepcopy(spec.release), ["blocked-access", "reads-protected"]
            for cell in nb.cells:
                if grade_id(cell) in spec.answer_cells:
                    cell.source = f"exec(_stolen[{grade_id(cell)!r}])"
        elif name == "tamper_read_gradebook":
            nb, rules = copy.deepcopy(wrong), ["blocked-access"]
        else:
            nb = copy.deepcopy(wrong)
            rules = {"tamper_check": ["assign-protected-name"], "tamper_builtins": ["patch-module"],
                     "tamper_numpy_torch": ["patch-module"]}[name]
        add(Variant(name, "nested", "flagged", evidence_rules=rules), insert_after_setup(nb, spec, code, f"variant-{name}"))
    add(Variant("tamper_always_equal", "nested", "flagged", evidence_rules=["comparison-override"]),
        solved(spec, "_variant_always_equal", ALWAYS_EQUAL))
    edited = copy.deepcopy(wrong)
    for cell in edited.cells:
        if grade_id(cell) in spec.grade_cells:
            cell.source = "print('tests skipped')"
    add(Variant("tamper_edit_tests", "nested", "flagged", evidence_rules=["edited-test-cell"]), edited)
    deleted = copy.deepcopy(wrong)
    deleted.cells = [c for c in deleted.cells if grade_id(c) not in spec.grade_cells]
    add(Variant("tamper_delete_tests", "nested", "flagged", evidence_rules=["deleted-test-cell"]), deleted)

    for name, (v, nb) in nbs.items():
        if v.layout == "nested":
            path = out / name / spec.lesson_id / spec.notebook_name
        elif v.layout == "student":
            path = out / name / spec.notebook_name
        else:
            path = out / f"{name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(path))
    variants = [v for v, _ in nbs.values()]
    # inputs that never reach a kernel
    corrupt = out / "corrupt" / spec.lesson_id / spec.notebook_name
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text(nbformat.writes(spec.release)[:2000])
    variants.append(Variant("corrupt", "nested", "errored", reason_contains="not valid JSON"))
    (out / "missing" / spec.lesson_id).mkdir(parents=True)
    (out / "missing" / spec.lesson_id / "notes.txt").write_text("forgot to upload\n")
    variants.append(Variant("missing", "nested", "errored", reason_contains="missing notebook"))
    renamed = out / "renamed" / spec.lesson_id / f"{Path(spec.notebook_name).stem} (1).ipynb"
    renamed.parent.mkdir(parents=True)
    nbformat.write(base, str(renamed))
    variants.append(Variant("renamed", "nested", "errored", reason_contains="renamed"))
    (out / "expected.json").write_text(json.dumps({"lesson": spec.lesson_id, "total": total,
                                                   "threshold": spec.meta.passing_threshold,
                                                   "variants": [asdict(v) for v in variants]}, indent=1))
    return variants


def main(argv: list[str] | None = None) -> int:
    """Write the suite to OUT and list the variants with their expected outcomes."""
    from residual_bandwidth.course import DEFAULT_LESSON
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to (re)create")
    ap.add_argument("--lesson", default=DEFAULT_LESSON)
    args = ap.parse_args(argv)
    variants = generate(args.out, load_spec(args.lesson))
    for v in variants:
        print(f"{v.name:<24} expect {v.status:<8} score={v.score} pass={v.passed} {v.reason_contains}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
