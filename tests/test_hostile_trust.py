"""Grading treats what a student's process produces as hostile data (issue 20, items 1-4, 6, 10, 12).

Unit tests of each defence, then ONE batch through the real pipeline (``python -m autograder grade
--jobs 2``, sandbox on) of the crafted submissions of ``tests/hostile_trust_cases.py`` next to
honest controls. Asserted: no attack keeps a point (each case states the exact score it deserves),
the honest grades are exact and unflagged, the batch completes, the forged and hidden texts never
reach the results, and nothing is left running.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from autograder.check import recheck  # noqa: E402
from autograder.isolate.guard import PipeReader, make_hook  # noqa: E402
from autograder.check.probes import arrays_close, compare_fields, is_close  # noqa: E402
from autograder.check.recheck import clean_text  # noqa: E402
from autograder.check.recheck_runner import make_plain  # noqa: E402
from autograder.check.static import _strings, scan_source, unparsed_cells_that_ran  # noqa: E402
from hostile_trust_cases import HIDDEN_BEHIND_SHELL, SPEC, build  # noqa: E402
from test_autograder import grade_cli, load  # noqa: E402

INF, NAN = float("inf"), float("nan")


# ---- item 2: comparisons refuse non-finite values ---------------------------------------------------------
def test_is_close_refuses_non_finite_on_either_side():
    for a, b in ((INF, 5.0), (5.0, INF), (-INF, -5.0), (NAN, 1.0), (1.0, NAN), (INF, INF), (NAN, NAN), (10**400, 1.0)):
        assert not is_close(a, b, rel=1e-4), (a, b)
    assert is_close(INF, INF, nonfinite=True) and is_close(NAN, NAN, nonfinite=True)
    assert not is_close(INF, 1.0, nonfinite=True) and not is_close(INF, -INF, nonfinite=True)
    assert is_close(1.0, 1.0 + 1e-9)
    assert not arrays_close([1.0, INF], [1.0, 2.0], 1e-4, 1e-9)
    assert not arrays_close([1.0, NAN], [1.0, NAN], 1e-4, 1e-9)
    assert arrays_close([1.0, NAN], [1.0, NAN], 1e-4, 1e-9, nonfinite=True)
    assert compare_fields({"u": INF}, {"u": 0.5}, floats=("u",)) is not None
    assert compare_fields({"r": INF}, {"r": (3, 4)}, ranks=("r",)) is not None


def test_make_plain_refuses_non_finite_numbers_by_default():
    import numpy as np
    import torch
    plain = make_plain(torch, np)
    for bad in (INF, NAN, np.float64(INF), torch.tensor([1.0, INF]), {"x": [NAN]}, np.array([-INF]), 2**70):
        with pytest.raises(TypeError):
            plain(bad)
    assert plain({"x": torch.tensor([1.0, 2.0]), "n": 3}) == {"x": [1.0, 2.0], "n": 3}
    assert math.isinf(make_plain(torch, np, nonfinite=True)(INF))


def test_the_notebooks_close_helper_refuses_non_finite_values():
    from residual_bandwidth.course import close   # what the lesson's locked set-up cell imports
    assert close(1.0, 1.0) and not close(INF, 5.0) and not close(5.0, INF) and not close(NAN, NAN)
    assert not close(INF, INF)
    released = next(c.source for c in SPEC.release.cells if c.get("metadata", {}).get("nbgrader", {}).get(
        "grade_id") == "setup__checks")
    assert "close" in released and "residual_bandwidth.course import" in released, \
        "the released set-up cell no longer imports close() from residual_bandwidth.course: run `make notebooks`"


# ---- item 6: static analysis sees the whole cell, in linear time -----------------------------------------
def test_a_shell_line_first_does_not_hide_the_rest_of_the_cell():
    flags = [f for f in scan_source(HIDDEN_BEHIND_SHELL, "cell", SPEC.protected_names, SPEC.protected_imports) if f.flag]
    assert any(f.rule == "patch-module" for f in flags), flags
    inline = "x = 1\nfiles = !ls\nimport builtins\nbuiltins.abs = lambda v: 0.0\n"
    assert any(f.rule == "patch-module" and f.flag for f in scan_source(inline, "c", SPEC.protected_names))


def test_static_analysis_is_linear_and_bounded():
    chain = "s = " + " + ".join(['"ab"'] * 1500) + "\n"          # a long + chain: was quadratic in _strings
    small, source = chain * 15, chain * 150                         # 0.11 MB and > 1 MB of source
    assert len(source) > 1_000_000
    times = []
    for src in (small, source):
        t = time.monotonic()
        findings = scan_source(src, "cell", SPEC.protected_names, SPEC.protected_imports)
        times.append(time.monotonic() - t)
        assert not [f for f in findings if f.flag], findings[:3]
    # linear: 10x the source takes about 10x the time (the old _strings: 0.09 MB took 237 s, here)
    assert times[1] < 30 * times[0] + 5, f"{times[0]:.2f} s for {len(small)} characters, {times[1]:.2f} s for {len(source)}"
    import ast
    tree = ast.parse(chain)
    assert _strings(tree) == [(1, "ab" * 1500)] + [(1, "ab")] * 1500
    # deeper than the analysis can follow, or larger than its cap: flagged for review, never a crash
    deep = "import builtins\nbuiltins.abs = " + "-" * 3000 + "1"
    assert "patch-module" in {f.rule for f in scan_source(deep, "c", SPEC.protected_names) if f.flag}
    deeper = "s = " + " + ".join(['"ab"'] * 20_000)
    assert [(f.rule, f.flag) for f in scan_source(deeper, "c", SPEC.protected_names)] == [("unanalysable", True)]
    big = "x = 1\n" * 400_000
    assert [f.rule for f in scan_source(big, "c", SPEC.protected_names)] == ["unanalysable"]


def test_a_cell_that_ran_without_parsing_is_evidence():
    import nbformat
    nb = nbformat.v4.new_notebook()
    ran = nbformat.v4.new_code_cell("this is not python but a transformer made it run")
    ran.execution_count = 3
    failed = nbformat.v4.new_code_cell("def broken(:\n    pass")
    failed.execution_count = 4
    failed.outputs = [nbformat.v4.new_output("error", ename="SyntaxError", evalue="invalid syntax", traceback=[])]
    magic = nbformat.v4.new_code_cell("_ = !true\n%time x = 1\nnp.mean?")
    magic.execution_count = 5
    nb.cells = [ran, failed, magic]
    found = unparsed_cells_that_ran(nb)
    assert [f.where for f in found] == [f"cell 1 (id {ran.id})"] and found[0].flag


# ---- item 10: the guard matches resolved whole paths, never words ------------------------------------------
def test_guard_matches_whole_paths_not_words(tmp_path):
    cwd = tmp_path / "student"
    cwd.mkdir()
    protect = [str(tmp_path / "solutions"), str(tmp_path / "work"), str(tmp_path / "results"), str(tmp_path / "out")]
    hook = make_hook(protect, [str(cwd)], None)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for honest in (["/bin/sh", "-c", 'echo "my homework folder" results out solutions'],
                       ["ls", "work/results/out"], ["cat", "./solutions.txt"], ["echo", "--out=results"]):
            hook("subprocess.Popen", (honest[0], honest, None, None))
        for bad in (["cat", f"{tmp_path}/solutions/x.py"], ["/bin/sh", "-c", "cp ../solutions/a.py ."],
                    ["ls", f"{tmp_path}/results/"], ["tar", f"--file={tmp_path}/out/gradebook.db"]):
            with pytest.raises(PermissionError):
                hook("subprocess.Popen", (bad[0], bad, None, None))
    finally:
        os.chdir(old)


# ---- item 4: channels the student cannot rewrite -------------------------------------------------------------
def test_guard_log_through_a_pipe_survives_truncation_attempts(tmp_path):
    r, w = os.pipe()
    reader = PipeReader(r)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from autograder.isolate import guard
        guard.install([{str(tmp_path / 'secret')!r}], [{str(tmp_path)!r}], {w})
        try:
            open({str(tmp_path / 'secret' / 'x')!r})
        except PermissionError:
            pass
        for fd in range(3, 40):
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
        print("done")
    """)
    p = subprocess.run([sys.executable, "-c", script], pass_fds=(w,), capture_output=True, text=True, timeout=60)
    os.close(w)
    reader.finish()
    assert p.stdout.strip() == "done", p.stderr
    assert [e["blocked"] for e in reader.records()] == [True]


