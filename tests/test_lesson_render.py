"""What a student sees: the lesson's markdown rendered as JupyterLab renders it, and the text source.

JupyterLab renders markdown cells with a CommonMark renderer that passes raw HTML through (so
``<details>`` works). markdown-it-py's ``commonmark`` preset with HTML enabled and tables follows the
same rules, including the one that broke the first release: a line indented by four spaces is a
code block. Every markdown cell of the instructor source *and* of the student version is rendered
here and checked the way a reader would look at it.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup
from markdown_it import MarkdownIt

from residual_bandwidth.course import load_lesson

ROOT = Path(__file__).resolve().parents[1]
META = load_lesson()
SOURCE = ROOT / "solutions" / META.lesson_id / META.notebook
TEXT_SOURCE = ROOT / "solutions" / META.lesson_id / "lesson.py"
RELEASE = ROOT / "lessons" / META.lesson_id / META.notebook
NOTEBOOKS = {"source": SOURCE, "student": RELEASE}
RENDER = MarkdownIt("commonmark", {"html": True}).enable("table")

sys.path.insert(0, str(ROOT / "tools"))
import build_lesson  # noqa: E402


def rendered(path: Path) -> list[BeautifulSoup]:
    nb = nbformat.read(path, 4)
    return [BeautifulSoup(RENDER.render(c.source), "html.parser") for c in nb.cells if c.cell_type == "markdown"]


def exercise_cells(path: Path) -> list[BeautifulSoup]:
    return [s for s in rendered(path) if "Exercise:" in s.get_text()]


@pytest.mark.parametrize("which", NOTEBOOKS)
def test_exercise_titles_are_headings_not_code(which):
    cells = exercise_cells(NOTEBOOKS[which])
    assert len(cells) == len(META.items), f"{len(cells)} exercise cells for {len(META.items)} graded items"
    for soup in cells:
        heads = [h for h in soup.find_all(["h2", "h3", "h4"]) if h.get_text().startswith("Exercise:")]
        assert len(heads) == 1, f"exercise title is not a heading: {soup.get_text()[:80]!r}"
        meta_line = [p for p in soup.find_all("p") if "Difficulty:" in p.get_text()]
        assert meta_line, f"the Difficulty/Importance/Time line is not a text paragraph under {heads[0].get_text()!r}"
        line = meta_line[0].get_text()
        assert re.search(r"Difficulty: \d of 5 · Importance: \d of 5 · Time: about \d+ minutes", line), line
        assert meta_line[0].find("strong"), "the labels should render bold (no literal **)"


@pytest.mark.parametrize("which", NOTEBOOKS)
def test_no_markdown_syntax_or_entities_inside_code_blocks(which):
    """Markdown meant as text never lands in a code block (the indentation bug of the first release).
    Inline code may legitimately contain ``**`` (a power), so it is checked for the lesson's own markup."""
    for soup in rendered(NOTEBOOKS[which]):
        for block in soup.find_all("pre"):
            text = block.get_text()
            for literal in ("###", "**", "&nbsp;", "<details>", "<summary>"):
                assert literal not in text, f"literal {literal!r} in a code block: {text[:120]!r}"
        for code in soup.find_all("code"):
            text = code.get_text()
            for literal in ("&nbsp;", "<details>", "<summary>", "**Difficulty", "### Exercise"):
                assert literal not in text, f"literal {literal!r} in inline code: {text[:120]!r}"


@pytest.mark.parametrize("which", NOTEBOOKS)
def test_hints_are_closed_details(which):
    n_hints = 0
    for soup in rendered(NOTEBOOKS[which]):
        for summary in soup.find_all("summary"):
            details = summary.find_parent("details")
            assert details is not None, f"<summary> outside <details>: {summary}"
            assert not details.has_attr("open"), f"hint open by default: {summary.get_text()}"
            n_hints += summary.get_text().startswith("Hint")
    assert n_hints >= len(META.items), "every exercise has at least one hint"


