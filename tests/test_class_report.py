"""The class report (autograder/results/class_report.py): numbers against independent references, the page
an instructor reads (headings, tables, no script), CSV files a spreadsheet opens safely, and axe-core."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.results import class_report as cr  # noqa: E402

ITEMS = {"a": {"objective": "LO1", "max_score": 4.0}, "b": {"objective": "LO2", "max_score": 2.0}}
TITLES = {"a": "Item A title", "b": "Item B title"}


def student(name, a, b, status="graded", detail=None, late=False):
    """A results.json student row written by hand (not by the pipeline)."""
    items = [{"item": "a", "objective": "LO1", "score": a, "max_score": 4.0, "parts": {},
              "recheck": "mismatch" if detail else "pass", "recheck_detail": detail or ""},
             {"item": "b", "objective": "LO2", "score": b, "max_score": 2.0, "parts": {}, "recheck": "pass",
              "recheck_detail": ""}]
    row = {"student": name, "status": status, "score": a + b, "pass": (a + b) >= 4.5, "late": late,
           "objectives": {"LO1": {"score": a, "max_score": 4.0}, "LO2": {"score": b, "max_score": 2.0}},
           "items": items, "reason": ""}
    if status == "errored":
        row.update(score=None, items=[], objectives={}, reason="unreadable notebook\x1b[31m")
    return row


def results():
    a = [4, 2, 4, 0, 2, 4, 0, 2]
    b = [2, 2, 0, 0, 2, 2, 0, 1]
    rows = [student(f"s{i}", float(x), float(y), detail="rank uses sigma, not sigma squared — secret" if x == 2 else
                    ("returns the uncentred rank — x" if x == 0 else None), late=(i == 1)) for i, (x, y) in enumerate(zip(a, b))]
    rows.append(student("=HYPERLINK(\"x\")", 0.0, 0.0, status="errored"))
    return {"lesson": "L", "threshold": 0.75, "items": ITEMS, "objectives": {"LO1": "one", "LO2": "two"},
            "students": rows}, np.array(a, float), np.array(b, float)


def test_numbers_match_independent_references():
    res, a, b = results()
    rep = cr.build(res, TITLES)
    ia, ib = rep.items
    assert ia.facility == pytest.approx(a.mean() / 4) and ib.facility == pytest.approx(b.mean() / 2)
    total = a + b
    assert ia.discrimination == pytest.approx(np.corrcoef(a, total - a)[0, 1], abs=1e-12)
    assert ib.discrimination == pytest.approx(np.corrcoef(b, total - b)[0, 1], abs=1e-12)
    assert (ia.full, ia.zero, ib.full, ib.zero) == (3, 2, 4, 3)
    assert ia.distribution == {"0": 2, "2": 3, "4": 3}
    assert rep.counts == {"graded": 8, "flagged": 0, "errored": 1} and rep.late == 1
    assert rep.passed == int(((a + b) >= 4.5).sum())
    lo1 = rep.objectives[0]
    assert lo1.mastery == pytest.approx(float((a / 4 >= 0.75).mean()))
    assert lo1.mean_percent == pytest.approx(float((a / 4).mean()))


def test_failed_properties_are_counted_with_examples_and_no_instructor_detail():
    res, a, _ = results()
    props = cr.build(res, TITLES).properties
    assert [(p.prop, p.count) for p in props] == [("rank uses sigma, not sigma squared", 3),
                                                  ("returns the uncentred rank", 2)]
    assert props[0].examples == ["s1", "s4", "s7"] and props[0].title == "Item A title"
    assert all("secret" not in p.prop for p in props)


def test_discrimination_undefined_when_constant():
    assert cr.pearson([1, 1, 1], [0, 1, 2]) is None and cr.pearson([0, 1], [1, 0]) is None


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="students"):
        cr.build({"lesson": "x"})


def test_page_and_files(tmp_path):
    res, _, _ = results()
    paths = cr.write(res, tmp_path, TITLES)
    page = BeautifulSoup(paths["html"].read_text(), "html.parser")
    heads = [h.name + ":" + h.get_text() for h in page.find_all(["h1", "h2"])]
    assert heads == ["h1:Class report: L", "h2:What to re-teach", "h2:Items", "h2:Most frequent failed properties",
                     "h2:Learning objectives", "h2:Errored submissions"]
    assert not page.find("script") and "\x1b" not in paths["html"].read_text()
    assert all(img.get("alt") for img in page.find_all("img")) and len(page.find_all("img")) == 2
    assert "Item A title: the class earned 56% of its points" in page.get_text()
    with paths["items"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["title"] for r in rows] == ["Item A title", "Item B title"] and rows[0]["facility"] == "0.5625"
    with paths["properties"].open() as f:
        assert [r["count"] for r in csv.DictReader(f)] == ["3", "2"]
    errored = page.find("caption", string="Errored submissions and why").find_parent("table")
    assert '=HYPERLINK' in errored.get_text()   # shown as text on the page, escaped


def test_csv_cells_cannot_start_a_formula():
    assert cr._csv_cell("=1+1") == "'=1+1" and cr._csv_cell(-0.5) == "-0.5" and cr._csv_cell("@x") == "'@x"
    assert cr._csv_cell("-1") == "'-1"   # text that looks like a number is still text from a student


def test_command_line(tmp_path):
    res, _, _ = results()
    res["lesson"] = "tc-module-03-lesson-02-subspaces-bandwidth"
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert cr.main([str(tmp_path)]) == 0
    assert "Class report: tc-module-03-lesson-02-subspaces-bandwidth" in (tmp_path / "class_report.html").read_text()
    from autograder.ingest.notebook import load_spec
    from autograder.check.scoring import exercise_titles
    titles = cr.item_titles(res["lesson"])
    assert titles == exercise_titles(load_spec(res["lesson"])) and titles["checkpoint_1"].startswith("Checkpoint 1")
    assert cr.main([str(tmp_path / "nowhere")]) == 1


@pytest.mark.skipif(__import__("autograder.a11y.check_a11y", fromlist=["x"]).find_chromium() is None,
                    reason="Chromium is not installed (.ci/run installs it)")
def test_page_passes_axe(tmp_path):
    from autograder.a11y import check_a11y as a11y
    from tests.test_autograder_a11y import ensure_axe
    ensure_axe()
    res, _, _ = results()
    paths = cr.write(res, tmp_path, TITLES)
    report = a11y.check([a11y.Page("class_report.html", paths["html"])], a11y.find_chromium(), [])
    assert not report.unjustified, [f.__dict__ for f in report.unjustified]
