"""From nbgrader's cell grades and the out-of-kernel verdicts to item scores: the one scoring rule.

For every assessment item (``<item>__visible`` + ``<item>__hidden`` grade cells):

* the **visible** cell's points are nbgrader's: the visible tests the student saw, run in the
  notebook's kernel — kept only when the same visible test code, run by the out-of-kernel re-check
  against the student's definitions, passes too (``Verdict.visible``), so nothing done to the
  kernel (its tracebacks, replies or hooks) decides a point;
* the **hidden** cell's points are awarded only when nbgrader awarded them (the hidden cell ran:
  the answer is attempted and did not raise) **and** the out-of-kernel check
  (:mod:`autograder.probes`, the single specification of the hidden tests, on the offering's fixed
  inputs) passes. The hidden cell in the notebook only *reports*: it calls the answer, so an
  unsolved exercise scores 0 under plain nbgrader too, but it holds no test of its own. Items
  without a probe keep nbgrader's hidden points.

A failing check is an ordinary wrong answer: the hidden points become 0 (a manual-score override in
the gradebook, visible in formgrader), the item records why (``recheck_detail``: the property that
failed, then the instructor-only detail), and the student's status is untouched. Only evidence of
tampering (structure, static rules, blocked access) makes a student ``flagged``; when such a
student's in-kernel hidden test passed while the check fails, the item additionally carries the
note ``recheck-contradicts-kernel`` (not a flag by itself).

:func:`annotate_feedback` writes the failed property into the hidden cell's output of the graded
notebook, so the student's feedback page says *which property* failed, never the inputs or code.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

from .notebook import LessonSpec, grade_id
from .results import Finding, ItemResult

FAILED = ("mismatch", "error")
FEEDBACK_ENAME = "HiddenTestFailed"


def is_hidden_part(grade_id: str) -> bool:
    """``<item>__hidden``: the cell whose points the out-of-kernel check awards.

    (``GradeCell.hidden`` says whether a cell *contains* hidden test code; since every visible test
    cell also holds a hidden "is it attempted" call, the part name is what tells them apart.)"""
    return grade_id.rsplit("__", 1)[-1] == "hidden"


def score_items(spec: LessonSpec, grades: dict, verdicts: dict) -> tuple[list[ItemResult], list[str], list[Finding]]:
    """Item results, grade ids to set to 0 in the gradebook, and non-flag findings (disagreements)."""
    from .recheck import Verdict
    items, zero, notes = [], [], []
    for item in spec.items:
        gids = [g for g in spec.grade_cells if spec.grade_cells[g].item == item]
        parts = {g: float(grades[g].auto_score or 0.0) if g in grades else 0.0 for g in gids}
        v = verdicts.get(item, Verdict(item, "not-run"))
        hidden = [g for g in gids if is_hidden_part(g)]
        detail = f"{v.prop} — {v.detail}" if v.prop and v.verdict in FAILED else v.detail
        res = ItemResult(item, spec.objective(item), sum(parts.values()), spec.item_points(item), parts, v.verdict, detail)
        if getattr(v, "visible", "") == "fail":   # the visible tests fail outside the kernel
            taken = [g for g in gids if g not in hidden and parts[g] > 0]
            if taken:
                res.zeroed = True
                res.score -= sum(parts[g] for g in taken)
                zero.extend(taken)
                res.recheck_detail = f"visible tests fail outside the notebook: {v.visible_detail}; {res.recheck_detail}"
                notes.append(Finding("recheck", "recheck-contradicts-kernel", item,
                                     f"the visible tests passed in the kernel, but fail outside it: {v.visible_detail}",
                                     flag=False))
        if v.verdict in FAILED:
            taken = [g for g in hidden if parts[g] > 0]
            if taken:
                res.zeroed = True
                res.score -= sum(parts[g] for g in taken)
                zero.extend(taken)
                notes.append(Finding("recheck", "recheck-contradicts-kernel", item,
                                     f"the hidden cell ran in the kernel, but the hidden tests fail: {detail}", flag=False))
        items.append(res)
    return items, zero, notes


def annotate_feedback(nb_path: Path, spec: LessonSpec, items: list[ItemResult], verdicts: dict) -> None:
    """Put each failed item's property into its hidden cell's outputs (kept by the feedback filter)."""
    failed = {i.item: verdicts[i.item].prop for i in items if i.item in verdicts and verdicts[i.item].verdict in FAILED}
    if not failed or not Path(nb_path).exists():
        return
    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in spec.grade_cells and is_hidden_part(gid) and spec.grade_cells[gid].item in failed:
            prop = failed[spec.grade_cells[gid].item] or "fails on a hidden input"
            cell.setdefault("outputs", []).append(nbformat.v4.new_output(
                "error", ename=FEEDBACK_ENAME, evalue=f"hidden tests: {prop}",
                traceback=[f"{FEEDBACK_ENAME}: hidden tests: {prop}"]))
    nbformat.write(nb, str(nb_path))
