"""Accessibility: every notebook rendered to HTML and checked with axe-core in headless Chromium.

Pages: the source notebook, the student version and the source executed by papermill (figures with
alt text included). Passing means 0 WCAG 2.1 A/AA violations other than those justified in
``autograder/a11y/allowlist.json``. Skipped only when Chromium is not installed (``.ci/run``
installs Debian's ``chromium``); axe-core is installed from npm into ``autograder/a11y`` when missing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.a11y import check_a11y as a11y  # noqa: E402

CHROMIUM = a11y.find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed, so the axe-core accessibility check cannot run "
                             "(Debian: apt-get install chromium; .ci/run installs it)")


def ensure_axe() -> None:
    """Install axe-core from the lock file if it is missing (the ordinary npm client)."""
    if a11y.AXE.exists():
        return
    npm = shutil.which("npm")
    assert npm, "axe-core is not installed and npm is missing: install Node.js/npm, then `make a11y-deps`"
    r = subprocess.run([npm, "ci", "--prefix", str(a11y.HERE), "--no-audit", "--no-fund", "--loglevel=error"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and a11y.AXE.exists(), f"npm ci for axe-core failed: {r.stdout}{r.stderr}"


def test_allowlist_entries_are_justified():
    entries = a11y.load_allowlist()
    for e in entries:
        assert len(e["why"]) > 40 and e.get("pages"), e


def test_justify_matches_rule_page_and_colour_pair():
    f = a11y.Finding("x/lesson.source.html", "color-contrast", "serious", ".c1", "foreground color: #408080, background color: #f5f5f5")
    other = a11y.Finding("x/lesson.source.html", "color-contrast", "serious", "figcaption", "foreground color: #999999, background color: #ffffff")
    stale = a11y.justify([f, other], a11y.load_allowlist())
    assert f.justification and other.justification is None
    assert stale   # entries that matched nothing are reported


@needs_chromium
def test_axe_runs_and_finds_a_real_violation(tmp_path):
    """The harness must be able to fail: a page with an unlabelled image and no lang attribute."""
    ensure_axe()
    page = tmp_path / "bad.html"
    page.write_text("<html><head><title>t</title></head><body><main><img src='x.png'>"
                    "<p style='color:#aaa;background:#fff'>low contrast</p></main></body></html>")
    report = a11y.check([a11y.Page("bad.html", page)], CHROMIUM, [])
    rules = {f.rule for f in report.findings}
    assert {"image-alt", "html-has-lang", "color-contrast"} <= rules, rules


@needs_chromium
def test_every_notebook_has_no_unjustified_wcag_violations(tmp_path):
    ensure_axe()
    pages = a11y.lesson_pages(tmp_path, None, do_execute=True)
    kinds = {p.name.rsplit(".", 2)[-2] for p in pages}
    assert kinds == {"source", "student", "executed"}, [p.name for p in pages]
    executed = next(p for p in pages if p.name.endswith(".executed.html")).html.read_text()
    assert "<img" in executed and 'alt="' in executed and "<figcaption" in executed, "figures with alt text expected"
    report = a11y.check(pages, CHROMIUM, a11y.load_allowlist())
    (tmp_path / "axe-report.json").write_text(json.dumps([f.__dict__ for f in report.findings], indent=1))
    bad = [f"{f.page}: {f.rule} ({f.impact}) at {f.target}: {f.summary[:160]}" for f in report.unjustified]
    assert not bad, "WCAG 2.1 A/AA violations not justified in autograder/a11y/allowlist.json:\n" + "\n".join(bad[:30])
