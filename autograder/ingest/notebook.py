"""What the grader knows about the lesson notebook, and how it prepares a submission.

Everything here is derived from the lesson metadata (``residual_bandwidth.course``) and the
instructor source notebook in ``solutions/`` (plus the released student version in ``lessons/``):
the grade cells and their points, the item and learning objective of each, the answer cells and the
names they define, the locked helper cells, and the ordinary demo cells. Nothing lists the items
by hand, so cells the lead adds later are picked up as they appear.

Cell matching uses nbgrader's ``grade_id`` for nbgrader cells and the stable cell ``id`` (or, for
notebooks whose cells lost their ids, e.g. after a trip through an old editor, the exact source)
for ordinary cells.
"""
from __future__ import annotations

import ast
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from residual_bandwidth.course import LessonMeta, item_of, load_lesson

ROOT = Path(__file__).resolve().parents[2]
# nbgrader's delimiters (the only definition of each in the grader)
HIDDEN_BEGIN = "BEGIN HIDDEN TESTS"
HIDDEN_END = "END HIDDEN TESTS"
SOLUTION_BEGIN = "### BEGIN SOLUTION"
SOLUTION_END = "### END SOLUTION"
# the nbgrader worker's marker for a cell whose output passed the limit (the pipeline reads it)
OUTPUT_CAP_MARK = "[autograder] output limit exceeded"


def norm_source(src) -> str:
    """Source with trailing whitespace and blank edges removed (editors differ in these)."""
    if isinstance(src, list):
        src = "".join(src)
    return "\n".join(line.rstrip() for line in str(src).strip().splitlines())


def nbg(cell) -> dict:
    """The cell's nbgrader metadata (empty dict if none)."""
    meta = cell.get("metadata", {}).get("nbgrader")
    return meta if isinstance(meta, dict) else {}


def grade_id(cell) -> str | None:
    """The cell's nbgrader grade id, or None."""
    return nbg(cell).get("grade_id")


def defined_names(source: str) -> list[str]:
    """Top-level functions, classes and assigned names of a code cell (in order)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.extend(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.extend((a.asname or a.name).split(".")[0] for a in node.names)
    return list(dict.fromkeys(names))


def import_origins(source: str) -> dict[str, str]:
    """Names a cell binds by import -> what they import (``{"np": "numpy", "PCA": "sklearn.decomposition.PCA"}``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def strip_solution_markers(source: str) -> str:
    """An answer cell's source without the ``### BEGIN/END SOLUTION`` lines."""
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in (SOLUTION_BEGIN, SOLUTION_END))


@dataclass(frozen=True)
class GradeCell:
    """A graded (test) cell: ``grade_id = <item>__<part>``."""
    grade_id: str
    item: str
    points: float
    hidden: bool
    cell_id: str | None


@dataclass(frozen=True)
class AnswerCell:
    """An autograded answer cell and the top-level functions/classes its solution defines."""
    grade_id: str
    item: str
    cell_id: str | None
    defines: tuple[str, ...]


@dataclass
class LessonSpec:
    """The lesson as the grader sees it (built by :func:`load_spec`)."""
    meta: LessonMeta
    source_path: Path
    release_path: Path
    source: nbformat.NotebookNode
    release: nbformat.NotebookNode
    grade_cells: dict[str, GradeCell]
    answer_cells: dict[str, AnswerCell]
    locked_cells: dict[str, str]             # grade_id -> source, locked helper cells (not graded)
    release_sources: dict[str, str]          # grade_id -> normalised released source
    demo_ids: frozenset[str]
    demo_sources: frozenset[str]
    items: list[str]                         # items that have grade cells, in notebook order
    protected_names: frozenset[str] = field(default_factory=frozenset)   # names the locked cells define
    protected_imports: dict[str, str] = field(default_factory=dict)      # ... of which imports: name -> module

    @property
    def lesson_id(self) -> str:
        return self.meta.lesson_id

    @property
    def notebook_name(self) -> str:
        return self.meta.notebook

    @property
    def total_points(self) -> float:
        return sum(g.points for g in self.grade_cells.values())

    @property
    def missing_items(self) -> list[str]:
        """Items listed in the metadata that have no grade cells in the notebook yet."""
        return [i for i in self.meta.items if i not in self.items]

    def item_points(self, item: str) -> float:
        return sum(g.points for g in self.grade_cells.values() if g.item == item)

    def objective(self, item: str) -> str:
        return self.meta.objective_of.get(item, "?")

    def objectives_present(self) -> list[str]:
        return [lo for lo in self.meta.objectives if any(self.objective(i) == lo for i in self.items)]

    def answers_of(self, item: str) -> list[AnswerCell]:
        return [a for a in self.answer_cells.values() if a.item == item]


