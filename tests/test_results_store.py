"""The results store and its exports, without running the grading pipeline (fast).

The store is the single source of truth: attempts are kept, exports are views of the whole store,
overrides are logged and survive re-grades, a store from an older schema is migrated and one from a
newer grader is refused, two writers on one results folder are serialized, and every text written to
CSV/JSON is safe (no terminal escapes, no spreadsheet formulas). The same rules with the real
pipeline (late batch, re-grade, SIGKILL and resume) are in tests/test_results_store_pipeline.py.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.results import store as st  # noqa: E402
from autograder.results.exports import export_all  # noqa: E402
from autograder.results.records import ERRORED, GRADED, ItemResult, StudentResult  # noqa: E402
from autograder.results.textsafe import clean, csv_cell, json_safe  # noqa: E402

LESSON = "lesson-x"
ITEMS = {"q1": ("LO1", 4.0), "q2": ("LO2", 4.0)}
INFO = {"threshold": 0.75, "max_score": 8.0, "objectives": {"LO1": "one", "LO2": "two"}, "missing_items": [],
        "items": {k: {"objective": lo, "max_score": m, "probe": True} for k, (lo, m) in ITEMS.items()}}


def result(student: str, q1: float, q2: float, status: str = GRADED, reason: str = "", submitted_as=None) -> StudentResult:
    r = StudentResult(student, submitted_as or student, status, reason)
    if status == ERRORED:
        return r
    r.items = [ItemResult(k, lo, s, m, {f"{k}__visible": s / 2, f"{k}__hidden": s / 2}, "pass")
               for (k, (lo, m)), s in zip(ITEMS.items(), (q1, q2))]
    r.max_score = 8.0
    r.recompute(0.75, ["LO1", "LO2"])
    return r


def sub(student: str, path: Path | None = None, **lms):
    return SimpleNamespace(student=student, submitted_as=student, path=path, **lms)


def grade_batch(out: Path, results: list[tuple[StudentResult, object]], **run_kw) -> None:
    """What pipeline.grade does with the store: one run, one record per result, export."""
    with st.open_locked(out) as store:
        run = st.Run.begin(store, LESSON, None, "fast", 7, INFO, **run_kw)
        run.resume([s for _, s in results])
        for res, s in results:
            run.record(res, s)
        run.finish(graded=len(results))
        export_all(store, out, LESSON)


def rows(out: Path, name: str = "results.csv") -> dict[str, dict]:
    return {r["student"]: r for r in csv.DictReader(open(out / name, newline="", encoding="utf-8"))}


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, **kw)


# ---- text safety -------------------------------------------------------------------------------------------
def test_clean_strips_escapes_controls_and_bidi():
    s = "ok\x1b[31mred\x1b[0m \x1b]0;title\x07x\x1b]8;;http://e\x1b\\link\x1b]8;;\x1b\\ \u202eevil\x00\x07\x9b2J\x7f"
    out = clean(s)
    assert out == "okred xlink evil"
    assert clean("a\nb\tc") == "a b c" and clean("a\nb", keep_newlines=True) == "a\nb"
    assert clean("bad\ud800surrogate") == "badsurrogate"


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", "=HYPERLINK(\"http://x\")"])
def test_formula_like_fields_are_neutralised(text):
    assert csv_cell(text).startswith("'")
    assert "\t" not in csv_cell(text) and "\r" not in csv_cell(text)


def test_plain_fields_and_numbers_are_unchanged():
    assert [csv_cell(x) for x in ("alice", "24", "75.00", "", None, 3)] == ["alice", "24", "75.00", "", "", "3"]
    assert json_safe({"k\x1b[1m": ["v\x07", 1, None]}) == {"k": ["v", 1, None]}


def test_hostile_names_and_reasons_are_safe_in_every_export(tmp_path):
    evil_name = "=HYPERLINK(\"http://evil\",\"x\")"
    reason = "boom \x1b[2J\x1b[31mcleared your terminal\x1b]0;pwned\x07\r\n=cmd|' /C calc'!A0"
    bad = result("evil", 0, 0, ERRORED, reason, submitted_as=evil_name)
    ok = result("ok", 4, 4, submitted_as="@ok\tname")
    ok.evidence = [{"rule": "-rule\x1b[0m", "where": "cell 1", "detail": "\x1b[5mblink", "flag": True}]
    grade_batch(tmp_path, [(bad, sub("evil", display_name="+Eve \x1b[1m")), (ok, sub("ok"))])
    for name in ("results.csv", "results.json", "items.csv", "objectives.csv"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text, name
    r = rows(tmp_path)
    assert r["evil"]["submitted_as"].startswith("'=HYPERLINK") and r["ok"]["submitted_as"] == "'@ok name"
    assert r["evil"]["display_name"] == "'+Eve " and "cleared your terminal" in r["evil"]["reason"]
    assert r["ok"]["evidence"].startswith("'-rule @ cell 1")
    for rec in csv.reader(open(tmp_path / "results.csv", newline="")):   # no field a spreadsheet evaluates
        assert not any(f.startswith(("=", "+", "-", "@", "\t", "\r")) for f in rec), rec
    data = json.loads((tmp_path / "results.json").read_text())
    s = {x["student"]: x for x in data["students"]}["evil"]
    assert s["reason"].startswith("boom cleared your terminal") and "\x1b" not in json.dumps(data, ensure_ascii=False)


# ---- the store: attempts, latest, history --------------------------------------------------------------
def test_exports_are_views_of_the_whole_store_and_untouched_rows_stay_byte_identical(tmp_path):
    grade_batch(tmp_path, [(result(f"s{i}", 4, i % 5), sub(f"s{i}")) for i in range(4)])
    before = (tmp_path / "results.csv").read_text().splitlines()
    time.sleep(1.1)   # a later timestamp must not leak into untouched rows
    grade_batch(tmp_path, [(result("late", 2, 2), sub("late"))], late=True)                 # late batch
    grade_batch(tmp_path, [(result("s1", 0, 0, ERRORED, "corrupt notebook"), sub("s1"))])   # failed re-grade
    after = (tmp_path / "results.csv").read_text().splitlines()
    r = rows(tmp_path)
    assert sorted(r) == ["late", "s0", "s1", "s2", "s3"]
    assert r["late"]["late"] == "yes" and r["s0"]["late"] == "no"
    assert r["s1"]["status"] == "errored" and r["s1"]["score"] == "" and r["s1"]["pass"] == ""
    untouched = {line for line in before if line.split(",")[0] in ("s0", "s2", "s3")}
    assert untouched <= set(after) and len(untouched) == 3
    data = json.loads((tmp_path / "results.json").read_text())
    s1 = {s["student"]: s for s in data["students"]}["s1"]
    assert [h["status"] for h in s1["history"]] == ["graded", "errored"] and s1["history"][0]["score"] == 5
    assert [x["state"] for x in data["runs"]] == ["finished"] * 3
    objectives = list(csv.DictReader(open(tmp_path / "objectives.csv")))
    assert {(o["student"], o["objective"]) for o in objectives} >= {("s0", "LO1"), ("late", "LO2")}


def test_resume_skips_only_the_same_file_and_grader(tmp_path):
    f = tmp_path / "a.ipynb"
    f.write_text("one")
    grade_batch(tmp_path / "out", [(result("a", 4, 4), sub("a", f))])
    with st.open_locked(tmp_path / "out") as store:
        run = st.Run.begin(store, LESSON, None, "fast", 7, INFO)
        assert run.resume([sub("a", f)])[1] == ["a"]
        assert run.resume([sub("a", f)], regrade=True)[1] == []
        other_seed = st.Run(store, run.run_id, LESSON, run.version, "fast", 8)
        assert other_seed.resume([sub("a", f)])[1] == []
        f.write_text("two")
        assert run.resume([sub("a", f)])[1] == []


def test_lms_grade_files(tmp_path):
    grade_batch(tmp_path, [
        (result("canvas_101", 4, 4), sub("canvas_101", lms="canvas", lms_user_id="101", display_name="Chen, Wei")),
        (result("canvas_102", 4, 0), sub("canvas_102", lms="canvas", lms_user_id="102", display_name="Chen, Wei",
                                         late=True)),
        (result("moodle_55", 0, 0, ERRORED, "corrupt"), sub("moodle_55", lms="moodle", lms_user_id="55",
                                                            display_name="Ana Li")),
        (result("folder", 4, 4), sub("folder"))])
    canvas = list(csv.DictReader(open(tmp_path / "canvas_grades.csv")))
    assert [(c["ID"], c["Student"], c[LESSON], c["pass"], c["late"]) for c in canvas] == \
        [("101", "Chen, Wei", "8", "yes", "no"), ("102", "Chen, Wei", "4", "no", "yes")]
    assert list(canvas[0])[:5] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
    moodle = list(csv.DictReader(open(tmp_path / "moodle_grades.csv")))
    assert moodle == [{"Identifier": "Participant 55", "Full name": "Ana Li", "Grade": "", "Maximum Grade": "8",
                       "pass": "", "late": "no"}]


# ---- overrides -------------------------------------------------------------------------------------------
def test_override_is_logged_exported_survives_regrades_and_can_be_dropped(tmp_path):
    grade_batch(tmp_path, [(result("a", 4, 0), sub("a")), (result("b", 4, 4), sub("b")),
                           (result("c", 0, 0, ERRORED, "corrupt"), sub("c"))])
    assert rows(tmp_path)["a"]["score"] == "4" and rows(tmp_path)["a"]["pass"] == "no"
    r = cli("override", "a", "q2", "3", "--reason", "answer correct, float64 vs float32", "--by", "prof x",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    a = rows(tmp_path)["a"]
    assert (a["score"], a["pass"], a["LO2_score"], a["overrides"]) == ("7", "yes", "3", "q2=3 by prof x")
    items = {(i["student"], i["item"]): i for i in csv.DictReader(open(tmp_path / "items.csv"))}
    assert (items["a", "q2"]["score"], items["a", "q2"]["computed_score"], items["a", "q2"]["overridden"]) == ("3", "0", "yes")
    log = json.loads((tmp_path / "results.json").read_text())["overrides_log"]
    assert [(o["student"], o["item"], o["points"], o["by"], o["reason"]) for o in log] == \
        [("a", "q2", 3.0, "prof x", "answer correct, float64 vs float32")] and log[0]["at"]
    grade_batch(tmp_path, [(result("a", 4, 0), sub("a"))])                        # re-grade: kept
    assert rows(tmp_path)["a"]["score"] == "7"
    grade_batch(tmp_path, [(result("a", 4, 1), sub("a"))], drop_overrides=True)  # asked to drop it
    assert rows(tmp_path)["a"]["score"] == "5" and rows(tmp_path)["a"]["overrides"] == ""
    log = json.loads((tmp_path / "results.json").read_text())["overrides_log"]
    assert log[0]["dropped_at"] and "--drop-overrides" in log[0]["dropped_reason"]
    # refused, naming the problem, and nothing changes
    before = (tmp_path / "results.csv").read_bytes()
    for args, msg in [(("a", "q2", "5"), "0 to 4 points"), (("a", "q9", "1"), "no item 'q9'"),
                      (("zz", "q1", "1"), "no student 'zz'"), (("c", "q1", "1"), "errored"),
                      (("a", "q1", "nan"), "0 to 4 points")]:
        r = cli("override", *args, "--reason", "x", "--out", str(tmp_path))
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
    assert (tmp_path / "results.csv").read_bytes() == before
    r = cli("override", "b", "q1", "2", "--reason", "  ", "--out", str(tmp_path))
    assert r.returncode == 1 and "--reason" in r.stderr
    assert cli("override", "b", "q1", "2", "--reason", "late penalty", "--out", str(tmp_path)).returncode == 0
    assert rows(tmp_path)["b"]["score"] == "6"
    assert cli("override", "b", "q1", "--clear", "--reason", "penalty waived", "--out", str(tmp_path)).returncode == 0
    assert rows(tmp_path)["b"]["score"] == "8"


# ---- schema versions -----------------------------------------------------------------------------------------
def test_a_store_of_an_older_schema_is_migrated_and_keeps_its_grades(tmp_path):
    db = sqlite3.connect(tmp_path / st.STORE_NAME)
    for stmt in (s.strip() for s in st.MIGRATIONS[0].split(";")):
        if stmt:
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO runs (lesson, started, state, grader_version, mode, probe_seed, info) VALUES "
               "(?, '2026-01-01T00:00:00Z', 'finished', 'gold', 'fast', 7, ?)", (LESSON, json.dumps(INFO)))
    old = result("old", 4, 2)
    from dataclasses import asdict
    db.execute("INSERT INTO attempts (run_id, lesson, student, submitted_as, sha256, grader_version, mode, probe_seed, "
               "status, reason, score, max_score, result, recorded_at) VALUES (1, ?, 'old', 'old', 'abc', 'gold', "
               "'fast', 7, 'graded', '', 6, 8, ?, '2026-01-01T00:00:01Z')", (LESSON, json.dumps(asdict(old))))
    db.execute("INSERT INTO students VALUES (?, 'old', 1, '2026-01-01T00:00:01Z')", (LESSON,))
    db.commit()
    db.close()
    grade_batch(tmp_path, [(result("new", 4, 4), sub("new", lms="canvas", lms_user_id="9"))])
    with st.Store.open(tmp_path) as store:
        assert store.schema_version() == st.SCHEMA_VERSION == 2
        meta = dict(store.db.execute("SELECT key, value FROM meta").fetchall())
        assert "migrated_from_1" in meta
    r = rows(tmp_path)
    assert r["old"]["score"] == "6" and r["old"]["late"] == "no" and r["new"]["lms_user_id"] == "9"


def test_a_store_of_a_newer_grader_is_refused_with_a_clear_error(tmp_path):
    grade_batch(tmp_path, [(result("a", 4, 4), sub("a"))])
    with sqlite3.connect(tmp_path / st.STORE_NAME) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    before = (tmp_path / st.STORE_NAME).read_bytes()
    with pytest.raises(st.StoreVersionError, match="schema version 99.*newer version of the grader"):
        st.Store.open(tmp_path)
    r = cli("export", "--out", str(tmp_path))
    assert r.returncode == 1 and "newer version of the grader" in r.stderr
    assert (tmp_path / st.STORE_NAME).read_bytes() == before


def test_not_a_store_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / st.STORE_NAME) as db:
        db.execute("CREATE TABLE something (x)")
    with pytest.raises(st.StoreError, match="not a results store"):
        st.Store.open(tmp_path)
    (tmp_path / st.STORE_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(st.StoreError, match="not a readable results store"):
        st.Store.open(tmp_path)
    r = cli("export", "--out", str(tmp_path))
    assert r.returncode == 1 and "not a readable results store" in r.stderr


# ---- one writer per results folder -----------------------------------------------------------------------------
def test_two_writers_on_one_folder_are_serialized_with_a_message(tmp_path):
    grade_batch(tmp_path, [(result("a", 4, 4), sub("a"))])
    (tmp_path / "results.csv").unlink()
    with st.locked(tmp_path):
        r = cli("export", "--out", str(tmp_path), "--no-wait")
        assert r.returncode == 1 and "in use by another grading run" in r.stderr and f"pid {os.getpid()}" in r.stderr
        waiting = subprocess.Popen([sys.executable, "-m", "autograder", "export", "--out", str(tmp_path)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = waiting.stderr.readline()          # blocks until the second writer reports that it waits
        time.sleep(1)
        assert waiting.poll() is None, "the second writer must wait for the lock"
        assert not (tmp_path / "results.csv").exists()
    out, err = waiting.communicate(timeout=120)
    assert said.startswith("waiting:") and "serialized" in said, said + err
    assert waiting.returncode == 0 and "exported 1 students" in out, err
    assert rows(tmp_path)["a"]["score"] == "8"


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from autograder.results.store import locked\nwith locked(sys.argv[2]):\n"
                               "    print('held', flush=True); time.sleep(300)", str(ROOT), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(st.StoreBusy):
        with st.locked(tmp_path, wait=False):
            pass
    holder.kill()
    holder.wait()
    with st.locked(tmp_path, wait=False):
        pass


# ---- student data is never committed -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["results/results.csv", "results/2025-week3/grades.sqlite", "out/x.csv",
                                  "submissions/alice/lesson.ipynb", "feedback/alice/l/lesson.html",
                                  "autograder/work/runs/x/gradebook.db", "autograder/work/submitted/a/l/lesson.ipynb",
                                  "gradebook.db", "grades.sqlite", "export.zip", "deep/any/grades.sqlite",
                                  "autograded/alice/l/lesson.ipynb", "submitted/alice/l/lesson.ipynb",
                                  "exchange/course/inbound/x.ipynb",
                                  "deep/any/.grading.lock", "results-2026/results.csv"])
def test_folders_that_can_hold_student_data_are_git_ignored(path):
    r = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert r.returncode == 0, f"{path} is not git-ignored: student data could be committed"


def test_the_course_itself_is_not_ignored():
    for path in ("autograder/results/store.py", "lessons/x/lesson.ipynb", "solutions/x/lesson.py", "tests/test_x.py"):
        assert subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT).returncode == 1, path
