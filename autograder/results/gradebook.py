"""Gradebook access: read one submission's grades, apply the grader's zeroes, merge into results.

Each submission is autograded in its own copy of the run's template gradebook, so two workers never
write the same sqlite file and nothing stale survives from an earlier attempt. The main process is
the only writer of the merged ``<out>/gradebook.db``: a graded student's submission there is
*replaced* (never updated in place), and an errored student's submission is *removed*, so a failed
re-grade can never show the old score. The merged gradebook works with nbgrader's
formgrader and ``nbgrader export`` (see autograder/README.md).
"""
from __future__ import annotations

import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nbgrader.api import Gradebook, MissingEntry


@dataclass(frozen=True)
class CellGrade:
    """nbgrader's grade for one grade cell."""
    grade_id: str
    auto_score: float | None
    max_score: float
    needs_manual_grade: bool


@contextmanager
def open_gradebook(db: Path):
    """nbgrader's Gradebook on an sqlite file (its harmless SQLAlchemy session warnings silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not in session.*")
        gb = Gradebook(f"sqlite:///{db}")
        try:
            yield gb
        finally:
            gb.close()


def cell_grades(db: Path, lesson: str, student: str) -> dict[str, CellGrade]:
    """Every grade cell's grade of ``student``'s submission (raises MissingEntry if none)."""
    out = {}
    with open_gradebook(db) as gb:
        sub = gb.find_submission(lesson, student)
        for nb in sub.notebooks:
            for g in nb.grades:
                out[g.name] = CellGrade(g.name, g.auto_score, float(g.max_score), bool(g.needs_manual_grade))
    return out


def zero_cells(db: Path, lesson: str, student: str, grade_ids: list[str]) -> None:
    """Give ``grade_ids`` a manual score of 0 (nbgrader's score = manual score when set).

    A manual score is what formgrader shows as an instructor override, so the change is visible and
    an instructor who disagrees after reading the evidence can set it back there.
    """
    if not grade_ids:
        return
    with open_gradebook(db) as gb:
        sub = gb.find_submission(lesson, student)
        for nb in sub.notebooks:
            for g in nb.grades:
                if g.name in grade_ids:
                    g.manual_score = 0.0
                    g.needs_manual_grade = False
        gb.db.commit()


def assignment_signature(db: Path, lesson: str) -> list[tuple[str, str, float]]:
    """(notebook, grade cell, max score) of the assignment: detects a gradebook of another lesson version."""
    with open_gradebook(db) as gb:
        try:
            a = gb.find_assignment(lesson)
        except MissingEntry:
            return []
        return sorted((nb.name, c.name, float(c.max_score)) for nb in a.notebooks for c in nb.grade_cells)


def ensure_merged(out_db: Path, template_db: Path, lesson: str) -> str | None:
    """Create ``out_db`` from the template, or keep it when it matches; return a warning if replaced."""
    if out_db.exists():
        try:
            same = assignment_signature(out_db, lesson) == assignment_signature(template_db, lesson)
        except Exception:
            same = False
        if same:
            return None
        backup = out_db.with_name(f"gradebook.{time.strftime('%Y%m%d-%H%M%S')}.db")
        out_db.rename(backup)
        shutil.copyfile(template_db, out_db)
        return (f"{out_db} was made for another version of the lesson's grade cells; moved it to {backup.name} "
                "and started a new one")
    out_db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_db, out_db)
    return None


def remove_student(out_db: Path, lesson: str, student: str) -> None:
    """Delete ``student``'s submission from the merged gradebook (if any)."""
    with open_gradebook(out_db) as gb:
        try:
            gb.remove_submission(lesson, student)
        except MissingEntry:
            pass


def merge_student(out_db: Path, src_db: Path, lesson: str, student: str) -> None:
    """Replace ``student``'s submission in ``out_db`` with the one in ``src_db``."""
    with open_gradebook(src_db) as src:
        s = src.find_submission(lesson, student)
        timestamp = s.timestamp
        grades = {(nb.name, g.name): (g.auto_score, g.manual_score, g.needs_manual_grade, g.extra_credit)
                  for nb in s.notebooks for g in nb.grades}
        comments = {(nb.name, c.name): c.auto_comment for nb in s.notebooks for c in nb.comments}
        student_row = src.find_student(student)
        names = (student_row.first_name, student_row.last_name, student_row.email)
    with open_gradebook(out_db) as gb:
        try:
            gb.remove_submission(lesson, student)
        except MissingEntry:
            pass
        gb.update_or_create_student(student, first_name=names[0], last_name=names[1], email=names[2])
        sub = gb.add_submission(lesson, student, **({"timestamp": timestamp} if timestamp else {}))
        for nb in sub.notebooks:
            for g in nb.grades:
                auto, manual, needs, extra = grades.get((nb.name, g.name), (None, None, True, None))
                g.auto_score, g.manual_score, g.needs_manual_grade, g.extra_credit = auto, manual, needs, extra
            for c in nb.comments:
                c.auto_comment = comments.get((nb.name, c.name))
        gb.db.commit()


def set_item_points(db: Path, lesson: str, student: str, grade_ids: list[str], points: float | None,
                    computed: dict[str, float] | None = None) -> None:
    """An instructor override of one item in the merged gradebook (what formgrader and ``nbgrader
    export`` show): ``points`` are spread over the item's grade cells in order (``__visible`` first),
    each up to its maximum, as manual scores. ``points=None`` restores the computed per-cell scores
    (``computed``: grade id -> points; a manual score only where it differs from nbgrader's)."""
    with open_gradebook(db) as gb:
        try:
            sub = gb.find_submission(lesson, student)
        except MissingEntry:
            return
        cells = {g.name: g for nb in sub.notebooks for g in nb.grades}
        left = points
        for gid in grade_ids:
            g = cells.get(gid)
            if g is None:
                continue
            if points is None:
                want = (computed or {}).get(gid)
                g.manual_score = None if want is None or abs(want - (g.auto_score or 0.0)) < 1e-12 else want
            else:
                g.manual_score = min(left, float(g.max_score))
                left -= g.manual_score
            g.needs_manual_grade = False
        gb.db.commit()
