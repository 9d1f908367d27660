"""The grading pipeline end to end: the threshold-logic suite graded by the real pipeline.

The suite also holds attacks on the grader itself (child interpreter reading solutions, setsid
double fork rewriting results after the grader exits, killing the grader, fork bomb, memory hog,
writing outside the scratch folder, builtins patched through an alias) next to honest submissions:
no attack keeps a point, every honest result is intact, nothing is left running and nothing outside
the results folder changes. Two grader processes on halves of a batch into one results folder are
serialized and give the same results.

``autograder.check.threshold_suite`` builds submissions with known outcomes from the source notebook
(all correct, exactly at the passing threshold, the largest score below it, untouched, crash,
infinite loops, huge output, corrupt / missing / renamed notebooks, and one submission per
cheating technique). They are graded once with ``python -m autograder grade --jobs 2`` (fast mode)
and every outcome is asserted; then a second run over a zip of a subset must agree, a failed
re-grade must not keep the old score, and a kernel that outlives the wall-clock limit must be killed.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nbformat
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.ingest.notebook import load_spec  # noqa: E402
from autograder.isolate.sandbox import UID_RANGE  # noqa: E402
from autograder.check.threshold_suite import ATTACKS, WRITE_TARGETS, generate  # noqa: E402
from processes import left_over  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
CELL_TIMEOUT = "15"


def grade_cli(subs: Path, out: Path, *extra: str, work: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autograder", "grade", str(subs), "--lesson", SPEC.lesson_id, "--out", str(out),
           "--quiet", *extra]
    if work:
        cmd += ["--work-root", str(work), "--keep-work"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "MPLBACKEND": "Agg"})


def load(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    data["by"] = {s["student"]: s for s in data["students"]}
    return data


PROTECTED = [ROOT / "solutions", ROOT / "lib", ROOT / "autograder", ROOT / "nbgrader_config.py"]


def tree_hash(paths) -> str:
    """One hash over every file under ``paths`` (autograder/work excluded: the grader's own scratch)."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if f.is_relative_to(ROOT / "autograder" / "work") or "__pycache__" in f.parts or "node_modules" in f.parts:
                continue
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def sandbox_processes(work: Path | None = None) -> list[str]:
    """Processes left by sandboxes (their uids) or by this run's work folder."""
    return left_over(lambda uid, cmd: UID_RANGE[0] <= uid < UID_RANGE[1] or bool(work and str(work) in cmd)
                     or "ATTACK-SETSID" in cmd)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    base = tmp_path_factory.mktemp("suite")
    subs, out, work = base / "subs", base / "out", base / "work"
    variants = {v.name: v for v in generate(subs, SPEC, results=out)}
    other = base / "other-results"            # another class's results: must not change
    other.mkdir()
    (other / "results.json").write_text('{"students": []}')
    before = tree_hash(PROTECTED + [other])
    r = grade_cli(subs, out, "--jobs", "2", "--cell-timeout", CELL_TIMEOUT, "--timeout", "150", "--probe-seed", "7",
                  "--memory-gb", "2", work=work)
    assert (out / "results.json").exists(), r.stdout + r.stderr
    written = {f: (out / f).read_bytes() for f in ("results.json", "results.csv", "gradebook.db", "grades.sqlite")}
    return SimpleNamespace(base=base, subs=subs, out=out, work=work, rc=r.returncode, stdout=r.stdout,
                           stderr=r.stderr, variants=variants, res=load(out), before=before, other=other,
                           written=written, finished=time.monotonic(), left_running=sandbox_processes(work))


def student(suite, name: str) -> dict:
    assert name in suite.res["by"], f"{name} missing from results: {sorted(suite.res['by'])}"
    return suite.res["by"][name]


# ---- the run as a whole -----------------------------------------------------------------------------
def test_every_submission_is_reported_and_exit_code_says_something_errored(suite):
    assert set(suite.res["by"]) == set(suite.variants)
    assert suite.rc == 2, f"exit code {suite.rc} (2 = something errored)\n{suite.stderr[-2000:]}"
    assert suite.res["max_score"] == SPEC.total_points
    assert suite.res["threshold"] == SPEC.meta.passing_threshold


def test_csv_has_one_row_per_student_and_objective_columns(suite):
    import csv
    rows = list(csv.DictReader(open(suite.out / "results.csv")))
    assert {r["student"] for r in rows} == set(suite.variants)
    for lo in SPEC.meta.objectives:
        assert f"{lo}_score" in rows[0] and f"{lo}_max" in rows[0]
    by = {r["student"]: r for r in rows}
    assert by["all_correct"]["pass"] == "yes" and by["below_threshold"]["pass"] == "no"
    assert by["corrupt"]["score"] == "" and by["corrupt"]["status"] == "errored"


# ---- threshold logic ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["all_correct", "at_threshold", "below_threshold", "untouched"])
def test_threshold_outcomes(suite, name):
    v, s = suite.variants[name], student(suite, name)
    assert s["status"] == "graded", (s["status"], s["reason"], s["evidence"])
    assert s["score"] == pytest.approx(v.score), (s["score"], v.score, v.failing, s["items"])
    assert s["max_score"] == SPEC.total_points
    assert s["pass"] is v.passed
    assert s["percent"] == pytest.approx(100 * v.score / SPEC.total_points)
    # per-learning-objective scores add up and follow the metadata's mapping
    assert sum(o["score"] for o in s["objectives"].values()) == pytest.approx(s["score"])
    for lo, o in s["objectives"].items():
        items = [i for i in SPEC.items if SPEC.objective(i) == lo]
        assert o["max_score"] == pytest.approx(sum(SPEC.item_points(i) for i in items))


def test_the_threshold_cases_straddle_the_line(suite):
    line = SPEC.meta.passing_threshold * SPEC.total_points
    at, below = suite.variants["at_threshold"], suite.variants["below_threshold"]
    assert at.score >= line > below.score
    if abs(at.score - line) < 1e-9:   # exactly at the threshold when the points allow it (18/24 today)
        assert student(suite, "at_threshold")["percent"] == pytest.approx(100 * SPEC.meta.passing_threshold)


def test_correct_answers_pass_the_out_of_kernel_recheck(suite):
    for item in student(suite, "all_correct")["items"]:
        assert item["recheck"] in ("pass", "no-probe"), item
        assert not item["zeroed"]
    assert suite.res["items"]["checkpoint_1"]["probe"] is True


def test_wrong_answers_are_graded_not_flagged(suite):
    s = student(suite, "wrong_answers")
    assert s["status"] == "graded" and s["pass"] is False, (s["reason"], s["evidence"])
    for item in s["items"]:
        assert item["recheck"] in ("mismatch", "error", "no-probe"), item


# ---- robustness --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["crash", "infinite_loop", "loop_ignoring_sigint"])
def test_a_crash_or_loop_outside_the_exercises_costs_no_points(suite, name):
    v, s = suite.variants[name], student(suite, name)
    assert s["status"] == "graded" and s["score"] == v.score, (s["status"], s["score"], s["reason"])
    assert any(v.reason_contains in n and "outside the exercises" in n for n in s["notes"]), s["notes"]


@pytest.mark.parametrize("name", ["huge_output", "corrupt", "missing", "renamed"])
def test_broken_submissions_are_errored_with_a_reason(suite, name):
    v, s = suite.variants[name], student(suite, name)
    assert s["status"] == "errored", (s["status"], s["reason"])
    assert v.reason_contains.lower() in s["reason"].lower(), s["reason"]
    assert s["score"] is None and s["pass"] is None and s["percent"] is None
    assert not (suite.out / "feedback" / name).exists()


# ---- integrity ---------------------------------------------------------------------------------------
TAMPER = ["tamper_check", "tamper_builtins", "tamper_numpy_torch", "tamper_ipython", "tamper_read_solutions",
          "tamper_read_gradebook", "tamper_always_equal", "tamper_edit_tests", "tamper_delete_tests"]


@pytest.mark.parametrize("name", TAMPER)
def test_tampering_is_flagged_and_never_scores_what_the_recheck_refutes(suite, name):
    v, s = suite.variants[name], student(suite, name)
    assert s["status"] == "flagged", (s["status"], s["reason"])
    rules = {e["rule"] for e in s["evidence"] if e["flag"]}
    assert set(v.evidence_rules) <= rules, (v.evidence_rules, rules)
    for item in s["items"]:
        hidden = {g: p for g, p in item["parts"].items() if g.endswith("__hidden")}
        visible = sum(p for g, p in item["parts"].items() if not g.endswith("__hidden"))
        if item["recheck"] in ("mismatch", "error") and any(p > 0 for p in hidden.values()):
            # hidden points need the out-of-kernel check (autograder/check/scoring.py); visible points are the kernel's
            assert item["zeroed"] and item["score"] <= visible, item


@pytest.mark.parametrize("name", ["tamper_check", "tamper_ipython", "tamper_always_equal"])
def test_techniques_that_fool_the_kernel_are_caught_by_the_recheck(suite, name):
    s = student(suite, name)
    # no hidden point survives a failing out-of-kernel check (autograder/check/scoring.py), whatever the kernel said
    assert any(item["recheck"] in ("mismatch", "error") for item in s["items"]), s["items"]
    for item in s["items"]:
        if item["recheck"] in ("mismatch", "error"):   # (an answer the wrapper leaves correct passes)
            assert item["score"] <= sum(p for g, p in item["parts"].items() if not g.endswith("__hidden")), item
    zeroed = [i["item"] for i in s["items"] if i["zeroed"]]
    if name != "tamper_ipython":   # its transformer blanks cells calling check(); the hidden cells call none
        assert zeroed, f"{name}: the kernel was fooled but no item was zeroed: {s['items']}"
        assert s["score"] < s["autograde_score"]
        assert any(e["rule"] == "recheck-contradicts-kernel" for e in s["evidence"])


def test_blocked_reads_are_evidence(suite):
    for name, word in (("tamper_read_solutions", "solutions"), ("tamper_read_gradebook", "work")):
        runtime = [e for e in student(suite, name)["evidence"] if e["rule"] == "blocked-access"]
        assert runtime and any(word in e["detail"] for e in runtime), runtime


# ---- attacks on the grader (the operating-system sandbox) ---------------------------------------------
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_on_the_grader_keep_no_points(suite, name):
    """Each attack sits in an untouched notebook: any point would be stolen (errored is fine too)."""
    s = student(suite, name)
    assert s["score"] in (None, 0.0), (name, s["status"], s["score"], s["reason"])
    assert s["pass"] in (None, False)


def test_builtins_patched_through_an_alias_is_flagged_and_refuted(suite):
    s = student(suite, "attack_builtins_alias")
    assert s["status"] == "flagged" and "patch-module" in {e["rule"] for e in s["evidence"] if e["flag"]}, s["evidence"]
    from autograder.check.scoring import is_hidden_part
    for item in s["items"]:
        hidden = {g: p for g, p in item["parts"].items() if is_hidden_part(g)}
        visible = sum(p for g, p in item["parts"].items() if not is_hidden_part(g))
        if item["recheck"] in ("mismatch", "error") and any(p > 0 for p in hidden.values()):
            # the check refutes the answer: no hidden point is kept, and no visible point either — the
            # patched abs() made close() agree in the kernel, the visible tests re-run outside it fail (§6.0)
            assert item["zeroed"] and item["score"] == 0 < visible + sum(hidden.values()), item
    assert s["score"] == 0


def test_honest_code_naming_solutions_is_graded_in_full_and_not_flagged(suite):
    s = student(suite, "honest_mentions_solutions")
    assert s["status"] == "graded" and s["score"] == SPEC.total_points, (s["status"], s["score"], s["evidence"])
    assert {e["rule"] for e in s["evidence"]} & {"reads-protected", "dynamic-import"}   # kept as notes


def test_the_batch_completes_with_every_honest_result_intact(suite):
    """The attacks ran beside honest submissions (same --jobs 2 run): those are unharmed."""
    for name in ("all_correct", "at_threshold", "below_threshold", "untouched", "honest_mentions_solutions"):
        v, s = suite.variants[name], student(suite, name)
        assert s["status"] == v.status and s["score"] == pytest.approx(v.score), (name, s["status"], s["score"])
    from autograder.results.gradebook import open_gradebook
    with open_gradebook(suite.out / "gradebook.db") as gb:   # not zeroed by the setsid attack
        assert gb.find_submission(SPEC.lesson_id, "all_correct").score == pytest.approx(SPEC.total_points)


def test_nothing_is_left_running(suite):
    assert not suite.left_running, suite.left_running
    assert not sandbox_processes(suite.work)


def test_nothing_outside_the_results_folder_changed(suite):
    assert tree_hash(PROTECTED + [suite.other]) == suite.before
    for rel in WRITE_TARGETS:
        assert not (ROOT / rel).exists(), rel
    purelib = Path(sysconfig.get_paths()["purelib"])
    assert not list(purelib.glob("pwned*")), "an attack wrote into the virtual environment"
    assert not Path("/tmp/PWNED-attack-write-outside").exists(), "an attack wrote into the host's /tmp"
    assert not (suite.out / "PWNED.txt").exists()


# ---- outputs: merged gradebook and feedback ----------------------------------------------------------
def test_merged_gradebook_matches_results_and_has_no_errored_students(suite):
    from autograder.results.gradebook import open_gradebook
    from nbgrader.api import MissingEntry
    with open_gradebook(suite.out / "gradebook.db") as gb:
        for name, s in suite.res["by"].items():
            if s["status"] == "errored":
                with pytest.raises(MissingEntry):
                    gb.find_submission(SPEC.lesson_id, name)
            else:
                sub = gb.find_submission(SPEC.lesson_id, name)
                assert sub.score == pytest.approx(s["score"]), (name, sub.score, s["score"])
                assert sub.max_score == pytest.approx(SPEC.total_points)


def test_feedback_shows_no_hidden_test_code(suite):
    hidden_lines = set()
    for cell in SPEC.source.cells:
        src = cell.get("source", "")
        if "BEGIN HIDDEN TESTS" in src:
            region = src.split("BEGIN HIDDEN TESTS", 1)[1].split("END HIDDEN TESTS", 1)[0]
            hidden_lines |= {line.strip() for line in region.splitlines() if len(line.strip()) > 25}
    released = SPEC.release_path.read_text()
    hidden_lines = {line for line in hidden_lines if json.dumps(line)[1:-1] not in released}  # also in visible code
    assert hidden_lines
    files = list((suite.out / "feedback").rglob("*.html"))
    assert len(files) >= 4
    for f in files:
        text = html.unescape(f.read_text())
        assert "HIDDEN TESTS" not in text, f
        leaked = [line for line in hidden_lines if line in text]
        assert not leaked, f"{f}: {leaked[:3]}"


# ---- a second run, a failed re-grade, the wall-clock limit --------------------------------------------
SUBSET = ["all_correct", "at_threshold", "below_threshold", "untouched", "crash", "corrupt", "tamper_check",
          "tamper_always_equal"]


def test_second_run_on_an_lms_zip_gives_the_same_results(suite, tmp_path):
    zpath = tmp_path / "export.zip"
    with zipfile.ZipFile(zpath, "w") as z:  # a zip with a wrapper folder, as LMS exports have
        for name in SUBSET:
            for f in (suite.subs / name).rglob("*"):
                if f.is_file():
                    z.write(f, Path("submissions") / f.relative_to(suite.subs))
    out = tmp_path / "out2"
    r = grade_cli(zpath, out, "--jobs", "2", "--cell-timeout", CELL_TIMEOUT, "--timeout", "150",
                  "--probe-seed", "8")   # other hidden inputs: correct stays correct, cheats stay caught
    second = load(out)
    assert set(second["by"]) == set(SUBSET), r.stderr[-2000:]
    keys = ("status", "score", "max_score", "percent", "pass", "objectives")
    for name in SUBSET:
        a, b = student(suite, name), second["by"][name]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, name
        assert [i["zeroed"] for i in a["items"]] == [i["zeroed"] for i in b["items"]], name


def test_failed_regrade_never_reports_the_old_score(suite, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(suite.out, out)
    assert load(out)["by"]["all_correct"]["score"] == SPEC.total_points
    regrade = tmp_path / "regrade" / "all_correct" / SPEC.lesson_id
    regrade.mkdir(parents=True)
    (regrade / SPEC.notebook_name).write_text('{"cells": [')   # the re-submission is corrupt
    r = grade_cli(tmp_path / "regrade", out)
    assert r.returncode == 2, r.stderr[-2000:]
    s = load(out)["by"]["all_correct"]
    assert s["status"] == "errored" and s["score"] is None and s["pass"] is None
    assert [(h["status"], h["score"]) for h in s["history"]] == [("graded", SPEC.total_points), ("errored", None)]
    assert len(load(out)["by"]) == len(suite.variants)   # the rest of the class is kept
    from autograder.results.gradebook import open_gradebook
    from nbgrader.api import MissingEntry
    with open_gradebook(out / "gradebook.db") as gb:
        with pytest.raises(MissingEntry):
            gb.find_submission(SPEC.lesson_id, "all_correct")
        assert gb.find_submission(SPEC.lesson_id, "at_threshold").score > 0   # others untouched
    assert not (out / "feedback" / "all_correct").exists()
    assert not (out / "autograded" / "all_correct").exists()


def test_wall_clock_limit_kills_the_kernel(tmp_path):
    from autograder.check.threshold_suite import insert_after_setup, solved
    nb = insert_after_setup(solved(SPEC), SPEC, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                                "while True:\n    pass", "loop")
    path = tmp_path / "subs" / "looper.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, str(path))
    work = tmp_path / "work"
    r = grade_cli(tmp_path / "subs", tmp_path / "out", "--cell-timeout", "120", "--timeout", "20", "--no-recheck",
                  work=work)
    s = load(tmp_path / "out")["by"]["looper"]
    assert r.returncode == 2 and s["status"] == "errored", (s, r.stderr[-1500:])
    assert "longer than 20 s" in s["reason"], s["reason"]
    pids = [int(p) for f in work.rglob("kernel.pids") for p in f.read_text().split()]
    assert pids, "the kernel should have registered its pid"
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"kernel processes survived the wall-clock kill: {alive}"


def test_feedback_pages_pass_axe_core(suite):
    """Feedback is what students receive: 0 WCAG 2.1 A/AA violations, no allowlist."""
    from autograder.a11y import check_a11y as a11y
    chromium = a11y.find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    from test_autograder_a11y import ensure_axe
    ensure_axe()
    pages = [a11y.Page(f"feedback/{name}.html", next((suite.out / "feedback" / name).rglob("*.html")))
             for name in ("all_correct", "at_threshold", "tamper_ipython")]
    report = a11y.check(pages, chromium, [])
    assert not report.findings, [f"{f.page}: {f.rule} at {f.target}: {f.summary[:120]}" for f in report.findings[:20]]


# ---- after the grader exited; two graders at once ------------------------------------------------------
def test_results_unchanged_after_the_grader_exited(suite):
    """The setsid attack waits for results.json, then rewrites it and the gradebook: give it time."""
    time.sleep(max(0.0, suite.finished + 8 - time.monotonic()))
    for name, data in suite.written.items():
        assert (suite.out / name).read_bytes() == data, f"{name} changed after the grader exited"
    assert not sandbox_processes(suite.work)


TWO = ["all_correct", "corrupt", "attack_kill_grader", "untouched"]   # two per grader, one without a kernel


def test_two_graders_at_once_on_one_results_folder_are_serialized_without_loss(suite, tmp_path):
    """Two grader processes started at once on halves of a batch, into the same --out: the second
    waits for the first (and says so); the store ends with both halves, as graded in one run."""
    halves = [tmp_path / "a", tmp_path / "b"]
    for k, half in enumerate(halves):
        for name in TWO[k::2]:
            shutil.copytree(suite.subs / name, half / name)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autograder", "grade", "--lesson", SPEC.lesson_id, "--quiet", "--cell-timeout",
           CELL_TIMEOUT, "--timeout", "150", "--probe-seed", "7", "--no-feedback", "--out", str(out)]
    procs = [subprocess.Popen(cmd + [str(h)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MPLBACKEND": "Agg"}) for h in halves]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode in (0, 2, 3) for p in procs), outputs
    assert sum("waiting:" in err and "serialized" in err for _, err in outputs) == 1, [e[-800:] for _, e in outputs]
    res = load(out)
    assert sorted(res["by"]) == sorted(TWO)
    keys = ("status", "score", "max_score", "pass", "objectives")
    for name in TWO:
        assert {k: res["by"][name][k] for k in keys} == {k: student(suite, name)[k] for k in keys}, name
    assert [r["state"] for r in res["runs"]] == ["finished", "finished"]
    from autograder.results.gradebook import open_gradebook
    from nbgrader.api import MissingEntry
    with open_gradebook(out / "gradebook.db") as gb:
        for name in TWO:
            if res["by"][name]["status"] == "errored":
                with pytest.raises(MissingEntry):
                    gb.find_submission(SPEC.lesson_id, name)
            else:
                assert gb.find_submission(SPEC.lesson_id, name).score == pytest.approx(res["by"][name]["score"])
