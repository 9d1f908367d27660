"""nbgrader's Validate tells the truth (issue 23 item 8), and the student's lab hides the instructor tools.

Validate (the button students press before submitting; ``nbgrader.validator.Validator``, whose
``nbgrader validate`` command exits 0 even on failure, so the result is checked here) must list every
exercise that is not attempted or fails, while Run All still runs to the end. The graded cells need
no model (the set-up helper cell says so), so the three states are checked on the student notebook's
graded cells alone: untouched, half done (two solved, one wrong, three untouched) and complete.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbgrader.validator import Validator
from traitlets.config import Config

from residual_bandwidth.course import load_lesson

ROOT = Path(__file__).resolve().parents[1]
META = load_lesson()
SOURCE = ROOT / "solutions" / META.lesson_id / META.notebook
RELEASE = ROOT / "lessons" / META.lesson_id / META.notebook
os.environ.setdefault("MPLBACKEND", "Agg")

NO_CENTRING = '''def effective_rank_family(X):
    X = torch.as_tensor(X).double()
    s = torch.linalg.svdvals(X)            # forgot to centre
    lam = s ** 2
    q = s[s > 0] / s.sum()
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()), "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
'''


def nbg(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def graded_only(answers: dict[str, str]) -> nbformat.NotebookNode:
    """The student notebook's nbgrader cells (helpers, answers, tests); ``answers`` {item: source}
    replaces the answer cells of those items (the rest stay untouched)."""
    nb = nbformat.read(RELEASE, 4)
    nb.cells = [c for c in nb.cells if c.cell_type == "code" and nbg(c)]
    for c in nb.cells:
        item = nbg(c).get("grade_id", "").split("__")[0]
        if nbg(c).get("solution") and item in answers:
            c.source = answers[item]
    return nb


def solutions() -> dict[str, str]:
    src = nbformat.read(SOURCE, 4)
    return {nbg(c)["grade_id"].split("__")[0]: c.source for c in src.cells if nbg(c).get("solution")}


def validate(nb, tmp_path: Path, name: str) -> dict:
    path = tmp_path / name / META.notebook
    path.parent.mkdir()
    nbformat.write(nb, path)
    return Validator(config=Config({"Execute": {"timeout": 600}})).validate(str(path))


def failed_items(result: dict) -> dict[str, str]:
    """``{item: error text}`` of the failed cells Validate lists (each visible test cell takes its inputs
    with ``checks.inputs(...)`` and makes one call ``checks.<item>(...)``, so its source names the item)."""
    out = {}
    for f in result.get("failed", []):
        m = re.search(r"checks\.(?!inputs\b)(\w+)\(", f["source"])
        assert m, f"Validate listed a cell that is not a visible test: {f['source'][:200]}"
        out[m.group(1)] = f["raw_error"]
    return out


def test_validate_lists_every_not_attempted_or_failing_item(tmp_path):
    items = list(META.items)
    # untouched: every item is listed as not attempted, and Run All reaches the end (no cell raises)
    untouched = graded_only({})
    listed = failed_items(validate(untouched, tmp_path, "untouched"))
    assert sorted(listed) == sorted(items), listed
    assert all("not attempted yet" in text for text in listed.values()), listed
    NotebookClient(untouched, timeout=600, kernel_name="python3").execute()   # raises on any error
    assert not [o for c in untouched.cells for o in c.outputs if o.output_type == "error"]

    # half done: two solved, one wrong (visible test names the cause), the rest untouched
    sol = solutions()
    half = {"checkpoint_1": sol["checkpoint_1"], "checkpoint_2": sol["checkpoint_2"],
            "summative_q1": NO_CENTRING}
    listed = failed_items(validate(graded_only(half), tmp_path, "half"))
    assert sorted(listed) == sorted(set(items) - {"checkpoint_1", "checkpoint_2"}), listed
    assert "subtract the mean row" in listed["summative_q1"] and "AssertionError" in listed["summative_q1"]
    assert all("not attempted yet" in listed[i] for i in set(listed) - {"summative_q1"}), listed

    # complete: nothing listed
    assert validate(graded_only(sol), tmp_path, "complete") == {}


def test_student_lab_hides_the_instructor_tools_and_keeps_validate():
    """``make lab`` points JUPYTER_CONFIG_DIR at tools/student_lab_config: the lab plugins and server
    extensions that binder/postBuild disables are disabled (and locked) there too; Validate is kept."""
    cfg = ROOT / "tools" / "student_lab_config"
    assert f"JUPYTER_CONFIG_DIR=$(abspath {cfg.relative_to(ROOT).as_posix()})" in (ROOT / "Makefile").read_text()
    post = (ROOT / "binder" / "postBuild").read_text()
    plugins = re.search(r"NBGRADER_LAB_PLUGINS=\((.*?)\)", post, re.S).group(1).split()
    servers = re.search(r"NBGRADER_SERVER_EXTENSIONS=\((.*?)\)", post, re.S).group(1).split()
    page = json.loads((cfg / "labconfig" / "page_config.json").read_text())
    assert {p for p, off in page["disabledExtensions"].items() if off} == set(plugins)
    assert {p for p, on in page["lockedExtensions"].items() if on} == set(plugins)
    server = json.loads((cfg / "jupyter_server_config.json").read_text())["ServerApp"]["jpserver_extensions"]
    assert {e for e, on in server.items() if not on} == set(servers)
    assert not any("validate" in x for x in plugins + servers)
