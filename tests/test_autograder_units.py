"""Unit tests of the grader's parts: input discovery, static rules, the guard, probes, repair, results."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.check import recheck  # noqa: E402
from autograder.ingest.discover import InputError, discover, sanitize  # noqa: E402
from autograder.check.integrity import structural_findings  # noqa: E402
from autograder.ingest.notebook import (SubmissionError, drop_demo_cells, grade_id, load_spec, read_submission,  # noqa: E402
                                 repair, strip_solution_markers)
from autograder.check.probes import PROBES, compare_fields  # noqa: E402
from autograder.results.records import ERRORED, FLAGGED, GRADED, RunResult, StudentResult, write_results  # noqa: E402
from autograder.check.static import scan_notebook, scan_source  # noqa: E402
from autograder.check.threshold_suite import ALWAYS_EQUAL, CORRUPT, solved  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON, item_of  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
NB = SPEC.notebook_name
LID = SPEC.lesson_id


# ---- the spec follows the notebook and the metadata --------------------------------------------------
def test_spec_is_derived_from_notebook_and_metadata():
    assert SPEC.items and set(SPEC.items) <= set(SPEC.meta.items)
    assert SPEC.total_points == sum(g.points for g in SPEC.grade_cells.values())
    for gid, g in SPEC.grade_cells.items():
        assert g.item == item_of(gid)
    for a in SPEC.answer_cells.values():
        assert a.defines, f"{a.grade_id} defines nothing"
    assert {"check", "close"} <= SPEC.protected_names
    assert SPEC.demo_ids and not any(d in SPEC.grade_cells for d in SPEC.demo_ids)


# ---- discovery -------------------------------------------------------------------------------------------
def _nb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SPEC.release_path.read_text())


def test_discovers_nested_student_and_flat_layouts(tmp_path):
    _nb(tmp_path / "ann" / LID / NB)
    _nb(tmp_path / "ben" / NB)
    _nb(tmp_path / "cy.ipynb")
    _nb(tmp_path / "dee" / "deep" / "inside" / NB)
    _nb(tmp_path / "eve" / LID / "lesson-Copy1.ipynb")     # renamed
    (tmp_path / "fay" / LID).mkdir(parents=True)             # missing
    _nb(tmp_path / "ann" / LID / ".ipynb_checkpoints" / "lesson-checkpoint.ipynb")
    subs = {s.student: s for s in discover(tmp_path, LID, NB, tmp_path / "scratch")}
    assert set(subs) == {"ann", "ben", "cy", "dee", "eve", "fay"}
    assert subs["ann"].path == tmp_path / "ann" / LID / NB and subs["ann"].problem is None
    assert subs["dee"].path.name == NB
    assert "renamed" in subs["eve"].problem and "lesson-Copy1.ipynb" in subs["eve"].problem
    assert "missing" in subs["fay"].problem


def test_discovers_lms_names_and_zip_with_wrapper_folder(tmp_path):
    src = tmp_path / "src"
    _nb(src / "export" / "doejane_12345_67890_lesson.ipynb")                  # Canvas
    _nb(src / "export" / "Jo Smith_4242_assignsubmission_file_" / NB)         # Moodle
    _nb(src / "export" / "jo smith" / NB)                                    # sanitises to the same id
    z = tmp_path / "export.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in src.rglob("*.ipynb"):
            zf.write(f, f.relative_to(src))
    subs = {s.student: s for s in discover(z, LID, NB, tmp_path / "scratch")}
    # LMS entries are named by their LMS user id; a plain folder inside an LMS download is not guessed at
    assert sorted(subs) == ["canvas-12345", "jo_smith-" + sanitize_hash("jo smith"), "moodle-4242"], sorted(subs)
    assert subs["canvas-12345"].path.exists() and subs["moodle-4242"].path.exists()
    assert subs["moodle-4242"].display_name == "Jo Smith"
    assert "does not follow the naming" in subs["jo_smith-" + sanitize_hash("jo smith")].problem


def sanitize_hash(name: str) -> str:
    import hashlib
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def test_zip_with_unsafe_paths_is_refused(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../etc/evil.ipynb", "{}")
        zf.writestr("ann/lesson.ipynb", "{}")
    subs = {s.student: s for s in discover(z, LID, NB, tmp_path / "scratch")}   # per student, not the batch
    assert "points outside the zip" in subs["etc"].problem and subs["ann"].problem is None
    assert not (tmp_path / "etc").exists()


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nope", LID, NB, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no submissions"):
        discover(tmp_path / "empty", LID, NB, tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="not a .zip"):
        discover(tmp_path / "x.txt", LID, NB, tmp_path)
    assert sanitize("Ana María/../x") == "Ana_Mar_a_._x" and sanitize("///") == "student"


# ---- reading and preparing a submission ----------------------------------------------------------------
@pytest.mark.parametrize("content,match", [
    ("", "empty"), ('{"cells": [', "not valid JSON"), ("[1, 2]", "not a Jupyter notebook"),
    ('{"cells": [], "nbformat": 3}', "unsupported notebook format"), (b"\xff\xfe\x00", "not UTF-8"),
])
def test_unreadable_notebooks_are_rejected_with_a_reason(tmp_path, content, match):
    p = tmp_path / "x.ipynb"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SubmissionError, match=match):
        read_submission(p, 10**8)


def test_oversized_notebook_is_rejected(tmp_path):
    p = tmp_path / "x.ipynb"
    p.write_text(SPEC.release_path.read_text())
    with pytest.raises(SubmissionError, match="over the"):
        read_submission(p, 1000)


def test_repair_restores_deleted_nbgrader_cells_in_order():
    nb = copy.deepcopy(SPEC.release)
    first_item = SPEC.items[0]
    drop = {gid for gid in list(SPEC.locked_cells) + [g for g in SPEC.grade_cells if SPEC.grade_cells[g].item == first_item]
            + [a for a in SPEC.answer_cells if SPEC.answer_cells[a].item == first_item]}
    nb.cells = [c for c in nb.cells if grade_id(c) not in drop]
    found = {f.rule for f in structural_findings(nb, SPEC)}
    assert {"deleted-test-cell", "deleted-locked-cell", "deleted-answer-cell"} <= found
    fixed = repair(nb, SPEC)
    order = [grade_id(c) for c in fixed.cells if grade_id(c)]
    assert order == [grade_id(c) for c in SPEC.release.cells if grade_id(c)]


def test_fast_mode_drops_only_source_demo_cells():
    nb = copy.deepcopy(SPEC.release)
    mine = nbformat.v4.new_code_cell("x = 1  # my own cell")
    nb.cells.insert(5, mine)
    edited = next(c for c in nb.cells if c.get("id") in SPEC.demo_ids)
    fast = drop_demo_cells(nb, SPEC)
    kept = {c.get("id") for c in fast.cells}
    assert mine.id in kept
    assert not kept & SPEC.demo_ids
    assert all(grade_id(c) in kept or c.get("id") in kept for c in nb.cells if grade_id(c))
    assert edited.get("id") not in kept
    # without ids (old editors), unchanged demo cells are still recognised by their source
    for c in nb.cells:
        c.pop("id", None)
    assert not any(c.cell_type == "code" and not grade_id(c) and c.source.strip() == d.source.strip()
                   for c in drop_demo_cells(nb, SPEC).cells for d in SPEC.source.cells if d.get("id") in SPEC.demo_ids)


def test_structure_findings_for_edited_and_forged_cells():
    nb = copy.deepcopy(SPEC.release)
    test_cell = next(c for c in nb.cells if grade_id(c) in SPEC.grade_cells)
    test_cell.source = "pass"
    test_cell.metadata.nbgrader["points"] = 100
    forged = nbformat.v4.new_code_cell("pass")
    forged.metadata["nbgrader"] = {"grade": True, "grade_id": "bonus__x", "points": 50, "solution": False,
                                   "locked": False, "schema_version": 3}
    nb.cells.append(forged)
    rules = {f.rule for f in structural_findings(nb, SPEC)}
    assert {"edited-test-cell", "edited-test-metadata", "unknown-nbgrader-cell"} <= rules
    assert structural_findings(copy.deepcopy(SPEC.release), SPEC) == []


# ---- static checks ---------------------------------------------------------------------------------------
def test_solutions_and_the_released_notebook_raise_no_flags():
    for gid, cell in ((grade_id(c), c) for c in SPEC.source.cells if grade_id(c) in SPEC.answer_cells):
        flags = [f for f in scan_source(strip_solution_markers(cell.source), gid, SPEC.protected_names) if f.flag]
        assert not flags, (gid, flags)
    assert scan_notebook(SPEC.release, SPEC) == []
    assert not [f for f in scan_notebook(solved(SPEC), SPEC) if f.flag]
    assert not [f for f in scan_notebook(solved(SPEC, "_variant_corrupt", CORRUPT), SPEC) if f.flag]


@pytest.mark.parametrize("code,rule", [
    ("check = lambda *a, **k: True", "assign-protected-name"),
    ("def close(a, b, **k):\n    return True", "assign-protected-name"),
    ("from unittest.mock import MagicMock as check", "assign-protected-name"),
    ("import cupy as np", "assign-protected-name"),
    ("np.testing.assert_allclose = lambda *a, **k: None", "patch-module"),
    ("torch.allclose = lambda *a, **k: True", "patch-module"),
    ("import builtins\nbuiltins.abs = lambda x: 0", "patch-module"),
    ("setattr(torch, 'allclose', lambda *a: True)", "patch-module"),
    ("globals()['check'] = print", "patch-module"),
    ("torch.Tensor.__eq__ = lambda *a: True", "patch-module"),
    ("class F(float):\n    def __eq__(self, o):\n        return True", "comparison-override"),
    ("F = type('F', (float,), {'__eq__': lambda s, o: True})", "comparison-override"),
    ("get_ipython().input_transformers_cleanup.append(lambda l: [])", "ipython-hooks"),
    ("ip = get_ipython()\nip.events.register('pre_run_cell', print)", "ipython-hooks"),
    ("import sys\nv = sys._getframe(1).f_locals['ref']", "frame-inspection"),
    ("import inspect\nref = inspect.stack()[1]", "frame-inspection"),
    ("exec(open('x').read())", "dynamic-code"),
    ("src = open('../../solutions/x/lesson.ipynb').read()", "reads-protected"),
    ("p = 'sol' + 'utions'", "reads-protected"),
    ("!cat ../solutions/lesson.ipynb", "reads-protected"),
    ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)", "signal-handling"),
    ("import builtins\nvars(builtins)['abs'] = lambda x: 0", "patch-module"),
    ("import builtins\nb = vars(builtins)\nb['abs'] = lambda x: 0", "patch-module"),
    ("import builtins as B\nns = B.__dict__\nns['abs'] = lambda x: 0", "patch-module"),
])
def test_static_rules_catch_each_technique(code, rule):
    sandboxed = rule not in ("reads-protected", "signal-handling")   # notes under the sandbox, flags without it
    findings = scan_source(code, "cell", SPEC.protected_names, SPEC.protected_imports, sandboxed=sandboxed)
    assert rule in {f.rule for f in findings if f.flag}, findings


@pytest.mark.parametrize("code,rule", [
    ("raise ValueError('see the solutions of checkpoint 1: use sigma squared')", "reads-protected"),
    ("msg = 'compare with ' + 'solutions'", "reads-protected"),
    ("import importlib\nimportlib.reload(rb)", "dynamic-import"),
    ("import signal\nsignal.alarm(0)\nsignal.signal(signal.SIGALRM, lambda *a: None)", "signal-handling"),
])
def test_with_the_sandbox_rules_about_reaching_the_grader_are_notes(code, rule):
    """Honest code that names 'solutions' in a message, or reloads a module, is never flagged."""
    findings = scan_source(code, "cell", SPEC.protected_names, SPEC.protected_imports, sandboxed=True)
    assert rule in {f.rule for f in findings if not f.flag}, findings
    assert not [f for f in findings if f.flag], findings


@pytest.mark.parametrize("code", [
    "def f(x):\n    check = x  # a local name is fine\n    return check",
    "import re\npattern = re.compile('a+')",
    "y = np.stack([np.ones(3)]).sum()",
    "class Monitor:\n    def __init__(self):\n        self.events = []",
    "print('solution of the exercise')",
    "!pip list",
    "import numpy as np\nimport torch\nfrom sklearn.decomposition import PCA\nimport residual_bandwidth as rb",
])
def test_static_rules_leave_ordinary_code_alone(code):
    assert not [f for f in scan_source(code, "cell", SPEC.protected_names, SPEC.protected_imports) if f.flag]


# ---- the guard -------------------------------------------------------------------------------------------
def test_guard_blocks_protected_paths_and_logs_them(tmp_path):
    secret, allowed = tmp_path / "solutions", tmp_path / "work"
    secret.mkdir()
    allowed.mkdir()
    (secret / "answer.txt").write_text("42")
    (allowed / "mine.txt").write_text("ok")
    (allowed / "lesson.ipynb").write_text("{}")
    log = tmp_path / "guard.jsonl"
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from autograder.isolate import guard
        guard.install([{str(secret)!r}, {str(tmp_path)!r}], [{str(allowed)!r}], {str(log)!r})
        results = []
        for attempt in (lambda: open({str(secret / 'answer.txt')!r}).read(),
                        lambda: os.listdir({str(secret)!r}),
                        lambda: open({str(allowed / 'lesson.ipynb')!r}).read(),
                        lambda: open('/proc/1/environ').read(),
                        lambda: subprocess.run(['cat', {str(secret / 'answer.txt')!r}]),
                        lambda: open({str(allowed / 'mine.txt')!r}).read()):
            try:
                attempt()
                results.append('ok')
            except PermissionError:
                results.append('blocked')
        print(','.join(results))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == "blocked,blocked,blocked,blocked,blocked,ok", r.stdout + r.stderr
    from autograder.isolate.guard import read_log
    assert sum(1 for e in read_log(log) if e["blocked"]) == 5


# ---- probes and the out-of-kernel re-check ---------------------------------------------------------------
def test_compare_fields():
    want = {"r": (3, 4), "u": 0.5, "level": "ok"}
    assert compare_fields({"r": 4, "u": 0.5000000001, "level": "ok"}, want, ranks=("r",), floats=("u",),
                          exact=("level",)) is None
    assert "expected 3..4" in compare_fields({"r": 5, "u": 0.5, "level": "ok"}, want, ranks=("r",))
    assert "missing key" in compare_fields({"u": 0.5}, want, floats=("u",), ranks=("r",))
    assert "expected a dict" in compare_fields([1], want, floats=("u",))
    assert compare_fields({"u": True}, {"u": 1.0}, floats=("u",)) is not None   # bools are not numbers


def _recheck(nb, tmp_path, seed=3):
    probes = recheck.ProbeSet.build(SPEC, seed)
    guard = {"protect": [str(ROOT / "solutions")], "allow": [str(tmp_path)], "log": str(tmp_path / "g.jsonl")}
    running = recheck.start(nb, SPEC, probes, tmp_path / "rc", guard, timeout=240, memory_bytes=4 * 1024**3,
                            case_timeout=30, cell_timeout=60)
    return recheck.finish(running, probes, SPEC)


def test_recheck_passes_the_solution_and_catches_wrong_and_always_equal_answers(tmp_path):
    assert set(PROBES) & set(SPEC.items), "no probe matches an item of the notebook"
    good, _ = _recheck(solved(SPEC), tmp_path / "good")
    for item in SPEC.items:
        assert good[item].verdict == ("pass" if item in PROBES else "no-probe"), (item, good[item])
    wrong, _ = _recheck(solved(SPEC, "_variant_corrupt", CORRUPT), tmp_path / "wrong")
    for item in set(PROBES) & set(SPEC.items):
        assert wrong[item].verdict == "mismatch", (item, wrong[item])
    eq, _ = _recheck(solved(SPEC, "_variant_always_equal", ALWAYS_EQUAL), tmp_path / "eq")
    assert eq["checkpoint_1"].verdict == "mismatch" and "effective_rank" in eq["checkpoint_1"].detail
    stub, _ = _recheck(SPEC.release, tmp_path / "stub")
    for item in set(PROBES) & set(SPEC.items):
        assert stub[item].verdict == "error" and "NotImplementedError" in stub[item].detail


def test_plain_conversion_strips_always_equal_objects():
    import numpy as np
    import torch
    from autograder.check.recheck_runner import make_plain
    plain = make_plain(torch, np)

    class Eq(int):
        def __eq__(self, other):
            return True

    class EqF(float):
        def __eq__(self, other):
            return True

    out = plain({"a": Eq(3), "b": EqF(2.5), "c": torch.tensor([1.0, 2.0]), "d": np.float32(1.5), "e": [Eq(1)]})
    assert out == {"a": 3, "b": 2.5, "c": [1.0, 2.0], "d": 1.5, "e": [1]}
    assert type(out["a"]) is int and type(out["b"]) is float and type(out["e"][0]) is int
    assert json.loads(json.dumps(out)) == out
    with pytest.raises(TypeError, match="not plain data"):
        plain(object())


# ---- results -----------------------------------------------------------------------------------------------
def test_exit_codes_and_csv(tmp_path):
    def run(*statuses):
        students = [StudentResult(f"s{i}", f"s{i}", st) for i, st in enumerate(statuses)]
        return RunResult(LID, 0.75, "fast", 1, 24, {}, {"LO1": "x"}, [], students)
    assert run(GRADED).exit_code() == 0
    assert run(GRADED, FLAGGED).exit_code() == 3
    assert run(FLAGGED, ERRORED).exit_code() == 2
    r = run(GRADED, ERRORED)
    r.students[0].score, r.students[0].max_score, r.students[0].percent, r.students[0].passed = 18, 24, 75.0, True
    r.students[0].objectives = {"LO1": {"score": 8, "max_score": 8}}
    j, c = write_results(r, tmp_path)
    rows = c.read_text().splitlines()
    assert rows[0].startswith("student,submitted_as,status,score,max_score,percent,pass,LO1_score,LO1_max")
    assert rows[1].startswith("s0,s0,graded,18,24,75.00,yes,8,8") and rows[2].startswith("s1,s1,errored,,,,,")
    assert json.loads(j.read_text())["counts"] == {"graded": 1, "flagged": 0, "errored": 1}


# ---- the operating-system sandbox (bubblewrap) -----------------------------------------------------------
from autograder.isolate import sandbox  # noqa: E402

needs_bwrap = pytest.mark.skipif(not sandbox.probe(Path("/tmp"))[0], reason="bubblewrap does not work here")


def _in_box(tmp_path, code: str, limits: "sandbox.Limits | None" = None, timeout: float = 60):
    box = sandbox.Box(tmp_path / "scratch", "/tmp/work", limits or sandbox.Limits())
    sandbox.prepare_scratch(box)
    return subprocess.run(sandbox.command([sys.executable, "-c", textwrap.dedent(code)], box), capture_output=True,
                          text=True, timeout=timeout), box


@needs_bwrap
def test_sandbox_view_holds_only_what_the_code_needs(tmp_path):
    r, box = _in_box(tmp_path, f"""
        import json, os, socket
        import numpy, torch, residual_bandwidth
        out = {{"uid": os.getuid(), "cwd": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
               "repo": sorted(os.listdir({str(ROOT)!r})), "package": sorted(os.path.relpath(os.path.join(d, f), {str(ROOT / "autograder")!r})
                                  for d, _, fs in os.walk({str(ROOT / "autograder")!r}) for f in fs),
               "solutions": os.path.exists({str(ROOT / "solutions")!r}), "git": os.path.exists({str(ROOT / ".git")!r}),
               "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
               "static": os.environ.get("RESIDUAL_BANDWIDTH_STATIC"),
               "widgets": __import__("residual_bandwidth.course.explorer", fromlist=["x"]).widget_frontend_available()}}
        open("mine.txt", "w").write("ok")
        for target in ("/usr/pwned", {str(ROOT / "lib" / "pwned.py")!r}, "/etc/pwned"):
            try:
                open(target, "w")
                out[target] = "written"
            except OSError as e:
                out[target] = type(e).__name__
        try:
            socket.create_connection(("127.0.0.1", 22), timeout=2)
            out["net"] = "connected"
        except OSError as e:
            out["net"] = type(e).__name__
        try:
            os.kill(1, 9)
            out["kill1"] = "sent"
        except OSError as e:
            out["kill1"] = type(e).__name__
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["uid"] == box.uid and sandbox.UID_RANGE[0] <= out["uid"] < sandbox.UID_RANGE[1]
    assert out["cwd"] == "/tmp/work" and (tmp_path / "scratch" / "mine.txt").read_text() == "ok"
    # the venv is mounted read-only wherever it lives; `make` puts it inside the repository (.venv)
    venv = Path(sys.prefix).resolve()
    in_repo = [venv.relative_to(ROOT).parts[0]] if venv.is_relative_to(ROOT) else []
    assert out["repo"] == sorted(["autograder", "lib", *in_repo]) and out["package"] == sorted(sandbox.PACKAGE_FILES)
    assert not out["solutions"] and not out["git"]
    assert out["pid"] <= 3 and len(out["procs"]) <= 3, out["procs"]   # its own PID namespace: bwrap init + itself
    assert out["/usr/pwned"] != "written" and out[str(ROOT / "lib" / "pwned.py")] != "written"
    assert out["/etc/pwned"] != "written"
    assert out["net"] != "connected" and out["kill1"] == "PermissionError"
    # no front end in a grading box: the explorer shows its static view and draws nothing in the background
    assert out["static"] == "1" and out["widgets"] is False