@pytest.mark.parametrize("which", NOTEBOOKS)
def test_headings_are_ordered(which):
    """One h1, and no heading skips a level (h2 -> h4) — heading navigation depends on it."""
    levels = [int(h.name[1]) for soup in rendered(NOTEBOOKS[which]) for h in soup.find_all(re.compile("^h[1-6]$"))]
    assert levels[0] == 1 and levels.count(1) == 1, levels[:5]
    for a, b in zip(levels, levels[1:]):
        assert b <= a + 1, f"heading level jumps from h{a} to h{b}"


def test_exercise_times_fit_the_lesson_duration():
    minutes = [int(m) for soup in exercise_cells(SOURCE)
               for m in re.findall(r"Time: about (\d+) minutes", soup.get_text())]
    assert len(minutes) == len(META.items)
    duration = META.raw["metadata"]["execution"]["estimated_duration_minutes"]
    assert sum(minutes) <= duration, f"exercises take {sum(minutes)} min, the lesson {duration} min"


# ---- the text source ---------------------------------------------------------------------------------
def test_code_cells_of_the_text_source_are_python():
    """The source is real, lintable code: it parses as a Python module (markdown lives in comments)."""
    ast.parse(TEXT_SOURCE.read_text(), filename=str(TEXT_SOURCE))


def test_built_notebook_matches_the_text_source():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_lesson.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cell_ids_are_derived_not_numbered(tmp_path):
    """Inserting a cell changes no other cell's id."""
    text = TEXT_SOURCE.read_text()
    before = build_lesson.convert(TEXT_SOURCE, META)
    marker = "# %% [markdown]\n# ## 1. The bandwidth bottleneck"
    edited = tmp_path / "lesson.py"
    edited.write_text(text.replace(marker, "# %%\nprint('a new cell')\n\n" + marker, 1))
    after = build_lesson.convert(edited, META)
    assert len(after.cells) == len(before.cells) + 1
    assert {c.id for c in before.cells} < {c.id for c in after.cells}
    ids = [c.id for c in before.cells]
    assert len(ids) == len(set(ids))
    for c in before.cells:
        gid = c.metadata.get("nbgrader", {}).get("grade_id")
        if gid:
            assert c.id == gid.replace("__", "-")


def test_repository_links_come_from_the_lesson_metadata():
    values = build_lesson.links(META)
    src = nbformat.read(SOURCE, 4)
    text = "\n".join(c.source for c in src.cells)
    assert values["colab_url"] in text and values["binder_url"] in text
    assert f'COURSE_REPO = "{values["repository"]}"' in text
    assert "{{" not in text, "an unfilled template name reached the notebook"
    readme = (ROOT / "README.md").read_text()
    assert values["colab_url"] in readme and values["binder_url"] in readme, "README badges disagree with the metadata"
    other = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", readme + text)) - {values["repository"]}
    assert not other, f"another repository named: {other}"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('role="answer" grade_id="checkpoint_1__answer"', 'role="anwser" grade_id="checkpoint_1__answer"'),
     "unknown role 'anwser'"),
    (lambda t: t.replace('grade_id="checkpoint_2__visible"', 'grade_id="checkpoint_1__visible"'),
     "duplicate grade_id 'checkpoint_1__visible'"),
    (lambda t: t.replace('grade_id="summative_q1__hidden" points=3', 'grade_id="summative_q1__hidden"'),
     "needs points"),
    (lambda t: t.replace('grade_id="summative_q2__answer"', 'grade_id="summative_q2__answer" colour="red"'),
     "unknown header key"),
    (lambda t: t.replace("{{ colab_url }}", "{{ colab_link }}"), "unknown template name"),
    (lambda t: t.replace("    ### END SOLUTION\n", "", 1), "unbalanced"),
    (lambda t: t.replace('grade_id="checkpoint_3__hidden" points=3', 'grade_id="checkpoint_9__hidden" points=3'),
     "belongs to no assessment item"),
])
def test_malformed_source_fails_with_the_line_named(tmp_path, edit, message):
    text = TEXT_SOURCE.read_text()
    bad = edit(text)
    assert bad != text, "the edit did not apply"
    path = tmp_path / "lesson.py"
    path.write_text(bad)
    with pytest.raises(build_lesson.LessonSourceError, match=re.escape(message)) as e:
        build_lesson.convert(path, META)
    assert re.search(r"lesson\.py(:\d+)?: ", str(e.value)), f"no file/line in {e.value}"
    line = re.search(r"lesson\.py:(\d+)", str(e.value))
    if line:  # the named line is a cell header
        assert bad.splitlines()[int(line.group(1)) - 1].startswith("# %%")


