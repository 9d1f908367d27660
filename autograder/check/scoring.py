"""From nbgrader's cell grades and the out-of-kernel verdicts to item scores: the one scoring rule.

For every assessment item (``<item>__visible`` + ``<item>__hidden`` grade cells):

* the **visible** cell's points are nbgrader's: the visible tests the student saw, run in the
  notebook's kernel — kept only when the same visible test code, run by the out-of-kernel re-check
  against the student's definitions, passes too (``Verdict.visible``), so nothing done to the
  kernel (its tracebacks, replies or hooks) decides a point;
* the **hidden** cell's points are awarded only when nbgrader awarded them (the hidden cell ran:
  the answer is attempted and did not raise) **and** the out-of-kernel check
  (:mod:`autograder.check.probes`, the single specification of the hidden tests, on the offering's fixed
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

**A timeout or crash costs its exercise only.** The nbgrader worker reports every cell that ran past
the per-cell limit, ignored the interrupt or killed the kernel (it restarts the kernel and goes on),
and every answer or added cell that raised (:class:`Fault`). :func:`apply_faults`: an exercise with a
cell that timed out or lost the kernel scores 0 (all its cells, as a manual score of 0), with a note
naming the exercise by its title and the student's own cell number; a cell that raised only gets the
note (the exercise's tests decide its points). The other exercises keep their points and the
status stays ``graded``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from autograder.ingest.notebook import LessonSpec, grade_id
from autograder.results.records import Finding, ItemResult

FAILED = ("mismatch", "error")
FEEDBACK_ENAME = "HiddenTestFailed"


def is_hidden_part(grade_id: str) -> bool:
    """``<item>__hidden``: the cell whose points the out-of-kernel check awards.

    (``GradeCell.hidden`` says whether a cell *contains* hidden test code; since every visible test
    cell also holds a hidden "is it attempted" call, the part name is what tells them apart.)"""
    return grade_id.rsplit("__", 1)[-1] == "hidden"


def score_items(spec: LessonSpec, grades: dict, verdicts: dict) -> tuple[list[ItemResult], list[str], list[Finding]]:
    """Item results, grade ids to set to 0 in the gradebook, and non-flag findings (disagreements)."""
    from autograder.check.recheck import Verdict
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
    failed = {i.item: verdicts[i.item].prop for i in items if i.item in verdicts and verdicts[i.item].verdict in FAILED
              and not any(LOST_NOTE in n for n in i.notes)}   # a lost exercise's note says why instead
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


# ---- exercise titles ----------------------------------------------------------------------------
def exercise_titles(spec: LessonSpec) -> dict[str, str]:
    """Each exercise's name as the student reads it: the ``### Exercise: <name> (LOn)`` heading above
    the item's first cell, without "Exercise:" and the objective (``"Checkpoint 1 — bandwidth of a
    stack of layers"``); the metadata title where there is no such heading."""
    titles = getattr(spec, "_exercise_titles", None)
    if titles is None:
        titles, heading = {}, ""
        for cell in spec.source.cells:
            if cell.cell_type == "markdown":
                first = cell.source.strip().splitlines()[0].lstrip("#").strip() if cell.source.strip() else ""
                if first.lower().startswith("exercise:"):
                    heading = re.sub(r"\s*\(LO\d+\)\s*$", "", first.split(":", 1)[1].strip())
                continue
            gid = grade_id(cell)
            item = (spec.grade_cells[gid].item if gid in spec.grade_cells else
                    spec.answer_cells[gid].item if gid in spec.answer_cells else None)
            if item and item not in titles:
                titles[item], heading = heading, ""
        titles = {i: titles.get(i) or spec.meta.items.get(i, {}).get("title", i) for i in spec.items}
        spec._exercise_titles = titles
    return titles


def exercise_title(spec: LessonSpec, item: str) -> str:
    """:func:`exercise_titles` of one item."""
    return exercise_titles(spec).get(item, item)