@needs_bwrap
def test_sandbox_limits_bind(tmp_path):
    limits = sandbox.Limits(memory_bytes=1 * 1024**3, processes=40, file_bytes=1024**2, cpu_seconds=2)
    r, _ = _in_box(tmp_path, """
        import json, os, time
        out = {}
        try:
            bytearray(2 * 1024**3)
            out["memory"] = "allocated"
        except MemoryError:
            out["memory"] = "MemoryError"
        try:
            open("big", "wb").write(b"x" * (2 * 1024**2))
            out["file"] = "written"
        except OSError as e:
            out["file"] = type(e).__name__
        kids = 0
        for i in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(5)
                os._exit(0)
            kids += 1
        out["forks"] = kids
        print(json.dumps(out), flush=True)
        while True:   # CPU time limit: killed by SIGXCPU
            pass
    """, limits)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["memory"] == "MemoryError" and out["file"] == "OSError", out
    assert 0 < out["forks"] < 40, out     # RLIMIT_NPROC binds (it would not for root)
    assert r.returncode != 0              # the busy loop was stopped by RLIMIT_CPU


@needs_bwrap
def test_everything_in_a_sandbox_dies_with_it(tmp_path):
    """A setsid double fork inside outlives its parent but not the sandbox."""
    marker = f"sandbox-orphan-{os.getpid()}"
    box = sandbox.Box(tmp_path / "scratch", "/tmp/work")
    sandbox.prepare_scratch(box)
    code = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/usr/bin/sleep', ['sleep', '300'])\n    os._exit(0)\nos.wait()\ntime.sleep(0.5)")
    r = subprocess.run(sandbox.command([sys.executable, "-c", code], box), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import psutil
    time.sleep(0.3)
    left = [p for p in psutil.process_iter(["uids", "name"]) if p.info["uids"] and p.info["uids"].real == box.uid]
    assert not left, (marker, left)


def test_grading_refuses_to_run_without_a_working_sandbox(tmp_path):
    """Fail closed: no bwrap on PATH and no --sandbox off -> exit 1 naming the problem, nothing graded."""
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "ann.ipynb").write_text(SPEC.release_path.read_text())
    venv_bin = str(Path(sys.executable).parent)
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(tmp_path / "subs"), "--out", str(tmp_path / "out"),
                        "--quiet"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PATH": venv_bin},
                       timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "sandbox does not work" in r.stderr and "--sandbox off" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / "results.json").exists()