def test_nothing_uses_the_course_package_before_the_setup_cell_installs_it():
    """Colab starts without the course package: every code cell before the set-up cell must run without
    it, and the set-up cell installs it (from the metadata's repository) before importing it."""
    nb = nbformat.read(RELEASE, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = next(i for i, c in enumerate(code) if "pip_install(f\"residual-bandwidth @ git+https://github.com/" in c.source)
    for c in code[:setup]:
        tree = ast.parse(c.source)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "residual_bandwidth" not in imported, f"cell {c.id} imports the course package before it is installed"
        assert not re.search(r"\brb\.", c.source), f"cell {c.id} uses rb before the set-up cell"
    src = code[setup].source
    assert src.index("pip_install(f\"residual-bandwidth @") < src.index("import residual_bandwidth as rb")
    assert "importlib.util.find_spec(\"residual_bandwidth\") is None" in src
    params = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    assert code.index(params) < setup
    assert f'COURSE_REPO = "{build_lesson.links(META)["repository"]}"' in params.source


def test_running_a_cell_too_early_names_the_cell_to_run_first():
    """In a real kernel: after only the first cell, a cell that needs the captured stream says which
    cell defines it, and one that needs the model points at the set-up cell."""
    from nbclient import NotebookClient
    nb = nbformat.read(RELEASE, 4)
    guide = next(c for c in nb.cells if "FIRST_DEFINED_IN = {" in c.source)
    probe = nbformat.v4.new_notebook()
    probe.cells = [nbformat.v4.new_code_cell(guide.source),
                   nbformat.v4.new_code_cell("cap.get('resid_post', L)"),
                   nbformat.v4.new_code_cell("model(**tokenizer('hi', return_tensors='pt'))"),
                   nbformat.v4.new_code_cell("some_name_nobody_defines")]
    NotebookClient(probe, timeout=120, kernel_name="python3", allow_errors=True).execute()
    texts = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in probe.cells]
    errors = [[o.ename for o in c.outputs if o.output_type == "error"] for c in probe.cells]
    assert errors[1] == ["NameError"] and "section 2 (Capturing the residual stream)" in texts[1], texts[1]
    assert "set-up cell of section 0" in texts[2], texts[2]
    assert "starting with section 0 (Setup)" in texts[3], texts[3]


def test_set_up_and_helper_cells_are_collapsed_so_the_lesson_starts_at_once():
    """The set-up and helper cells open collapsed (jupyter.source_hidden, from ``hidden=true`` in the
    cell header of the text source): at most 15 visible code lines come before section 1's idea."""
    for path in (SOURCE, RELEASE):
        nb = nbformat.read(path, 4)
        visible, collapsed = 0, []
        for c in nb.cells:
            if c.cell_type == "markdown" and c.source.startswith("## 1."):
                break
            if c.cell_type == "code":
                if c.metadata.get("jupyter", {}).get("source_hidden"):
                    collapsed.append(c.source)
                else:
                    visible += len(c.source.splitlines())
        assert visible <= 15, (path, visible)
        assert any("set_custom_exc" in s for s in collapsed) and any("load_model" in s for s in collapsed)
        assert any("checks, close, not_attempted" in s for s in collapsed)

