"""Build the nbgrader source notebook of a lesson from its text source.

The lesson is written as a jupytext *percent* file, ``solutions/<lesson-id>/lesson.py``: markdown
cells are plain markdown (``# %% [markdown]``), code cells are real code (``# %%``), and instructors
can open the file as a notebook in JupyterLab (jupytext is in the ``course`` extra). This script
reads it with jupytext, turns the cell *roles* declared in the cell headers into nbgrader metadata,
and writes ``solutions/<lesson-id>/lesson.ipynb``; ``nbgrader generate_assignment`` then makes the
student version in ``lessons/`` (``make notebooks`` does both; ``--check`` only compares).

Cell roles (``key=value`` pairs in the header line; values are JSON)::

    # %% role="answer" grade_id="checkpoint_1__answer"            autograded answer: the code between
                                                                  ### BEGIN SOLUTION / ### END SOLUTION
                                                                  becomes a stub for students
    # %% role="tests" grade_id="checkpoint_1__visible" points=1   graded, locked test cell; code between
                                                                  ### BEGIN HIDDEN TESTS / ### END HIDDEN
                                                                  TESTS is removed for students
    # %% role="locked" grade_id="setup__checks"                   read-only helper cell
    # %% tags=["parameters"]                                      ordinary cells may carry tags
    # %% hidden=true                                              source collapsed when the notebook
                                                                  opens (jupyter.source_hidden): set-up
                                                                  and helper cells

Grade ids are ``<item>__<part>`` and every item of the lesson metadata needs a ``__visible`` and a
``__hidden`` tests cell. Cell ids are derived, never numbered: a grade cell's id is its grade id, an
ordinary cell may set ``id="..."``, and otherwise its id is ``<kind>-<first 10 hex of sha1(source)>``
(so inserting a cell changes no other cell's id).

``{{ name }}`` in a cell is replaced by a value of the lesson metadata: ``repository`` (GitHub
owner/name), ``colab_url``, ``binder_url``, ``lesson_id``, ``notebook``. Anything wrong in the
source (unknown role or key, duplicate grade id, points missing, an unknown ``{{ }}`` name, a
missing solution marker) stops the build with the file's line number.
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
from residual_bandwidth.course import item_of, load_lesson  # noqa: E402

ROLES = ("answer", "tests", "locked")
KEYS = {"role", "grade_id", "points", "tags", "id", "hidden"}
# metadata jupytext itself may add while parsing; it describes the text layout, not the cell
JUPYTEXT_KEYS = {"lines_to_next_cell", "lines_to_end_of_cell_marker", "cell_marker", "region_name"}
MARKERS = {"BEGIN SOLUTION": "END SOLUTION", "BEGIN HIDDEN TESTS": "END HIDDEN TESTS"}
TOKEN = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")


class LessonSourceError(ValueError):
    """The lesson source is malformed; the message names the file and line."""


def links(meta) -> dict[str, str]:
    """The values ``{{ name }}`` may refer to, all derived from the lesson metadata."""
    repo = meta.raw["metadata"]["execution"]["repository"]
    path = f"lessons/{meta.lesson_id}/{meta.notebook}"
    return {
        "repository": repo,
        "lesson_id": meta.lesson_id,
        "notebook": meta.notebook,
        "colab_url": f"https://colab.research.google.com/github/{repo}/blob/main/{path}",
        "binder_url": f"https://mybinder.org/v2/gh/{repo}/HEAD?labpath={path.replace('/', '%2F')}",
    }


def _header_lines(text: str) -> list[int]:
    """1-based line numbers of the ``# %%`` cell headers, in order."""
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith("# %%")]


def _cell_id(cell, used: set[str]) -> str:
    meta = cell.metadata
    gid = meta.get("nbgrader", {}).get("grade_id")
    if gid:
        base = gid.replace("__", "-")
    elif "id" in meta:
        base = str(meta.pop("id"))
    else:
        digest = hashlib.sha1(cell.source.encode()).hexdigest()[:10]
        base = f"{'md' if cell.cell_type == 'markdown' else 'code'}-{digest}"
    cid, k = base, 1
    while cid in used:  # two identical cells: the later one gets a suffix
        k += 1
        cid = f"{base}-{k}"
    used.add(cid)
    return cid


def _check_markers(source: str, where: str, required: tuple[str, ...] = ()) -> None:
    for begin, end in MARKERS.items():
        b, e = source.count(f"### {begin}"), source.count(f"### {end}")
        if b != e or source.find(f"### {begin}") > source.find(f"### {end}"):
            raise LessonSourceError(f"{where}: unbalanced '### {begin}' / '### {end}'")
    for begin in required:
        if f"### {begin}" not in source:
            raise LessonSourceError(f"{where}: an answer cell needs '### {begin}' ... '### {MARKERS[begin]}'")