class SpecError(RuntimeError):
    """The lesson's notebooks are missing or inconsistent with its metadata."""


def load_spec(lesson_id: str, root: Path = ROOT) -> LessonSpec:
    """Read metadata, source and released notebooks of ``lesson_id`` and derive the grading spec."""
    meta = load_lesson(lesson_id)
    src_path = root / "solutions" / lesson_id / meta.notebook
    rel_path = root / "lessons" / lesson_id / meta.notebook
    for p, what in ((src_path, "instructor source"), (rel_path, "released student version")):
        if not p.is_file():
            raise SpecError(f"the {what} notebook {p} does not exist (run `make notebooks`)")
    source = nbformat.read(src_path, as_version=4)
    release = nbformat.read(rel_path, as_version=4)
    grade_cells: dict[str, GradeCell] = {}
    answers: dict[str, AnswerCell] = {}
    locked: dict[str, str] = {}
    demo_ids, demo_sources, items = set(), set(), []
    protected: set[str] = set()
    imports: dict[str, str] = {}
    for cell in source.cells:
        meta_nbg, gid = nbg(cell), grade_id(cell)
        if cell.cell_type != "code":
            continue
        if not gid:
            if cell.get("id"):
                demo_ids.add(cell["id"])
            demo_sources.add(norm_source(cell.source))
            continue
        item = item_of(gid)
        if meta_nbg.get("grade"):
            if item not in meta.items:
                raise SpecError(f"grade cell {gid!r}: item {item!r} is not in the lesson metadata")
            grade_cells[gid] = GradeCell(gid, item, float(meta_nbg.get("points", 0)), HIDDEN_BEGIN in cell.source,
                                         cell.get("id"))
            if item not in items:
                items.append(item)
        elif meta_nbg.get("solution"):
            answers[gid] = AnswerCell(gid, item, cell.get("id"), tuple(
                n for n in defined_names(strip_solution_markers(cell.source)) if not n.startswith("_")))
        elif meta_nbg.get("locked"):
            locked[gid] = cell.source
            protected.update(defined_names(cell.source))
            imports.update(import_origins(cell.source))
    release_sources = {grade_id(c): norm_source(c.source) for c in release.cells if grade_id(c)}
    if not grade_cells:
        raise SpecError(f"{src_path} has no nbgrader grade cells")
    return LessonSpec(meta, src_path, rel_path, source, release, grade_cells, answers, locked, release_sources,
                      frozenset(demo_ids), frozenset(demo_sources), items, frozenset(protected), imports)


# ---- submissions ------------------------------------------------------------------------------
class SubmissionError(ValueError):
    """The submitted file cannot be graded (the student is reported as errored with this message)."""


