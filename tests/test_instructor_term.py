"""The instructor's term, as one test (issue 21 item 8), with the guide's commands as written.

A Moodle download of a mixed class (three correct answers written in different styles, typical
mistakes, a weak submission, an exception, an infinite loop, two students both called "Wei Chen",
a notebook saved by Colab) is graded with ``python -m autograder grade``; then a late batch
(``--late``), a resubmission re-graded, a manual adjustment (``python -m autograder override``), the
Moodle grade file read back as an LMS would, the feedback pages and the class report. Asserted: the
final table of grades and statuses; rows of students a step did not touch stay byte-identical;
nothing is lost; the same export twice is the same file.

Expected scores are derived from the answers' own expectations (tests/fair_grading_answers.py: 4 full,
1 visible only, 0 caught by the visible tests), written independently of the grader.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from autograder.ingest.notebook import grade_id, load_spec  # noqa: E402
from autograder.results.feedback_html import CSP, add_csp  # noqa: E402
from autograder.check.scoring import exercise_titles  # noqa: E402
from autograder.check.threshold_suite import solved  # noqa: E402
from fair_grading_answers import ANSWERS  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402
from test_fair_grading import STUB, named, submission  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
LESSON, NB = SPEC.lesson_id, SPEC.notebook_name
FULL = SPEC.total_points
ITEM = {i: SPEC.item_points(i) for i in SPEC.items}


def style(k: int) -> dict:
    """The k-th correct answer of every item (numpy, scikit-learn, eigvalsh, float32 ... styles)."""
    out = {}
    for item in SPEC.items:
        correct = [a for a in ANSWERS if a.item == item and a.expect == ITEM[item]]
        out[item] = correct[k % len(correct)].code
    return out


def answer_cell(nb, item: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if grade_id(c) in SPEC.answer_cells and SPEC.answer_cells[grade_id(c)].item == item)


def with_answer(nb, item: str, code: str):
    nb = copy.deepcopy(nb)
    answer_cell(nb, item).source = code
    return nb


def colab_bytes(nb) -> bytes:
    """How Colab saves a notebook: nbformat 4.0 (no cell ids; Colab keeps its own in metadata.id),
    Colab's notebook metadata, outputs kept."""
    d = json.loads(nbformat.writes(nb))
    d["nbformat_minor"] = 0
    d["metadata"] = {"colab": {"provenance": [], "name": "lesson.ipynb"},
                     "kernelspec": {"name": "python3", "display_name": "Python 3"}, "language_info": {"name": "python"}}
    for k, c in enumerate(d["cells"]):
        c.setdefault("metadata", {})["id"] = f"colab{k:04d}"
        c.pop("id", None)
    return json.dumps(d, indent=2).encode()


def moodle_zip(path: Path, entries: dict[str, bytes]) -> Path:
    """A Moodle "download all submissions" zip: ``<Full Name>_<participant id>_assignsubmission_file_/<file>``."""
    with zipfile.ZipFile(path, "w") as z:
        for folder, data in entries.items():
            z.writestr(f"{folder}_assignsubmission_file_/{NB}", data)
    return path


def nb_bytes(nb) -> bytes:
    return nbformat.writes(nb).encode()


# name -> (moodle folder, notebook bytes, expected score, expected status)
def the_class() -> dict:
    ref = solved(SPEC)
    weak = submission({"checkpoint_1": STUB, "checkpoint_2": STUB, "summative_q1": STUB})
    typical = submission({"checkpoint_1": named("checkpoint_1", "ignores_p").code,
                          "checkpoint_3": named("checkpoint_3", "ignores_p").code,
                          "summative_q1": named("summative_q1", "drops_small_values").code})
    hidden_two = submission({"checkpoint_1": named("checkpoint_1", "ignores_p").code,
                             "checkpoint_3": named("checkpoint_3", "ignores_p").code})
    e1, e3 = named("checkpoint_1", "ignores_p").expect, named("checkpoint_3", "ignores_p").expect
    eq1 = named("summative_q1", "drops_small_values").expect
    return {
        "moodle-1001": ("Ada Lovelace_1001", nb_bytes(ref), FULL),
        "moodle-1002": ("Grace Hopper_1002", nb_bytes(submission(style(0))), FULL),
        "moodle-1003": ("Alan Turing_1003", nb_bytes(submission(style(1))), FULL),
        "moodle-1004": ("Wei Chen_1004", nb_bytes(hidden_two), FULL - ITEM["checkpoint_1"] - ITEM["checkpoint_3"] + e1 + e3),
        "moodle-1005": ("Wei Chen_1005", nb_bytes(ref), FULL),
        "moodle-1006": ("Tess Typical_1006", nb_bytes(typical),
                        FULL - ITEM["checkpoint_1"] - ITEM["checkpoint_3"] - ITEM["summative_q1"] + e1 + e3 + eq1),
        "moodle-1007": ("Will Weak_1007", nb_bytes(weak),
                        FULL - ITEM["checkpoint_1"] - ITEM["checkpoint_2"] - ITEM["summative_q1"]),
        "moodle-1008": ("Rae Raises_1008", nb_bytes(with_answer(ref, "summative_q2", 'raise RuntimeError("ran out of time")')),
                        FULL - ITEM["summative_q2"]),
        "moodle-1009": ("Lou Loop_1009", nb_bytes(with_answer(ref, "checkpoint_3", "while True:\n    pass\n")),
                        FULL - ITEM["checkpoint_3"]),
        "moodle-1010": ("Col Colab_1010", colab_bytes(ref), FULL),
    }


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "MPLBACKEND": "Agg"})