def convert(source_path: Path, meta=None) -> nbformat.NotebookNode:
    """Read the percent-format lesson source and return the nbgrader source notebook."""
    meta = meta or load_lesson()
    text = source_path.read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    heads = _header_lines(text)
    if len(heads) != len(nb.cells):
        raise LessonSourceError(f"{source_path}: {len(heads)} '# %%' headers but jupytext read {len(nb.cells)} "
                                "cells (text before the first '# %%' other than the YAML header?)")
    values = links(meta)
    seen: dict[str, int] = {}
    used: set[str] = set()
    for cell, line in zip(nb.cells, heads):
        where = f"{source_path.name}:{line}"
        md = cell.metadata
        for k in JUPYTEXT_KEYS:
            md.pop(k, None)
        if "incorrectly_encoded_metadata" in md:
            raise LessonSourceError(f"{where}: cannot read the cell header: {md['incorrectly_encoded_metadata']!r} "
                                    '(write key="value" pairs; values are JSON)')
        unknown = set(md) - KEYS
        if unknown:
            raise LessonSourceError(f"{where}: unknown header key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}")

        def fill(m, where=where):
            if m.group(1) not in values:
                raise LessonSourceError(f"{where}: unknown template name {{{{ {m.group(1)} }}}}; "
                                        f"known: {sorted(values)}")
            return values[m.group(1)]
        cell.source = TOKEN.sub(fill, cell.source)

        hidden = md.pop("hidden", False)
        if not isinstance(hidden, bool):
            raise LessonSourceError(f"{where}: hidden= takes true or false, got {hidden!r}")
        if hidden:
            md["jupyter"] = {"source_hidden": True}
        role = md.pop("role", None)
        gid, points = md.pop("grade_id", None), md.pop("points", None)
        if role is None:
            if gid is not None or points is not None:
                raise LessonSourceError(f"{where}: grade_id/points need a role ({', '.join(ROLES)})")
            _check_markers(cell.source, where)
        else:
            if role not in ROLES:
                raise LessonSourceError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if cell.cell_type != "code":
                raise LessonSourceError(f"{where}: role {role!r} is for code cells")
            if not isinstance(gid, str) or not re.fullmatch(r"[a-z0-9_]+__[a-z0-9_]+", gid):
                raise LessonSourceError(f"{where}: role {role!r} needs grade_id=\"<item>__<part>\", got {gid!r}")
            if gid in seen:
                raise LessonSourceError(f"{where}: duplicate grade_id {gid!r} (first at line {seen[gid]})")
            seen[gid] = line
            if role == "tests":
                if not isinstance(points, (int, float)) or isinstance(points, bool) or points <= 0:
                    raise LessonSourceError(f"{where}: a tests cell needs points=<number > 0>, got {points!r}")
                if item_of(gid) not in meta.items:
                    raise LessonSourceError(f"{where}: {gid!r} belongs to no assessment item of the lesson "
                                            f"metadata ({', '.join(meta.items)})")
            elif points is not None:
                raise LessonSourceError(f"{where}: only tests cells carry points")
            _check_markers(cell.source, where, ("BEGIN SOLUTION",) if role == "answer" else ())
            nbg = {"grade": role == "tests", "solution": role == "answer", "locked": role != "answer",
                   "grade_id": gid, "schema_version": 3}
            if role == "tests":
                nbg["points"] = points
            md["nbgrader"] = nbg
        cell.id = _cell_id(cell, used)
    for item in meta.items:
        for part in ("visible", "hidden"):
            if f"{item}__{part}" not in seen:
                raise LessonSourceError(f"{source_path.name}: item {item!r} has no tests cell {item}__{part}")
    out = nbformat.v4.new_notebook()
    out.cells = [_plain(c) for c in nb.cells]
    out.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "lesson": {"id": meta.lesson_id, "title": meta.title},
    }
    nbformat.validate(out)
    return out


def _plain(cell) -> nbformat.NotebookNode:
    """A fresh nbformat cell (no outputs, no execution count) with the cell's id, source and metadata."""
    new = (nbformat.v4.new_markdown_cell if cell.cell_type == "markdown" else nbformat.v4.new_code_cell)(cell.source)
    new.id = cell.id
    new.metadata = nbformat.NotebookNode(dict(cell.metadata))
    return new


def paths(meta) -> tuple[Path, Path]:
    folder = ROOT / "solutions" / meta.lesson_id
    return folder / "lesson.py", folder / meta.notebook


def main(argv: list[str]) -> int:
    meta = load_lesson()
    src, out = paths(meta)
    try:
        text = nbformat.writes(convert(src, meta)) + "\n"
    except LessonSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "--check" in argv:
        if not out.is_file() or out.read_text() != text:
            print(f"{out.relative_to(ROOT)} differs from {src.relative_to(ROOT)}: run make notebooks")
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)} from {src.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