def read_submission(path: Path, max_bytes: int) -> nbformat.NotebookNode:
    """Read and sanity-check a submitted notebook; raise :class:`SubmissionError` naming the problem."""
    size = path.stat().st_size
    if size > max_bytes:
        raise SubmissionError(
            f"the notebook is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit (huge saved outputs?): "
            "clear all outputs and resubmit")
    if size == 0:
        raise SubmissionError("the notebook file is empty")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SubmissionError(f"the notebook is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise SubmissionError(f"the notebook is not valid JSON (corrupt or truncated): {e.msg} at line {e.lineno}, "
                              f"column {e.colno}") from None
    if not isinstance(data, dict) or "cells" not in data or not isinstance(data.get("cells"), list):
        raise SubmissionError("the file is JSON but not a Jupyter notebook (no 'cells' list)")
    if data.get("nbformat") != 4:
        raise SubmissionError(f"unsupported notebook format version {data.get('nbformat')!r} (expected 4)")
    try:
        nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    except Exception as e:  # nbformat raises several kinds
        raise SubmissionError(f"nbformat cannot read the notebook: {type(e).__name__}: {e}") from None
    for i, cell in enumerate(nb.cells):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            raise SubmissionError(f"cell {i} is malformed (no valid cell_type)")
        if not isinstance(cell.get("source", ""), str):
            raise SubmissionError(f"cell {i} has a malformed source")
    return nb


def is_demo(cell, spec: LessonSpec) -> bool:
    """An ordinary cell of the source notebook (matched by id, or by unchanged source)."""
    if cell.cell_type != "code" or grade_id(cell):
        return False
    cid = cell.get("id")
    if cid and cid in spec.demo_ids:
        return True
    return norm_source(cell.source) in spec.demo_sources


def is_added(cell, spec: LessonSpec) -> bool:
    """A code cell the student added (neither an nbgrader cell nor a source demo cell)."""
    return cell.cell_type == "code" and not grade_id(cell) and not is_demo(cell, spec)


LABEL = "autograder"   # cell metadata key: the grader's label of each cell of the graded notebook (pipeline.label_cells)


def cell_number(cell, index: int) -> int | None:
    """The student's own number of the cell at ``index`` (1-based, every cell counted, as the student
    counts them in the notebook they handed in): the grader's label when the notebook was prepared for
    grading (``None``: a cell the grader put back), else ``index + 1``."""
    meta = cell.get("metadata", {}).get(LABEL)
    if isinstance(meta, dict) and "cell" in meta:
        n = meta["cell"]
        return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 100_000 else None
    return index + 1


def cell_label(cell, index: int) -> str:
    """``cell N (grade id)`` or ``cell N (id …)``, N from :func:`cell_number`: how evidence and notes name
    a cell (``a cell the grader put back (grade id)`` for one the student deleted)."""
    gid, n = grade_id(cell), cell_number(cell, index)
    where = f"cell {n}" if n is not None else "a cell the grader put back"
    return f"{where} ({gid})" if gid else f"{where} (id {cell.get('id', '?')})"


def repair(nb, spec: LessonSpec) -> nbformat.NotebookNode:
    """Put back deleted nbgrader cells (released version) at their source position.

    nbgrader re-adds deleted *test* cells, but not a deleted locked helper cell (then every test
    fails with NameError) and it crashes when a test cell and the answer cell before it are both
    gone. Re-inserting every missing nbgrader cell first makes both cases gradable.
    """
    nb = copy.deepcopy(nb)
    present = {grade_id(c) for c in nb.cells if grade_id(c)}
    release_cells = [c for c in spec.release.cells if grade_id(c)]
    order = [grade_id(c) for c in release_cells]
    for k, cell in enumerate(release_cells):
        gid = grade_id(cell)
        if gid in present:
            continue
        before = [g for g in order[:k] if g in present]
        pos = 0
        if before:
            pos = max(i for i, c in enumerate(nb.cells) if grade_id(c) == before[-1]) + 1
        else:  # before the first nbgrader cell still present, or at the end
            after = [i for i, c in enumerate(nb.cells) if grade_id(c) in set(order[k + 1:])]
            pos = min(after) if after else len(nb.cells)
        nb.cells.insert(pos, copy.deepcopy(cell))
        present.add(gid)
    return nb


def drop_demo_cells(nb, spec: LessonSpec) -> nbformat.NotebookNode:
    """Fast mode: the submission without the source notebook's ordinary demo cells.

    Kept: every nbgrader cell, every markdown cell and every code cell the student added or whose
    id is not a source demo id. Trade-off: a student's answer that (against the exercise text)
    relies on a variable made by a demo cell fails here but would pass in full mode.
    """
    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if not is_demo(c, spec)]
    return nb