def grade(subs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    r = cli("grade", str(subs), "--out", str(out), "--jobs", "2", "--cell-timeout", "20", "--timeout", "300",
            "--quiet", *extra)
    assert (out / "results.csv").exists(), r.stdout + r.stderr
    return r


def rows(out: Path) -> dict[str, str]:
    """results.csv: student id -> the whole CSV line as written."""
    lines = (out / "results.csv").read_text(encoding="utf-8").splitlines()
    return {next(csv.reader([ln]))[0]: ln for ln in lines[1:]}


def by_student(out: Path) -> dict[str, dict]:
    return {s["student"]: s for s in json.loads((out / "results.json").read_text())["students"]}


@pytest.fixture(scope="module")
def term(tmp_path_factory):
    base = tmp_path_factory.mktemp("term")
    out = base / "results"
    cls = the_class()
    steps = {}
    # 1. the class, as Moodle's download
    moodle_zip(base / "class.zip", {folder: data for folder, data, _ in cls.values()})
    steps["class"] = grade(base / "class.zip", out)
    steps["after_class"] = (rows(out), by_student(out))
    # 2. a late batch: one more student, marked late
    moodle_zip(base / "late.zip", {"Lee Late_1011": nb_bytes(solved(SPEC))})
    steps["late"] = grade(base / "late.zip", out, "--late")
    steps["after_late"] = (rows(out), by_student(out))
    # 3. Wei Chen (1004) resubmits a corrected notebook: graded again, the other Wei Chen untouched
    moodle_zip(base / "resubmit.zip", {"Wei Chen_1004": nb_bytes(solved(SPEC))})
    steps["regrade"] = grade(base / "resubmit.zip", out)
    steps["after_regrade"] = (rows(out), by_student(out))
    # 4. a manual adjustment: the instructor accepts Lou's checkpoint 3 after reading it
    steps["override"] = cli("override", "moodle-1009", "checkpoint_3", str(ITEM["checkpoint_3"]), "--reason",
                            "loop was a debugging leftover; the function is right", "--by", "instructor", "--out", str(out))
    steps["final"] = (rows(out), by_student(out))
    exported = {f: (out / f).read_bytes() for f in ("results.csv", "results.json", "moodle_grades.csv")}
    steps["export"] = cli("export", "--out", str(out))
    steps["exported_again"] = {f: (out / f).read_bytes() for f in exported}
    steps["exported"] = exported
    return base, out, cls, steps


def test_every_step_ran_with_the_guides_commands(term):
    _, _, _, steps = term
    for name in ("class", "late", "regrade", "override", "export"):
        r = steps[name]
        assert r.returncode in (0, 3), f"{name}: exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"


def test_the_class_is_graded_as_a_careful_reader_would(term):
    _, _, cls, steps = term
    first = steps["after_class"][1]
    assert set(first) == set(cls)
    for sid, (_, _, want) in cls.items():
        s = first[sid]
        assert s["status"] == "graded", (sid, s["status"], s["reason"], s["evidence"])
        assert s["score"] == want, (sid, s["score"], want, [(i["item"], i["score"]) for i in s["items"]], s["notes"])


def test_same_name_students_keep_their_own_grades(term):
    _, _, cls, steps = term
    first = steps["after_class"][1]
    assert first["moodle-1004"]["display_name"] == first["moodle-1005"]["display_name"] == "Wei Chen"
    assert first["moodle-1004"]["score"] != first["moodle-1005"]["score"]
    final = steps["final"][1]
    assert final["moodle-1004"]["score"] == FULL and final["moodle-1005"]["score"] == FULL
    assert steps["after_regrade"][0]["moodle-1005"] == steps["after_class"][0]["moodle-1005"]


def test_an_infinite_loop_costs_its_exercise_only_and_says_which(term):
    _, out, _, steps = term
    s = steps["after_class"][1]["moodle-1009"]
    title = exercise_titles(SPEC)["checkpoint_3"]   # as the student reads it in the notebook
    assert s["status"] == "graded" and s["score"] == FULL - ITEM["checkpoint_3"]
    item = next(i for i in s["items"] if i["item"] == "checkpoint_3")
    assert item["score"] == 0 and any(title in n for n in item["notes"]), item
    page = out / "feedback" / "moodle-1009" / LESSON / "lesson.html"
    assert page.exists() and title in page.read_text(encoding="utf-8")


def test_late_batch_and_regrade_change_only_their_students(term):
    _, _, cls, steps = term
    after_class, after_late, after_regrade = (steps[k][0] for k in ("after_class", "after_late", "after_regrade"))
    assert len(after_late) == len(cls) + 1 and len(after_regrade) == len(cls) + 1
    assert {k: v for k, v in after_late.items() if k != "moodle-1011"} == after_class
    assert {k: v for k, v in after_regrade.items() if k != "moodle-1004"} == \
        {k: v for k, v in after_late.items() if k != "moodle-1004"}
    late = steps["after_late"][1]["moodle-1011"]
    assert late["late"] is True and late["score"] == FULL
    assert not any(s["late"] for k, s in steps["after_late"][1].items() if k != "moodle-1011")


def test_the_manual_adjustment_reaches_every_export_and_is_logged(term):
    _, out, _, steps = term
    s = steps["final"][1]["moodle-1009"]
    assert s["score"] == FULL and s["pass"] is True
    log = json.loads((out / "results.json").read_text())["overrides_log"]
    assert [(o["student"], o["item"], o["by"]) for o in log] == [("moodle-1009", "checkpoint_3", "instructor")]
    assert "debugging leftover" in log[0]["reason"]
    assert {k: v for k, v in steps["final"][0].items() if k != "moodle-1009"} == \
        {k: v for k, v in steps["after_regrade"][0].items() if k != "moodle-1009"}


def test_moodle_grade_file_reads_back_as_an_lms_would(term):
    _, out, cls, steps = term
    with io.StringIO((out / "moodle_grades.csv").read_text(encoding="utf-8")) as f:
        table = list(csv.DictReader(f))
    got = {r["Identifier"]: r for r in table}
    assert len(got) == len(cls) + 1
    final = steps["final"][1]
    for sid, s in final.items():
        r = got[f"Participant {sid.split('-', 1)[1]}"]
        assert float(r["Grade"]) == s["score"] and float(r["Maximum Grade"]) == FULL
        assert r["late"] == ("yes" if sid == "moodle-1011" else "no")
    assert sorted(r["Full name"] for r in table).count("Wei Chen") == 2


def test_every_graded_student_has_a_feedback_page_with_their_score(term):
    _, out, _, steps = term
    for sid, s in steps["final"][1].items():   # the store's grade: the override rewrote moodle-1009's page
        page = out / "feedback" / sid / LESSON / "lesson.html"
        assert page.exists(), sid
        text = page.read_text(encoding="utf-8")
        assert add_csp(text) == text and "script-src 'none'" in CSP, sid   # no script runs (feedback_html.CSP)
        if s["status"] != "errored":
            assert f"Your score: <strong>{s['score']:g} of" in text, sid


def test_the_adjusted_grade_and_its_reason_are_on_the_students_page(term):
    _, out, _, steps = term
    assert "feedback page written again" in steps["override"].stdout, steps["override"].stdout
    text = (out / "feedback" / "moodle-1009" / LESSON / "lesson.html").read_text(encoding="utf-8")
    assert f"Your score: <strong>{FULL:g} of {FULL:g} points" in text
    assert "Your instructor set this exercise to" in text and "debugging leftover" in text
    assert text.count("Your instructor set this exercise") == 1   # only the adjusted exercise says so


def test_class_report_and_exports_are_views_of_the_whole_store(term):
    _, out, cls, steps = term
    assert steps["exported"] == steps["exported_again"]           # the same store, the same files
    page = (out / "class_report.html").read_text(encoding="utf-8")
    assert f"{len(cls) + 1} students" in page and "1 late" in page
    with (out / "class_report_items.csv").open(encoding="utf-8") as f:
        items = {r["item"]: r for r in csv.DictReader(f)}
    assert set(items) == set(SPEC.items)