# ---- timeouts and crashes ------------------------------------------------------------------------
LOST = ("timeout", "unresponsive", "died")     # these cost the exercise
LOST_NOTE = "this exercise scores 0, the others were graded as usual"
KINDS = LOST + ("raised", "skipped")


@dataclass(frozen=True)
class Fault:
    """A cell that ran past the limit, ignored the interrupt, killed the kernel, or (answer/added
    cells) raised, as the nbgrader worker reported it. ``cell``: the student's own cell number (None:
    a cell the grader put back); ``item``: its exercise (None outside the exercises)."""
    kind: str
    cell: int | None
    item: str | None
    role: str
    ename: str = ""
    evalue: str = ""
    seconds: float = 0.0


def _text(x, n: int) -> str:
    """Printable, single-line, at most ``n`` characters (the values come from student code)."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(x)))[:n].strip()


def read_faults(raw, spec: LessonSpec) -> list[Fault]:
    """The worker's fault records, validated (anything malformed is dropped)."""
    out = []
    for r in raw if isinstance(raw, list) else []:
        if not isinstance(r, dict) or r.get("kind") not in KINDS:
            continue
        cell = r.get("cell")
        cell = cell if isinstance(cell, int) and not isinstance(cell, bool) and 0 < cell < 100_000 else None
        item = r.get("item") if r.get("item") in spec.items else None
        secs = r.get("seconds")
        secs = float(secs) if isinstance(secs, (int, float)) and not isinstance(secs, bool) and 0 <= secs < 1e6 else 0.0
        out.append(Fault(r["kind"], cell, item, _text(r.get("role", ""), 20), _text(r.get("ename", ""), 80),
                         _text(r.get("evalue", ""), 200), secs))
    return out


def _where(f: Fault) -> str:
    if f.cell is None:
        return "a test cell the grader put back" if f.role == "test" else "a cell"
    return f"your cell {f.cell}" + (" (the test cell after your answer)" if f.role == "test" else "")


def describe_fault(f: Fault, cell_timeout: int) -> str:
    """One sentence for the student and the instructor."""
    where = _where(f)
    if f.kind == "timeout":
        return f"{where} ran past the {cell_timeout} s time limit and was interrupted (an infinite loop?)"
    if f.kind == "unresponsive":
        return (f"{where} ran past the {cell_timeout} s time limit and ignored the interrupt (an infinite loop "
                "that ignores Ctrl-C?); the grader restarted the kernel")
    if f.kind == "died":
        return (f"{where} stopped the Python kernel (os._exit, a crash or running out of memory); "
                "the grader restarted the kernel")
    if f.kind == "skipped":   # the worker gave up on the notebook after too many kernel restarts
        return f"{where} was not run ({f.evalue})"
    return f"{where} raised {f.ename or 'an error'}" + (f": {f.evalue}" if f.evalue else "")


def apply_faults(items: list[ItemResult], spec: LessonSpec, faults: list[Fault], cell_timeout: int) -> list[str]:
    """Notes on the exercises the faults belong to; an exercise with a lost cell scores 0. Returns the
    grade ids to set to 0 in the gradebook."""
    zero = []
    by_item = {i.item: i for i in items}
    for f in faults:
        res = by_item.get(f.item)
        if res is None or (f.kind == "skipped" and res.notes):   # skipped after a lost cell: noted already
            continue
        note = f"{exercise_title(spec, f.item)}: {describe_fault(f, cell_timeout)}"
        if f.kind in LOST or f.kind == "skipped":
            note += "; " + LOST_NOTE
            taken = [g for g, p in res.parts.items() if p > 0]
            zero += taken
            res.score = 0.0
            res.zeroed = res.zeroed or bool(taken)
        if note not in res.notes:
            res.notes.append(note)
    return zero


def fault_notes_outside_items(faults: list[Fault], spec: LessonSpec, cell_timeout: int) -> list[str]:
    """Notes on lost cells outside every exercise (they cost no points, only time)."""
    return [f"{describe_fault(f, cell_timeout)} (outside the exercises: no points lost)"
            for f in faults if f.item is None and f.kind in LOST]
