"""The lesson notebook: metadata, grade cells, generated student version, execution and grading."""
from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from residual_bandwidth.course import LessonMetadataError, item_of, load_lesson, validate_lesson

ROOT = Path(__file__).resolve().parents[1]
META = load_lesson()
SOURCE = ROOT / "solutions" / META.lesson_id / META.notebook
RELEASE = ROOT / "lessons" / META.lesson_id / META.notebook
BIN = Path(sys.executable).parent
# headless runs: the explorer renders its static figure, not a widget that needs a live kernel
os.environ.setdefault("RESIDUAL_BANDWIDTH_STATIC", "1")
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}


def grade_cells(nb) -> dict[str, float]:
    return {c.metadata["nbgrader"]["grade_id"]: c.metadata["nbgrader"].get("points", 0)
            for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")}


def nbgrader(*args, cwd=ROOT):
    # nbgrader's own autograde of the notebook (nbgrader_config.py refuses it unless told, for instructors)
    r = subprocess.run([str(BIN / "nbgrader"), *args, "--log-level", "WARN"], cwd=cwd,
                       env={**ENV, "AUTOGRADER_PLAIN_NBGRADER": "1"},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


# ---- metadata ---------------------------------------------------------------------------------
def test_metadata_is_valid_and_complete():
    assert META.passing_threshold == 0.75
    assert set(META.objectives) == {"LO1", "LO2", "LO3"}
    assert set(META.objective_of) == set(META.items) and len(META.items) == 6


@pytest.mark.parametrize("mutate,pattern", [
    (lambda m: m["metadata"]["assessment"].__setitem__("passing_threshold", 1.5), "passing_threshold"),
    (lambda m: m["metadata"]["learning_objectives"][0]["assessment_mapping"].append("checkpoint_2"),
     "more than one learning objective"),
    (lambda m: m["metadata"]["learning_objectives"][0]["assessment_mapping"].append("quiz_9"), "disagree"),
    (lambda m: m["metadata"]["assessment"].__setitem__("formative_checkpoints", 4), "counts"),
    (lambda m: m["metadata"].pop("learning_objectives"), "learning_objectives"),
    (lambda m: m["metadata"]["identification"].__setitem__("unique_id", "Has Spaces"), "unique_id"),
])
def test_broken_metadata_is_rejected(mutate, pattern):
    raw = copy.deepcopy(META.raw)
    mutate(raw)
    with pytest.raises(LessonMetadataError, match=pattern):
        validate_lesson(raw)


# ---- grade cells and the mapping ------------------------------------------------------------------
def test_every_mapped_item_has_grade_cells_and_every_grade_cell_an_objective():
    cells = grade_cells(nbformat.read(SOURCE, 4))
    items = {item_of(g) for g in cells}
    assert items == set(META.objective_of), f"grade cells cover {sorted(items)}, metadata maps {sorted(META.objective_of)}"
    for gid in cells:
        assert META.objective_of[item_of(gid)] in META.objectives, gid
    for item in META.items:  # partial credit: a visible and a hidden test cell per item
        assert {f"{item}__visible", f"{item}__hidden"} <= set(cells), item


def test_threshold_line_is_meaningful():
    """Which combinations pass: all items but one (any one) pass; losing two whole items fails,
    and so does losing one item plus the hidden part of another (see solutions/README.md)."""
    cells = grade_cells(nbformat.read(SOURCE, 4))
    total = sum(cells.values())
    per_item = {i: sum(p for g, p in cells.items() if item_of(g) == i) for i in META.items}
    assert len(set(per_item.values())) == 1, "items are worth the same"
    passes = lambda score: score / total >= META.passing_threshold  # noqa: E731
    assert passes(total)
    for missing in META.items:
        assert passes(total - per_item[missing]), f"missing only {missing} should still pass"
    for a, b in itertools.combinations(META.items, 2):
        assert not passes(total - per_item[a] - per_item[b]), f"missing {a} and {b} should fail"
        assert not passes(total - per_item[a] - cells[f"{b}__hidden"]), f"missing {a} and {b}'s hidden tests should fail"


# ---- generation (the text source is checked in tests/test_lesson_render.py) --------------------------
def test_committed_student_version_equals_a_fresh_generation(tmp_path):
    nbgrader("generate_assignment", META.lesson_id, "--force",
             f"--CourseDirectory.release_directory={tmp_path / 'release'}",
             f"--CourseDirectory.db_url=sqlite:///{tmp_path / 'gb.db'}")
    fresh = (tmp_path / "release" / META.lesson_id / META.notebook).read_text()
    assert fresh == RELEASE.read_text(), "lessons/ is stale: run make notebooks (never edit lessons/ by hand)"


def test_student_version_has_no_solutions_or_hidden_tests():
    text = RELEASE.read_text()
    for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    # the text source (with solutions) is never released next to the notebook
    assert sorted(p.name for p in RELEASE.parent.iterdir()) == [META.notebook]
    src = nbformat.read(SOURCE, 4)
    rel = nbformat.read(RELEASE, 4)
    assert grade_cells(src) == grade_cells(rel)


def test_validation_passes_on_source_and_lists_every_item_of_the_untouched_student_version():
    """nbgrader's validator runs the student version as a student would (no hidden tests): the source
    passes, and on an untouched notebook Validate lists every exercise as not attempted yet (each visible
    test cell writes one stderr line then) instead of reporting success. tests/test_lesson_validate.py
    checks a half-done notebook too."""
    from nbgrader.validator import Validator
    from traitlets.config import Config
    # nbgrader's default is 30 s per cell; this test is about correctness, not a slow shared CPU
    config = Config({"Execute": {"timeout": 900}})
    assert Validator(config=config).validate(str(SOURCE)) == {}
    failed = Validator(config=config).validate(str(RELEASE)).get("failed", [])
    assert len(failed) == len(META.items) and all("not attempted yet" in f["raw_error"] for f in failed), failed


# ---- execution (the executed_source fixture is in conftest.py, shared with test_lesson_claims.py) ------

def test_source_runs_end_to_end_and_passes_visible_tests(executed_source):
    text = "\n".join(o.get("text", "") for c in executed_source.cells for o in c.get("outputs", []))
    for item in ("Checkpoint 1", "Checkpoint 3", "Q1", "Q2"):
        assert f"{item} visible tests passed" in text


def test_figures_carry_alt_text(executed_source):
    html = [o["data"]["text/html"] for c in executed_source.cells for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "text/html" in o.get("data", {})]
    imgs = [h for h in html if "<img" in h]
    assert imgs and all('alt="' in h and "<figcaption>" in h for h in imgs)


def test_run_all_on_the_untouched_student_version_reaches_the_end(tmp_path):
    """A student who has solved nothing can Run All: every code cell runs, no cell raises, and every
    exercise says it is not attempted yet (papermill stops at the first error, as JupyterLab does)."""
    import papermill as pm
    out = tmp_path / "student.ipynb"
    pm.execute_notebook(str(RELEASE), str(out), parameters={"MODEL": "embedded"}, kernel_name="python3",
                        progress_bar=False, cwd=str(RELEASE.parent))
    nb = nbformat.read(out, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), [c.id for c in code if not c.execution_count]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    def said(c):
        return [o["data"]["text/markdown"] for o in c.outputs
                if "text/markdown" in o.get("data", {}) and "not attempted yet" in o["data"]["text/markdown"]]
    # every visible test cell says so (Q3 twice: two functions), and so does each other cell that tries
    # an answer (Checkpoint 2 is also tried on the model)
    visible = [c for c in code if c.metadata.get("nbgrader", {}).get("grade_id", "").endswith("__visible")]
    assert len(visible) == len(META.items) and all(said(c) for c in visible), [c.id for c in visible if not said(c)]
    others = [c for c in code if c not in visible]
    assert sum(len(said(c)) for c in others) == sum(c.source.count("not_attempted(\"") for c in others) >= 1


def test_untouched_student_version_scores_zero_under_nbgrader_autograde(tmp_path):
    """"Not attempted" never earns points: the hidden part of each visible test cell calls the answer again."""
    from nbgrader.api import Gradebook
    db = f"sqlite:///{tmp_path / 'gb.db'}"
    common = [f"--CourseDirectory.db_url={db}", f"--CourseDirectory.release_directory={tmp_path / 'release'}",
              f"--CourseDirectory.submitted_directory={tmp_path / 'submitted'}",
              f"--CourseDirectory.autograded_directory={tmp_path / 'autograded'}", "--Execute.timeout=600"]
    nbgrader("generate_assignment", META.lesson_id, "--force", *common)
    sub = tmp_path / "submitted" / "student" / META.lesson_id
    sub.mkdir(parents=True)
    untouched = nbformat.read(RELEASE, 4)
    # what a student might try: claim the answers are "not attempted" on purpose, from an answer cell
    first_answer = next(c for c in untouched.cells if c.metadata.get("nbgrader", {}).get("solution"))
    first_answer.source = "import os\nos.environ['GRADING'] = '0'\n" + first_answer.source
    nbformat.write(untouched, sub / META.notebook)
    nbgrader("autograde", META.lesson_id, "--force", "--create", *common)
    with Gradebook(db) as gb:
        s = gb.find_submission(META.lesson_id, "student")
        assert s.score == 0, s.score


def test_source_scores_full_marks_under_nbgrader_autograde(tmp_path):
    from nbgrader.api import Gradebook
    db = f"sqlite:///{tmp_path / 'gb.db'}"
    common = [f"--CourseDirectory.db_url={db}", f"--CourseDirectory.release_directory={tmp_path / 'release'}",
              f"--CourseDirectory.submitted_directory={tmp_path / 'submitted'}",
              f"--CourseDirectory.autograded_directory={tmp_path / 'autograded'}"]
    nbgrader("generate_assignment", META.lesson_id, "--force", *common)
    sub = tmp_path / "submitted" / "instructor" / META.lesson_id
    sub.mkdir(parents=True)
    (sub / META.notebook).write_text(SOURCE.read_text())
    nbgrader("autograde", META.lesson_id, "--force", "--create", *common)
    with Gradebook(db) as gb:
        s = gb.find_submission(META.lesson_id, "instructor")
        total = sum(grade_cells(nbformat.read(SOURCE, 4)).values())
        assert s.max_score == total and s.score == total, (s.score, s.max_score)


def test_name_error_guide_names_the_cell_that_defines_each_name():
    """The notebook's first cell maps names to the cell that defines them, so running a cell too early
    says which cell to run first. Each mapped name must really be defined first in the section it names,
    and every name a section borrows from an earlier section must be mapped."""
    import ast
    import re
    nb = nbformat.read(SOURCE, 4)
    guide_cell = next(c for c in nb.cells if "FIRST_DEFINED_IN = {" in c.source)
    ns: dict = {}
    exec(compile(guide_cell.source.replace("get_ipython()", "None"), "guide", "exec"), ns)  # no kernel here
    guide = ns["FIRST_DEFINED_IN"]
    section, first_def, borrowed = "0", {}, set()
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.match(r"## (\d+)\.", c.source)
            section = m.group(1) if m else section
            continue
        if c is guide_cell or c.metadata.get("nbgrader", {}).get("grade") or c.metadata.get("nbgrader", {}).get("solution"):
            continue
        tree = ast.parse(c.source)
        defined = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.arg):  # lambda / function parameters
                defined.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        borrowed |= {(n, section) for n in used - defined if n in first_def and first_def[n] != section}
        for n in defined:
            first_def.setdefault(n, section)
    for name, where in guide.items():
        assert name in first_def, f"{name} is in the guide but no cell defines it"
        assert f"section {first_def[name]}" in where, f"{name} is defined in section {first_def[name]}, guide says {where!r}"
    missing = sorted({n for n, _ in borrowed if n not in guide and first_def[n] != "0"} - {"_"})
    assert not missing, f"names used in a later section but not in the guide: {missing}"
