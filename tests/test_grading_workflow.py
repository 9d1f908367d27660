"""The instructor's documented paths around the grader (issue 21 items 4, 5, 6), run as written.

* **Exchange round trip** (autograder/README.md §7): ``nbgrader release_assignment`` →
  ``fetch_assignment`` → ``submit`` (three students, each with their own HOME) → ``collect`` →
  ``python -m autograder grade`` on the collected folder → ``release_feedback`` (with
  ``AUTOGRADER_RESULTS``) → ``fetch_feedback``: each student receives their own page.
* **Feedback a student learns from**: the page's visible text — headings, the score and pass line,
  the objectives table, one row per exercise named by its title, the failed hidden property, cells
  labelled by exercise and part, no unnamed "Test cell" rows, visible test errors not called hidden.
* **Manual review**: ``python -m autograder formgrader --out DIR`` starts JupyterLab whose formgrader
  API lists the graded students with the store's scores; formgrader's "autograde" button and plain
  ``nbgrader autograde`` are refused with a message pointing to ``make grade``.
"""
from __future__ import annotations

import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.ingest.notebook import load_spec  # noqa: E402
from autograder.check.scoring import exercise_titles  # noqa: E402
from autograder.check.threshold_suite import CORRUPT, solved  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
LESSON, COURSE = SPEC.lesson_id, "residual-bandwidth"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
STUDENTS = {"alice": lambda: solved(SPEC), "bob": None, "carol": lambda: solved(SPEC, "_variant_corrupt", CORRUPT)}