def test_clean_text_strips_terminal_escapes_and_caps_length():
    dirty = "\x1b[31mred\x07\x1b]0;title\x07\r\nnext\x00\x9b" + "x" * 2000
    clean = clean_text(dirty)
    assert len(clean) <= 500 and not any(unicodedata.category(ch) == "Cc" for ch in clean), repr(clean[:40])
    assert clean_text({"not": "a string"}) == "{'not': 'a string'}"


def test_forged_records_change_no_verdict():
    steps = [("cell", "cell 1", ""), ("visible", "summative_q1__visible", "")]
    good = [{"seq": 0, "setup": "ok"}, {"seq": 1, "step": 0, "ok": True}, {"seq": 2, "step": 1, "ok": True},
            {"seq": 3, "item": "summative_q1", "results": []}, {"seq": 4, "done": True}]
    recs, forged = recheck._sequence(good, steps, ["summative_q1"])
    assert recs == good and not forged
    for bad in ([good[0], {"seq": 1, "setup_error": "x"}, *good[1:]],                   # forged setup_error
                [*good[:2], {"seq": 2, "step": 1, "ok": True}, *good[2:]],              # a step claimed twice
                [*good[:3], {"seq": 3, "item": "summative_q1", "results": []}, *good[3:]],
                good + [{"seq": 5, "done": True}]):
        recs, forged = recheck._sequence(bad, steps, ["summative_q1"])
        assert forged and len(recs) < len(bad)


