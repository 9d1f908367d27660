"""Integrity evidence about a submission, gathered in one place.

* **structure** (:func:`structural_findings`): the submission's nbgrader cells compared with the
  released notebook — edited, deleted, duplicated or forged cells, changed points or metadata;
* **static** (:mod:`autograder.check.static`): rules over the syntax tree of the code the student wrote;
* **runtime** (:func:`runtime_findings`): what the in-kernel guard and the re-check's guard logged.

With the operating-system sandbox (:mod:`autograder.isolate.sandbox`) a submission cannot reach the grader's
files, so this evidence is about *tampering with the test harness inside the student's own kernel*
(patched helpers, always-equal objects, IPython hooks, edited tests): the sandbox does not stop
that, the out-of-kernel re-check and these checks do. Each piece is a
:class:`~autograder.results.records.Finding`; ``flag=False`` ones are informational notes.
"""
from __future__ import annotations

import json
from pathlib import Path

from autograder.isolate.guard import read_log
from autograder.check.recheck import clean_text
from autograder.ingest.notebook import LessonSpec, cell_label, grade_id, nbg, norm_source
from autograder.results.records import Finding
from autograder.check.static import scan_notebook


def submission_findings(nb, spec: LessonSpec, sandboxed: bool = True) -> list[Finding]:
    """Structure and static evidence about the submitted notebook (before anything runs)."""
    return structural_findings(nb, spec) + scan_notebook(nb, spec, sandboxed)


def runtime_findings(kernel_log: Path | list[dict] | None, recheck_log: Path | list[dict] | None,
                     forged: list[str] | tuple = ()) -> list[Finding]:
    """The guards' logs (records, or a log file): blocked accesses (flagged) and commands the kernel
    ran (notes); records of the re-check's channel that its runner did not write (flagged)."""
    out = [Finding("runtime", "recheck-output-forged", "re-check", clean_text(msg)) for msg in forged[:5]]
    for where, log in (("kernel", kernel_log), ("re-check", recheck_log)):
        if log is None:
            continue
        for e in (log if isinstance(log, list) else read_log(log))[:1000]:
            target = clean_text(e.get("target", ""))
            if e.get("blocked"):
                out.append(Finding("runtime", "blocked-access", f"{where} guard", f"{clean_text(e.get('event'), 60)}: {target}"))
            elif where == "kernel":
                out.append(Finding("runtime", "ran-command", f"{where} guard", f"{clean_text(e.get('event'), 60)}: {target[:200]}",
                                   flag=False))
    return out


def structural_findings(nb, spec: LessonSpec) -> list[Finding]:
    """Compare the submission's nbgrader cells with the released version (edits, deletions, forgeries)."""
    out: list[Finding] = []
    seen: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        gid = grade_id(cell)
        if not gid:
            if cell.cell_type == "code" and cell.get("id") and cell["id"] in {
                    g.cell_id for g in spec.grade_cells.values()} | {a.cell_id for a in spec.answer_cells.values()}:
                out.append(Finding("structure", "nbgrader-metadata-removed", cell_label(cell, i),
                                   "a graded or answer cell lost its nbgrader metadata"))
            continue
        seen[gid] = seen.get(gid, 0) + 1
        meta = nbg(cell)
        if gid in spec.grade_cells:
            if norm_source(cell.source) != spec.release_sources.get(gid):
                out.append(Finding("structure", "edited-test-cell", cell_label(cell, i),
                                   "the test cell differs from the released one (nbgrader restores it for grading)"))
            if not meta.get("grade") or meta.get("points") != spec.grade_cells[gid].points:
                out.append(Finding("structure", "edited-test-metadata", cell_label(cell, i),
                                   f"test cell metadata changed: {json.dumps(meta, sort_keys=True)[:200]}"))
        elif gid in spec.locked_cells:
            if norm_source(cell.source) != spec.release_sources.get(gid):
                out.append(Finding("structure", "edited-locked-cell", cell_label(cell, i),
                                   "the locked helper cell differs from the released one"))
        elif gid in spec.answer_cells:
            if meta.get("grade") or meta.get("locked"):
                out.append(Finding("structure", "edited-answer-metadata", cell_label(cell, i),
                                   f"answer cell metadata changed: {json.dumps(meta, sort_keys=True)[:200]}"))
        else:
            out.append(Finding("structure", "unknown-nbgrader-cell", cell_label(cell, i),
                               f"a cell claims nbgrader id {gid!r}, which the lesson does not have"))
    for gid, n in seen.items():
        if n > 1:
            out.append(Finding("structure", "duplicated-nbgrader-cell", gid, f"{n} cells carry grade id {gid!r}"))
    for gid in list(spec.grade_cells) + list(spec.locked_cells) + list(spec.answer_cells):
        if gid not in seen:
            what = "test" if gid in spec.grade_cells else "locked helper" if gid in spec.locked_cells else "answer"
            out.append(Finding("structure", f"deleted-{what.split()[0]}-cell", gid,
                               f"the {what} cell {gid!r} was deleted (the grader puts it back)"))
    return out