def test_sandbox_off_says_what_is_not_guaranteed(tmp_path):
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "ann.ipynb").write_text('{"cells": [')    # corrupt: no kernel needed
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(tmp_path / "subs"), "--out", str(tmp_path / "out"),
                        "--quiet", "--sandbox", "off", "--no-recheck"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "WITHOUT the operating-system sandbox" in r.stderr and "setsid" in r.stderr


def test_re_check_notes_name_the_students_own_cell_number(tmp_path):
    """The student counts cells from 1 in the notebook they handed in; a deleted and put-back cell, or a
    demo cell dropped in fast mode, must not shift the number the re-check's notes give."""
    from autograder.ingest.discover import Submission
    from autograder.pipeline import read_and_prepare   # the real preparation (repair, fast mode, labels)
    nb = solved(SPEC)
    added = nbformat.v4.new_code_cell("x_mine = 1")
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("my notes"))
    nb.cells.insert(1, added)
    path = tmp_path / "lesson.ipynb"
    nbformat.write(nb, str(path))
    ctx = type("Ctx", (), {"spec": SPEC, "opts": type("O", (), {"max_notebook_mb": 50, "mode": "fast"})()})()
    _, prepared = read_and_prepare(Submission("s", "s", path), ctx)
    labels = [label for kind, label, _ in recheck.steps_of(prepared, SPEC) if kind == "cell"]
    assert f"cell 2 (id {added.id})" in labels, labels
    answer_gid = next(iter(SPEC.answer_cells))
    own = next(i for i, c in enumerate(nb.cells, 1) if grade_id(c) == answer_gid)
    assert f"cell {own} ({answer_gid})" in labels, labels