# ---- the batch: attacks and honest controls through the real pipeline ---------------------------------------
@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    subs, out, work = base / "subs", base / "out", base / "work"
    cases = build(subs)
    t = time.monotonic()
    r = grade_cli(subs, out, "--jobs", "2", "--cell-timeout", "60", "--timeout", "400", work=work)
    seconds = time.monotonic() - t
    assert (out / "results.json").exists(), r.stdout + r.stderr
    # the same class graded a second time, from scratch (its own store and work folder)
    again = grade_cli(subs, base / "out2", "--jobs", "2", "--cell-timeout", "60", "--timeout", "400",
                      work=base / "work2")
    assert (base / "out2" / "results.json").exists(), again.stdout + again.stderr
    time.sleep(1)
    return SimpleNamespace(cases=cases, res=load(out), out=out, out2=base / "out2", rc=r.returncode, stderr=r.stderr,
                           seconds=seconds, left=_left_running(base))


def _left_running(base: Path) -> list[str]:
    """Processes of this batch still alive: every sandbox's bwrap names its scratch folder under
    ``base`` (and the sandbox's PID namespace ends with it); the grader's own processes name it too.
    (Not "any process of a sandbox uid": other gradings may run on the same machine.)"""
    import psutil
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(base) in cmd and p.pid != os.getpid():
            left.append(f"{p.pid}: {cmd[:150]}")
    return left


def test_the_batch_completes_and_every_submission_is_graded(batch):
    assert set(batch.res["by"]) == set(batch.cases), sorted(batch.res["by"])
    for name, s in batch.res["by"].items():
        assert s["status"] in ("graded", "flagged"), (name, s["status"], s["reason"])
        assert "internal grader error" not in (s["reason"] or ""), (name, s["reason"])
    print(f"batch of {len(batch.cases)} graded in {batch.seconds:.0f} s")


@pytest.mark.parametrize("name", ["honest_strong", "honest_typical", "honest_weak", "honest_words_and_shell"])
def test_honest_grades_are_exact_and_never_flagged(batch, name):
    s, case = batch.res["by"][name], batch.cases[name]
    assert s["status"] == "graded", (s["status"], s["reason"], [e for e in s["evidence"] if e["flag"]])
    assert s["score"] == pytest.approx(case.score), (s["score"], case.score, [(i["item"], i["score"], i["recheck_detail"])
                                                                              for i in s["items"]])


@pytest.mark.parametrize("name", ["attack_inf_checkpoints", "attack_inf_q1_q3_plus_honest",
                                  "attack_builtins_behind_shell_line", "attack_kernel_hooks", "attack_patch_checks",
                                  "attack_forged_verdicts", "attack_truncate_tripwire"])
def test_no_attack_keeps_a_point(batch, name):
    s, case = batch.res["by"][name], batch.cases[name]
    items = [(i["item"], i["score"], i["parts"], i["recheck"], i["recheck_detail"][:120]) for i in s["items"]]
    assert s["score"] == pytest.approx(case.score), (name, s["score"], items)
    if case.flagged is not None:
        assert (s["status"] == "flagged") is case.flagged, (s["status"], s["evidence"])
    rules = {e["rule"] for e in s["evidence"] if e["flag"]}
    assert set(case.evidence) <= rules, (case.evidence, rules)
    if case.kernel_points:   # the attack did fool the kernel: the points were taken back outside it
        assert s["autograde_score"] > case.score, (s["autograde_score"], items)


def test_forged_verdicts_are_evidence_not_a_grader_error(batch):
    s = batch.res["by"]["attack_forged_verdicts"]
    assert s["status"] == "flagged"
    rules = {e["rule"] for e in s["evidence"] if e["flag"]}
    assert {"patch-module", "recheck-output-forged"} <= rules, rules


def test_truncating_the_tripwire_log_keeps_the_kernel_evidence(batch):
    s = batch.res["by"]["attack_truncate_tripwire"]
    assert any(e["rule"] == "blocked-access" and e["where"] == "kernel guard" for e in s["evidence"]), s["evidence"]


def test_no_raw_control_characters_reach_the_results(batch):
    text = (batch.out / "results.csv").read_text(encoding="utf-8")
    assert "\x1b" not in text and "\x07" not in text
    data = json.loads((batch.out / "results.json").read_text())

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
    bad = [s for s in strings(data) if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in s)]
    assert not bad, bad[:3]


def test_graded_twice_the_exports_are_identical(batch):
    """Every export is a view of the store without timestamps: two gradings of one class agree byte for byte."""
    for name in ("results.csv", "items.csv", "objectives.csv"):
        first, second = (batch.out / name).read_bytes(), (batch.out2 / name).read_bytes()
        assert first == second, (name, first.decode()[:2000], second.decode()[:2000])
    a, b = load(batch.out), load(batch.out2)
    assert {k: (s["score"], s["status"]) for k, s in a["by"].items()} == \
        {k: (s["score"], s["status"]) for k, s in b["by"].items()}


def test_nothing_is_left_running(batch):
    assert not batch.left, batch.left
