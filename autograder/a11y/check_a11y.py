"""Accessibility check: every course notebook rendered to HTML and tested with axe-core in Chromium.

    python -m autograder.a11y.check_a11y [--report DIR] [--executed NB] [--no-execute]

Pages checked: for every lesson, the instructor source notebook (``solutions/``), the student
version (``lessons/``) and the source notebook *executed* by papermill on the embedded model (so
the figures with their alt text and data tables are part of the page). Each is rendered with
nbconvert (lab template) and loaded from a ``file://`` URL into headless Debian Chromium (started
with ``--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking
--disable-component-update --disable-sync`` and a fresh ``--user-data-dir``), driven over the Chrome
DevTools protocol; axe-core (npm, installed in ``autograder/a11y/node_modules`` by
``make a11y-deps``) runs with the WCAG 2.0/2.1 level A and AA rules.

The check passes when every violation is justified in ``allowlist.json``: each entry has a ``rule``
(axe rule id), ``pages`` (globs over ``<lesson>/<notebook>.{source,student,executed}.html``),
optionally ``target_contains`` (a CSS-selector fragment) and ``summary_contains`` (a fragment of
axe's failure summary, e.g. the exact colour pair), and ``why`` — the written justification. Violations are written to
``<report>/axe-report.json``; unjustified ones are printed and make the exit code 1. Exit code 4
means the tools are missing (no Chromium, or axe-core not installed).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
AXE = HERE / "node_modules" / "axe-core" / "axe.min.js"
ALLOWLIST = HERE / "allowlist.json"
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
TOOLS_MISSING = 4


class ToolsMissing(RuntimeError):
    """Chromium or axe-core is not installed."""


def find_chromium(explicit: str | None = None) -> str | None:
    """Path of the Chromium binary (explicit, $CHROMIUM, or on PATH), or None."""
    for cand in ([explicit] if explicit else []) + [os.environ.get("CHROMIUM"), "chromium", "chromium-browser",
                                                     "/usr/bin/chromium"]:
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


# ---- pages ---------------------------------------------------------------------------------------------
@dataclass
class Page:
    """One rendered notebook."""
    name: str          # e.g. "tc-.../lesson.source.html"
    html: Path


def render(nb_path: Path, out_html: Path) -> Path:
    """nbconvert a notebook to standalone HTML (lab template)."""
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(str(nb_path), as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(body, encoding="utf-8")
    return out_html


def execute(source: Path, out: Path) -> Path:
    """Run the solutions notebook with papermill on the embedded (offline) model."""
    import papermill as pm
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(source), str(out), parameters={"MODEL": "embedded"}, kernel_name="python3",
                        progress_bar=False, cwd=str(source.parent))
    return out


def lesson_pages(report: Path, executed: dict[str, Path] | None, do_execute: bool) -> list[Page]:
    """Render source, student and executed versions of every lesson in the repository."""
    pages = []
    for source in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        lesson = source.parent.name
        stem = source.stem
        pages.append(Page(f"{lesson}/{stem}.source.html", render(source, report / lesson / f"{stem}.source.html")))
        student = ROOT / "lessons" / lesson / source.name
        if student.exists():
            pages.append(Page(f"{lesson}/{stem}.student.html", render(student, report / lesson / f"{stem}.student.html")))
        ran = (executed or {}).get(lesson)
        if ran is None and do_execute:
            ran = execute(source, report / lesson / f"{stem}.executed.ipynb")
        if ran is not None:
            pages.append(Page(f"{lesson}/{stem}.executed.html", render(ran, report / lesson / f"{stem}.executed.html")))
    return pages


# ---- Chromium over the DevTools protocol ---------------------------------------------------------------
class Browser:
    """Headless Chromium with a fresh profile, driven over CDP (websocket-client)."""

    def __init__(self, chromium: str):
        import websocket
        self.profile = Path(tempfile.mkdtemp(prefix="a11y-chromium-"))
        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{chromium} did not start its DevTools endpoint")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=120, suppress_origin=True)
        self._id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 120) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(method)

    def wait_event(self, name: str, session: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self.ws.settimeout(1)
        try:
            while time.monotonic() < deadline:
                try:
                    msg = json.loads(self.ws.recv())
                except Exception:  # socket timeout: poll again
                    continue
                if msg.get("method") == name and msg.get("sessionId") == session:
                    return True
            return False
        finally:
            self.ws.settimeout(120)

    def axe(self, url: str, axe_source: str) -> list[dict]:
        """Load ``url`` in a new tab, run axe-core, return its violations."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            self.call("Page.enable", session=session)
            self.call("Page.navigate", {"url": url}, session=session)
            self.wait_event("Page.loadEventFired", session, 90)   # offline: CDN scripts fail fast
            self.call("Runtime.evaluate", {"expression": axe_source}, session=session)
            options = {"runOnly": {"type": "tag", "values": TAGS}, "resultTypes": ["violations"]}
            res = self.call("Runtime.evaluate", {
                "expression": f"axe.run(document, {json.dumps(options)}).then(r => JSON.stringify(r.violations))",
                "awaitPromise": True, "returnByValue": True}, session=session, timeout=300)
            if "exceptionDetails" in res:
                raise RuntimeError(f"axe failed on {url}: {res['exceptionDetails']}")
            return json.loads(res["result"]["value"])
        finally:
            self.call("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, 9)
        except OSError:
            pass
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# ---- the allowlist -------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One axe violation on one element of one page."""
    page: str
    rule: str
    impact: str
    target: str
    summary: str
    justification: str | None = None


@dataclass
class Report:
    """All findings of one check, and the allowlist entries that matched nothing."""
    pages: list[str]
    findings: list[Finding] = field(default_factory=list)
    unused_allow: list[dict] = field(default_factory=list)

    @property
    def unjustified(self) -> list[Finding]:
        """Findings no allowlist entry justifies (these fail the check)."""
        return [f for f in self.findings if not f.justification]


def load_allowlist(path: Path = ALLOWLIST) -> list[dict]:
    """The allowlist entries; each must name a rule and give a written reason."""
    data = json.loads(path.read_text())
    entries = data.get("entries", [])
    for e in entries:
        if not e.get("rule") or not e.get("why", "").strip():
            raise ValueError(f"{path}: every entry needs a rule and a written justification ('why'): {e}")
    return entries


def justify(findings: list[Finding], allow: list[dict]) -> list[dict]:
    """Attach justifications; return the allowlist entries that matched nothing (stale)."""
    used = set()
    for f in findings:
        for k, e in enumerate(allow):
            if e["rule"] == f.rule and any(fnmatch.fnmatch(f.page, g) for g in e.get("pages", ["*"])) \
                    and e.get("target_contains", "") in f.target and e.get("summary_contains", "") in f.summary:
                f.justification = e["why"]
                used.add(k)
                break
    return [e for k, e in enumerate(allow) if k not in used]


def check(pages: list[Page], chromium: str, allow: list[dict]) -> Report:
    """Run axe-core on every page in one browser; return findings with their justifications."""
    if not AXE.exists():
        raise ToolsMissing(f"axe-core is not installed ({AXE} missing): run `make a11y-deps`")
    axe_source = AXE.read_text()
    browser = Browser(chromium)
    report = Report([p.name for p in pages])
    try:
        for page in pages:
            for v in browser.axe(page.html.resolve().as_uri(), axe_source):
                for node in v.get("nodes", []):
                    report.findings.append(Finding(page.name, v["id"], v.get("impact") or "", " ".join(
                        str(t) for t in node.get("target", [])), (node.get("failureSummary") or v["help"])[:300]))
    finally:
        browser.close()
    report.unused_allow = justify(report.findings, allow)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); return the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=ROOT / "autograder" / "work" / "a11y",
                    help="folder for rendered pages and axe-report.json")
    ap.add_argument("--executed", type=Path, action="append", default=[],
                    help="an already executed notebook (solutions/<lesson>/<nb> run by papermill); "
                         "its lesson is taken from the notebook's metadata or the folder name")
    ap.add_argument("--no-execute", action="store_true", help="do not execute notebooks (skip the executed page)")
    ap.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    args = ap.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if not chromium:
        print("a11y: Chromium not found (apt-get install chromium); nothing checked", file=sys.stderr)
        return TOOLS_MISSING
    executed = {}
    for nb in args.executed:
        lesson = json.loads(nb.read_text()).get("metadata", {}).get("lesson", {}).get("id") or nb.parent.name
        executed[lesson] = nb
    args.report.mkdir(parents=True, exist_ok=True)
    pages = lesson_pages(args.report, executed, not args.no_execute)
    try:
        report = check(pages, chromium, load_allowlist())
    except ToolsMissing as e:
        print(f"a11y: {e}", file=sys.stderr)
        return TOOLS_MISSING
    out = args.report / "axe-report.json"
    out.write_text(json.dumps({"tags": TAGS, "pages": report.pages,
                               "findings": [f.__dict__ for f in report.findings],
                               "stale_allowlist_entries": report.unused_allow}, indent=1))
    print(f"a11y: {len(report.pages)} pages ({', '.join(report.pages)}), {len(report.findings)} axe findings, "
          f"{len(report.findings) - len(report.unjustified)} justified in allowlist.json, "
          f"{len(report.unjustified)} unjustified; report {out}")
    for f in report.unjustified:
        print(f"  UNJUSTIFIED {f.page}: {f.rule} ({f.impact}) at {f.target}: {f.summary}")
    for e in report.unused_allow:
        print(f"  note: allowlist entry matched nothing (remove it?): {e['rule']} {e.get('pages', ['*'])}")
    return 1 if report.unjustified else 0


if __name__ == "__main__":
    sys.exit(main())