def run(cmd: list[str], cwd: Path, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=900)
    if ok:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def visible_text(page: Path) -> str:
    """The page as a reader sees it: tags, styles and scripts removed, entities decoded, spaces collapsed."""
    t = page.read_text(encoding="utf-8")
    t = re.sub(r"<(style|script)\b.*?</\1>", " ", t, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", t))).strip()


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    base = tmp_path_factory.mktemp("course")
    exchange, submitted, out = base / "exchange", base / "submitted", base / "results"
    exchange.mkdir()
    exchange.chmod(0o777)
    ex = [f"--Exchange.root={exchange}"]
    instructor_db = [f"--CourseDirectory.db_url=sqlite:///{base / 'instructor.db'}"]
    # instructor: release the student version (lessons/<lesson>)
    run(["nbgrader", "release_assignment", LESSON, *ex, *instructor_db], ROOT)
    # students, each with their own HOME (on a hub they are different users; here --student names them)
    homes = {}
    for name, make in STUDENTS.items():
        home = base / "home" / name
        (home / "work").mkdir(parents=True)
        env = {**ENV, "HOME": str(home)}
        stu = ["--course", COURSE, "--student", name, *ex]
        run(["nbgrader", "fetch_assignment", LESSON, *stu], home / "work", env)
        nb_path = home / "work" / LESSON / SPEC.notebook_name
        if make:   # the student's work in the fetched notebook
            nbformat.write(make(), str(nb_path))
        run(["nbgrader", "submit", LESSON, *stu], home / "work", env)
        homes[name] = (home, env, stu)
    # instructor: collect, grade with the course's grader, release the feedback
    run(["nbgrader", "collect", LESSON, *ex, *instructor_db, f"--CourseDirectory.submitted_directory={submitted}"], ROOT)
    g = run([sys.executable, "-m", "autograder", "grade", str(submitted), "--out", str(out), "--jobs", "2", "--quiet"],
            ROOT, ok=False)
    assert (out / "results.json").exists(), g.stderr[-3000:]
    run(["nbgrader", "release_feedback", LESSON, *ex], ROOT, {**ENV, "AUTOGRADER_RESULTS": str(out)})
    fetched = {}
    for name, (home, env, stu) in homes.items():
        run(["nbgrader", "fetch_feedback", LESSON, *stu], home / "work", env)
        pages = list((home / "work" / LESSON / "feedback").rglob("*.html"))
        fetched[name] = pages
    res = {s["student"]: s for s in json.loads((out / "results.json").read_text())["students"]}
    return base, submitted, out, res, fetched


def test_collected_folder_is_graded(course):
    _, submitted, out, res, _ = course
    assert set(res) == set(STUDENTS)
    assert res["alice"]["status"] == "graded" and res["alice"]["score"] == SPEC.total_points
    assert res["bob"]["status"] == "graded" and res["bob"]["score"] == 0
    assert res["carol"]["status"] == "graded" and res["carol"]["pass"] is False
    for name in STUDENTS:   # the layout `release_feedback` needs, from the collected submission
        fb = out / "feedback" / name / LESSON
        for f in ("timestamp.txt", "submission_secret.txt"):
            assert (fb / f).read_text() == (submitted / name / LESSON / f).read_text()


def test_each_student_fetches_their_own_feedback(course):
    *_, res, fetched = course
    for name in STUDENTS:
        assert len(fetched[name]) == 1, fetched[name]
        text = visible_text(fetched[name][0])
        s = res[name]
        assert f"Your score: {s['score']:g} of {SPEC.total_points:g} points" in text, text[:400]


def test_feedback_page_names_exercises_objectives_and_the_pass_line(course):
    _, _, out, res, _ = course
    titles = exercise_titles(SPEC)
    line = SPEC.meta.passing_threshold * SPEC.total_points
    for name in STUDENTS:
        s = res[name]
        text = visible_text(out / "feedback" / name / LESSON / (Path(SPEC.notebook_name).stem + ".html"))
        assert "Test cell" not in text
        for heading in ("Feedback: ", "Learning objectives", "Exercises", "Your notebook with the tests"):
            assert heading in text, heading
        verdict = "passed" if s["pass"] else "not passed yet"
        assert (f"The pass line is {100 * SPEC.meta.passing_threshold:g} % of the points ({line:g} of "
                f"{SPEC.total_points:g}): {verdict}") in text
        for lo, o in s["objectives"].items():   # the objective table: id, text, points, out of
            assert f"{lo} {SPEC.meta.objectives[lo]} {o['score']:g} {o['max_score']:g}" in text, lo
        for item in s["items"]:
            t = titles[item["item"]]
            assert f"{t}: visible tests" in text and f"{t}: hidden tests (run by the grader, code not shown)" in text
            assert re.search(re.escape(t) + r" LO\d [\d.]+ / [\d.]+", text), t   # its row in the exercises table


def test_feedback_names_the_failed_property_and_labels_visible_errors_right(course):
    _, _, out, res, _ = course
    page = out / "feedback" / "carol" / LESSON / (Path(SPEC.notebook_name).stem + ".html")
    text = visible_text(page)
    failed = [i for i in res["carol"]["items"] if i["recheck"] in ("mismatch", "error")]
    assert failed
    for item in failed:
        prop = item["recheck_detail"].split(" — ")[0]
        assert f"({prop})" in text, prop            # the property, in the exercises table
    # only hidden cells say "details withheld": visible test errors keep their message
    hidden_cells = sum(1 for g in SPEC.grade_cells if g.endswith("__hidden"))
    assert text.count("hidden test: details withheld") <= hidden_cells
    assert "AssertionError" in text or "Error" in text


# ---- manual review --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, token: str, path: str, data: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Authorization": f"token {token}"}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read().decode())


def test_formgrader_opens_on_the_graded_store(course):
    _, _, out, res, _ = course
    port, token = _free_port(), "t" + os.urandom(8).hex()
    p = subprocess.Popen([sys.executable, "-m", "autograder", "formgrader", "--out", str(out), "--port", str(port),
                          "--token", token], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        deadline, subs = time.monotonic() + 240, None
        while time.monotonic() < deadline and subs is None:
            try:
                subs = _api(port, token, f"/formgrader/api/submissions/{LESSON}")
            except OSError:
                assert p.poll() is None, p.stdout.read()[-3000:]
                time.sleep(2)
        assert subs is not None, "formgrader did not answer"
        assert LESSON in [a["name"] for a in _api(port, token, "/formgrader/api/assignments")]
        scores = {s["student"]: s["score"] for s in subs}
        assert scores == {name: res[name]["score"] for name in STUDENTS}, scores
        # formgrader's "autograde" button runs NbGraderAPI.autograde: see test_in_process_autograde_is_refused
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_plain_nbgrader_autograde_refuses_at_once_pointing_to_make_grade(tmp_path):
    t0 = time.monotonic()
    r = run(["nbgrader", "autograde", LESSON, f"--CourseDirectory.db_url=sqlite:///{tmp_path / 'gb.db'}"], ROOT, ok=False)
    assert r.returncode != 0 and "make grade" in r.stderr, (r.returncode, r.stderr[-1000:])
    assert not (tmp_path / "gb.db").exists()   # nothing was started
    print(f"refused in {time.monotonic() - t0:.1f} s")


def test_feedback_pages_pass_axe_core(course):
    """The new page layout (summary tables, labelled cells): 0 WCAG 2.1 A/AA violations, no allowlist."""
    from autograder.a11y import check_a11y as a11y
    chromium = a11y.find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    from test_autograder_a11y import ensure_axe
    ensure_axe()
    _, _, out, _, _ = course
    pages = [a11y.Page(f"feedback/{name}.html", out / "feedback" / name / LESSON / (Path(SPEC.notebook_name).stem + ".html"))
             for name in ("alice", "carol")]
    report = a11y.check(pages, chromium, [])
    assert not report.findings, [f"{f.page}: {f.rule} at {f.target}: {f.summary[:120]}" for f in report.findings[:20]]


REFUSE = """
import json, sys
from nbgrader.apps import NbGraderAPI
from nbgrader.apps.baseapp import NbGrader
app = NbGrader()
app.load_config_file()            # nbgrader_config.py of the working folder, as formgrader loads it
cfg = app.config
cfg.CourseDirectory.submitted_directory = sys.argv[1]
cfg.CourseDirectory.db_url = "sqlite:///" + sys.argv[2]
cfg.CourseDirectory.autograded_directory = sys.argv[4]
print(json.dumps(NbGraderAPI(config=cfg).autograde(sys.argv[3], "alice")))
"""


def test_in_process_autograde_is_refused(course, tmp_path):
    """What formgrader's "autograde" button runs (NbGraderAPI.autograde), on a collected submission."""
    _, submitted, *_ = course
    t0 = time.monotonic()
    r = run([sys.executable, "-c", REFUSE, str(submitted), str(tmp_path / "gb.db"), LESSON, str(tmp_path / "ag")], ROOT)
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["success"] is False and "make grade" in answer.get("log", "") + answer.get("error", ""), answer
    assert not list((tmp_path / "ag").rglob("*.ipynb"))   # nothing was executed
    print(f"refused in {time.monotonic() - t0:.1f} s")
