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
    r = subprocess.run([str(BIN / "nbgrader"), *args, "--log-level", "WARN"], cwd=cwd, env=ENV,
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


# ---- authoring and generation ---------------------------------------------------------------------
def test_source_notebook_matches_its_author_script():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "author_lesson.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


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
    src = nbformat.read(SOURCE, 4)
    rel = nbformat.read(RELEASE, 4)
    assert grade_cells(src) == grade_cells(rel)


def test_validation_passes_on_source_and_fails_on_student_version():
    from nbgrader.validator import Validator
    from traitlets.config import Config
    # nbgrader's default is 30 s per cell; this test is about correctness, not a slow shared CPU
    config = Config({"Execute": {"timeout": 900}})
    assert Validator(config=config).validate(str(SOURCE)) == {}
    result = Validator(config=config).validate(str(RELEASE))
    visible = [g for g in grade_cells(nbformat.read(RELEASE, 4)) if g.endswith("__visible")]
    assert len(result.get("failed", [])) == len(visible), result


# ---- execution ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def executed_source(tmp_path_factory):
    import papermill as pm
    out = tmp_path_factory.mktemp("pm") / "executed.ipynb"
    pm.execute_notebook(str(SOURCE), str(out), parameters={"MODEL": "embedded"}, kernel_name="python3",
                        progress_bar=False, cwd=str(SOURCE.parent))
    return nbformat.read(out, 4)


def test_source_runs_end_to_end_and_passes_visible_tests(executed_source):
    text = "\n".join(o.get("text", "") for c in executed_source.cells for o in c.get("outputs", []))
    for item in ("Checkpoint 1", "Checkpoint 3", "Q1", "Q2"):
        assert f"{item} visible tests passed" in text


def test_figures_carry_alt_text(executed_source):
    html = [o["data"]["text/html"] for c in executed_source.cells for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "text/html" in o.get("data", {})]
    imgs = [h for h in html if "<img" in h]
    assert imgs and all('alt="' in h and "<figcaption>" in h for h in imgs)


def test_student_version_fails_only_with_not_implemented(tmp_path):
    import papermill as pm
    out = tmp_path / "student.ipynb"
    try:  # allow_errors runs every cell; papermill still raises at the end, after writing the output
        pm.execute_notebook(str(RELEASE), str(out), parameters={"MODEL": "embedded"}, kernel_name="python3",
                            progress_bar=False, cwd=str(RELEASE.parent), allow_errors=True)
    except pm.PapermillExecutionError:
        pass
    nb = nbformat.read(out, 4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors, "the untouched student version should raise NotImplementedError somewhere"
    assert {e["ename"] for e in errors} == {"NotImplementedError"}, [e["ename"] + ": " + e["evalue"] for e in errors]


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
