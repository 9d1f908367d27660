"""Every results file is a view of the whole store, regenerated after each run (and by ``export``).

:func:`export_all` reads each student's latest attempt from :mod:`autograder.results.store`, applies the
active manual overrides (an overridden item's score replaces the computed one; totals, percent,
pass and per-objective scores are recomputed by the one rule, :meth:`StudentResult.recompute`), and
writes into the results folder:

* ``results.csv`` / ``results.json`` (:func:`autograder.results.records.write_results`);
* ``objectives.csv``: one row per student and learning objective;
* ``items.csv``: one row per student and item (computed score, override, re-check verdict);
* ``canvas_grades.csv`` when some student came from a Canvas download, ``moodle_grades.csv`` when
  some came from Moodle (columns in autograder/README.md §3);
* ``class_report.html`` and its ``class_report_*.csv`` (:mod:`autograder.results.class_report`): per item
  facility, discrimination and score distribution, the most frequent failed properties, per-objective
  mastery, late and errored counts — what to re-teach, in one screen.

A row depends only on its student's latest attempt and overrides: a late batch or a re-grade
changes only its students' rows. An errored student's row has status and reason and no score; the
store keeps the earlier attempts (``history`` in ``results.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

from autograder.results import class_report
from autograder.results.records import ERRORED, ItemResult, RunResult, StudentResult, _fmt, write_csv, write_results
from autograder.results.store import Store, StoreError

CANVAS_FILE, MOODLE_FILE = "canvas_grades.csv", "moodle_grades.csv"


def _student(row, history: list[dict], overrides: dict[str, dict], threshold: float) -> StudentResult:
    d = json.loads(row["result"])
    d.pop("pass", None)
    items = ItemResult.__dataclass_fields__
    d["items"] = [ItemResult(**{k: v for k, v in i.items() if k in items}) for i in d.get("items", [])]
    known = StudentResult.__dataclass_fields__
    res = StudentResult(**{k: v for k, v in d.items() if k in known})
    res.late, res.lms, res.lms_user_id = bool(row["late"]), row["lms"], row["lms_user_id"]
    res.display_name, res.lms_submission_id = row["display_name"] or "", row["lms_submission_id"]
    res.sha256, res.grader_version = row["sha256"] or "", row["grader_version"]
    res.probe_seed, res.mode, res.graded_at = row["probe_seed"], row["mode"] or "", row["recorded_at"]
    res.history, res.overrides = history, []
    if res.status == ERRORED or not overrides:
        return res
    by_item = {i.item: i for i in res.items}
    for item, o in sorted(overrides.items()):
        it = by_item.get(item)
        if it is None:
            res.notes.append(f"override of {item} not applied: the graded lesson has no such item")
            continue
        res.overrides.append({"item": item, "points": o["points"], "computed": it.score, "reason": o["reason"],
                              "by": o["by"], "at": o["at"]})
        it.score = float(o["points"])
    if res.overrides:
        res.recompute(threshold)
    return res


def build(store: Store, lesson: str) -> RunResult:
    """The whole store's view of ``lesson``: run metadata of the latest run, every student's latest
    attempt with overrides applied, the list of runs and the override log."""
    runs = store.runs(lesson)
    if not runs:
        raise StoreError(f"{store.path} has no grading run of lesson {lesson!r}")
    last = runs[-1]
    info = last["info"]
    threshold_of = {r["run_id"]: r["info"].get("threshold", info.get("threshold", 0.0)) for r in runs}
    overrides = store.active_overrides(lesson)
    students = [_student(row, store.history(lesson, row["student"]), overrides.get(row["student"], {}),
                         threshold_of.get(row["run_id"], info.get("threshold", 0.0)))
                for row in store.latest(lesson)]
    run_list = [{"run": r["run_id"], "started": r["started"], "finished": r["finished"], "state": r["state"],
                 "grader_version": r["grader_version"], "mode": r["mode"], "probe_seed": r["probe_seed"],
                 **{k: r["info"].get(k) for k in ("graded", "skipped", "late", "regrade", "git", "user")}}
                for r in runs]
    out = RunResult(lesson, info.get("threshold", 0.0), last["mode"] or "", last["probe_seed"], info.get("max_score", 0.0),
                    info.get("items", {}), info.get("objectives", {}), info.get("missing_items", []), students,
                    info.get("nbgrader_version", ""), last["started"], info.get("seconds", 0.0), info.get("jobs", 1),
                    info.get("warnings", []), runs=run_list, overrides_log=store.overrides_log(lesson))
    return out


def export_all(store: Store, out: Path, lesson: str | None = None) -> RunResult:
    """Regenerate every results file in ``out`` from the whole store (see the module docstring)."""
    lessons = store.lessons()
    if lesson is None:
        if len(lessons) != 1:
            raise StoreError(f"{store.path} holds {'no lesson' if not lessons else 'lessons ' + ', '.join(lessons)}: "
                             "say which with --lesson")
        lesson = lessons[0]
    run = build(store, lesson)
    write_results(run, Path(out))
    write_tables(run, Path(out))
    class_report.write(run.as_dict(), Path(out), class_report.item_titles(lesson))
    return run


def write_tables(run: RunResult, out: Path) -> None:
    """``objectives.csv``, ``items.csv`` and the LMS grade files."""
    obj_rows, item_rows = [], []
    for s in run.students:
        for lo in run.objectives:
            o = s.objectives.get(lo, {})
            sc, mx = o.get("score"), o.get("max_score")
            obj_rows.append([s.student, s.status, lo, run.objectives[lo], "" if s.status == ERRORED else _fmt(sc),
                             _fmt(mx), "" if s.status == ERRORED or not mx else f"{100.0 * sc / mx:.2f}"])
        over = {o["item"]: o for o in s.overrides}
        for i in s.items:
            o = over.get(i.item)
            item_rows.append([s.student, s.status, i.item, i.objective, _fmt(i.score), _fmt(i.max_score),
                              _fmt(o["computed"]) if o else _fmt(i.score), "yes" if o else "no", i.recheck,
                              i.recheck_detail])
    write_csv(out / "objectives.csv", ["student", "status", "objective", "description", "score", "max_score", "percent"],
              obj_rows)
    write_csv(out / "items.csv", ["student", "status", "item", "objective", "score", "max_score", "computed_score",
                                  "overridden", "recheck", "recheck_detail"], item_rows)
    canvas = [s for s in run.students if s.lms == "canvas" and s.lms_user_id]
    if canvas:
        write_csv(out / CANVAS_FILE, ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", run.lesson, "pass", "late"],
                  [[s.display_name or s.submitted_as, s.lms_user_id, "", "", "", _lms_score(s), _lms_pass(s),
                    "yes" if s.late else "no"] for s in canvas])
    moodle = [s for s in run.students if s.lms == "moodle" and s.lms_user_id]
    if moodle:
        write_csv(out / MOODLE_FILE, ["Identifier", "Full name", "Grade", "Maximum Grade", "pass", "late"],
                  [[f"Participant {s.lms_user_id}", s.display_name or s.submitted_as, _lms_score(s),
                    _fmt(s.max_score if s.max_score is not None else run.max_score), _lms_pass(s),
                    "yes" if s.late else "no"] for s in moodle])


def _lms_score(s: StudentResult) -> str:
    return "" if s.status == ERRORED or s.score is None else _fmt(s.score)


def _lms_pass(s: StudentResult) -> str:
    return "" if s.passed is None or s.status == ERRORED else ("yes" if s.passed else "no")
