"""What the top of a student's feedback page says: result, pass line, objectives, exercises.

:func:`summary` turns one graded :class:`~autograder.results.records.StudentResult` into plain data that the
feedback template (``autograder/templates/rb_feedback/rb_feedback.html.j2``, used by the nbgrader worker's
``feedback`` request) renders above the notebook:

* the score, the percentage and the pass line: ``pass`` when ``score >= threshold * max_score``;
* one row per learning objective (points of the exercises mapped to it);
* one row per exercise, named by its title (:func:`autograder.check.scoring.exercise_titles`): visible
  and hidden points, what the hidden checks found — only the *property* that failed
  ("fails on data with a large mean"), never the hidden inputs or the instructor's detail — and the
  notes (a cell that timed out, lost the kernel or raised; a manual override with its reason);
* for every nbgrader cell, the label its panel gets ("Checkpoint 1 — …: visible tests").

Every string here is text (the template escapes it); notes may quote the student's own error messages.
"""
from __future__ import annotations

from autograder.ingest.notebook import LessonSpec
from autograder.results.records import ItemResult, StudentResult
from autograder.check.scoring import FAILED, LOST_NOTE, exercise_titles, is_hidden_part


def _stored_prop(it: ItemResult) -> str:
    """The failed property as the store keeps it: ``recheck_detail`` is ``"<property> — <detail>"``
    (:func:`autograder.check.scoring.score_items`); only the property is for the student."""
    d = it.recheck_detail or ""
    return d.split(" — ", 1)[0].rsplit("; ", 1)[-1].strip() if " — " in d else ""


def _hidden_result(it: ItemResult, verdict, hidden: tuple[float, float]) -> str:
    if hidden[1] == 0:
        return ""
    if any(LOST_NOTE in n for n in it.notes):
        return "not run (see the note)"
    if verdict is not None and verdict.verdict in FAILED:
        return verdict.prop or "fails on a hidden input"
    if verdict is None and it.recheck in FAILED:   # from the store (a page written again after an override)
        return _stored_prop(it) or "fails on a hidden input"
    return "passed" if hidden[0] >= hidden[1] - 1e-9 else "failed"


def _adjusted_note(o: dict, it: ItemResult) -> str:
    return (f"Your instructor set this exercise to {o['points']:g} of {it.max_score:g} points "
            f"(the grader gave {o['computed']:g}): {o['reason']}")


def summary(res: StudentResult, spec: LessonSpec, verdicts: dict | None = None, notes: list[str] | None = None) -> dict:
    """The feedback page's summary of ``res`` (see the module docstring)."""
    verdicts = verdicts or {}
    titles = exercise_titles(spec)
    threshold = spec.meta.passing_threshold
    items = []
    adjusted = {o["item"]: o for o in res.overrides or []}
    for it in res.items:
        vis = [(p, spec.grade_cells[g].points) for g, p in it.parts.items() if g in spec.grade_cells and not is_hidden_part(g)]
        hid = [(p, spec.grade_cells[g].points) for g, p in it.parts.items() if g in spec.grade_cells and is_hidden_part(g)]
        visible = (0.0 if it.score <= 0 else sum(p for p, _ in vis), sum(m for _, m in vis))
        hidden = (0.0 if it.zeroed else sum(p for p, _ in hid), sum(m for _, m in hid))
        items.append({"item": it.item, "title": titles.get(it.item, it.item), "objective": it.objective,
                      "score": it.score, "max_score": it.max_score, "visible": list(visible), "hidden": list(hidden),
                      "visible_result": "" if not visible[1] else "passed" if visible[0] >= visible[1] - 1e-9 else "failed",
                      "hidden_result": _hidden_result(it, verdicts.get(it.item), hidden),
                      "notes": list(it.notes) + ([_adjusted_note(adjusted[it.item], it)] if it.item in adjusted else [])})
    objectives = [{"id": lo, "text": spec.meta.objectives.get(lo, ""), **res.objectives[lo]}
                  for lo in spec.meta.objectives if lo in res.objectives]
    cells = {}
    for gid, g in spec.grade_cells.items():
        cells[gid] = {"item": g.item, "label": f"{titles.get(g.item, g.item)}: "
                      + ("hidden tests (run by the grader, code not shown)" if is_hidden_part(gid) else "visible tests")}
    for gid, a in spec.answer_cells.items():
        cells[gid] = {"item": a.item, "label": f"{titles.get(a.item, a.item)}: your answer"}
    return {"lesson": spec.meta.title, "score": res.score, "max_score": res.max_score, "percent": res.percent,
            "threshold_percent": round(100 * threshold, 1), "pass_points": threshold * (res.max_score or 0),
            "passed": res.passed, "objectives": objectives, "items": items, "cells": cells, "notes": list(notes or [])}
