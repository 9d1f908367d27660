"""A timeout or crash costs its exercise only (issue 21 item 2), through the real pipeline.

Five submissions: the source solution, and four with one fault in one exercise: an infinite loop, a
loop that ignores SIGINT, an answer cell that raises, and a crash (``os._exit``, which also ends the
out-of-kernel re-check process: it is run again without that exercise).
Graded by ``python -m autograder grade`` with a 10 s per-cell limit. Asserted: status ``graded``;
the faulty exercise scores 0 and every other exercise keeps the honest submission's points; the
note names the exercise by its title and the student's own cell number, and is on the feedback
page; the loop costs the per-cell limit once (the exercise's other test cell is not run).
"""
from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from autograder.ingest.notebook import grade_id, load_spec  # noqa: E402
from autograder.check.scoring import exercise_title  # noqa: E402
from autograder.check.threshold_suite import solved  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
LIMIT = 10

LOOP = """
def analyze_bandwidth(residual_states, p=0.95):
    while True:      # forgot to advance the loop
        pass
"""
SIGINT_LOOP = """
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        pass
"""
CRASH = """
def effective_rank_family(X):
    import os
    os._exit(1)          # ends the kernel, and the out-of-kernel re-check process too
"""
# submission -> (item with the fault, code appended to its answer cell, or prepended when raising)
FAULTS = {"loop_plain": ("checkpoint_1", LOOP), "loop_sigint": ("checkpoint_2", SIGINT_LOOP),
          "crash": ("summative_q1", CRASH), "raises": ("checkpoint_3", None)}


def _make(item: str | None, code: str | None):
    nb = solved(SPEC)
    for cell in nb.cells:
        gid = grade_id(cell)
        if gid in SPEC.answer_cells and SPEC.answer_cells[gid].item == item:
            cell.source = ("raise ValueError('my own bug')\n" + cell.source) if code is None else cell.source + code
    return nb


def _cell_number(nb, gid: str) -> int:
    return next(k for k, c in enumerate(nb.cells, 1) if grade_id(c) == gid)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    subs, out = base / "subs", base / "out"
    nbs = {"honest": _make(None, None), **{name: _make(item, code) for name, (item, code) in FAULTS.items()}}
    for name, nb in nbs.items():
        (subs / name).mkdir(parents=True)
        nbformat.write(nb, str(subs / name / SPEC.notebook_name))
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(subs), "--out", str(out), "--jobs", "2",
                        "--cell-timeout", str(LIMIT), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "MPLBACKEND": "Agg"})
    assert (out / "results.json").exists(), r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    by = {s["student"]: s for s in res["students"]}
    print({n: s["seconds"] for n, s in by.items()})
    return base, out, nbs, by, r


def _items(s) -> dict:
    return {i["item"]: i for i in s["items"]}


def test_honest_baseline_scores_full(graded):
    _, _, _, by, r = graded
    assert by["honest"]["status"] == "graded" and by["honest"]["score"] == SPEC.total_points, by["honest"]


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_fault_costs_its_exercise_only(graded, name):
    base, out, nbs, by, _ = graded
    item, code = FAULTS[name]
    s, honest = by[name], _items(by["honest"])
    assert s["status"] == "graded", (s["status"], s["reason"])
    items = _items(s)
    assert items[item]["score"] == 0, items[item]
    for other, it in items.items():
        if other != item:
            assert it["score"] == honest[other]["score"], (other, it, honest[other])
    assert s["score"] == SPEC.total_points - SPEC.item_points(item)
    # the note names the exercise by its title and the student's own cell number
    gid = next(g for g, a in SPEC.answer_cells.items() if a.item == item) if code is None else f"{item}__visible"
    number = _cell_number(nbs[name], gid)
    note = " | ".join(items[item]["notes"])
    assert exercise_title(SPEC, item) in note and f"your cell {number}" in note, note
    expect = {"loop_plain": "ran past the 10 s time limit and was interrupted",
              "loop_sigint": "ignored the interrupt", "crash": "stopped the Python kernel",
              "raises": "raised ValueError: my own bug"}[name]
    assert expect in note, note
    page = out / "feedback" / name / SPEC.lesson_id / (Path(SPEC.notebook_name).stem + ".html")
    text = html.unescape(page.read_text())
    assert f"your cell {number}" in text and exercise_title(SPEC, item) in text


@pytest.mark.parametrize("name", ["loop_plain", "loop_sigint", "crash"])
def test_the_rest_of_a_lost_exercise_is_not_run(graded, name):
    """A loop costs the per-cell limit once: the exercise's hidden cell is not run after its visible cell."""
    _, out, _, by, _ = graded
    item = FAULTS[name][0]
    nb = nbformat.read(str(out / "autograded" / name / SPEC.lesson_id / SPEC.notebook_name), as_version=4)
    hidden = next(c for c in nb.cells if grade_id(c) == f"{item}__hidden")
    errors = [o.get("ename") for o in hidden.outputs if o.get("output_type") == "error"]
    assert errors == ["NotRun"], hidden.outputs   # and no "hidden tests: ..." property: the exercise was not run
    extra = by[name]["seconds"] - by["honest"]["seconds"]
    budget = {"loop_plain": LIMIT, "loop_sigint": LIMIT + 10, "crash": 0}[name]   # + the 10 s interrupt grace
    print(f"{name}: {by[name]['seconds']:.1f} s, {extra:+.1f} s over the honest submission (limit {LIMIT} s)")
    assert extra < budget + 40, (name, by[name]["seconds"], by["honest"]["seconds"])


def test_worker_fault_records_are_validated_and_named():
    """Unit: what the worker reports becomes notes on the right exercises (malformed records dropped)."""
    from autograder.results.records import ItemResult
    from autograder.check.scoring import apply_faults, fault_notes_outside_items, read_faults
    items = [ItemResult(i, SPEC.objective(i), 4.0, 4.0, {f"{i}__visible": 1.0, f"{i}__hidden": 3.0}) for i in SPEC.items]
    raw = [{"kind": "unresponsive", "cell": 42, "item": "checkpoint_2", "role": "test"},
           {"kind": "skipped", "cell": 43, "item": "checkpoint_2", "role": "test", "evalue": "rest of the exercise"},
           {"kind": "skipped", "cell": 60, "item": "checkpoint_3", "role": "test", "evalue": "the kernel was lost 4 times"},
           {"kind": "raised", "cell": 69, "item": "summative_q1", "role": "answer", "ename": "ValueError",
            "evalue": "bad \x1b[31mred\x1b[0m\nline"},
           {"kind": "timeout", "cell": True, "item": "not-an-item", "role": "added"}, "junk", {"kind": "rm -rf"}]
    faults = read_faults(raw, SPEC)
    assert len(faults) == 5
    zero = apply_faults(items, SPEC, faults, 10)
    by = {i.item: i for i in items}
    assert sorted(zero) == ["checkpoint_2__hidden", "checkpoint_2__visible", "checkpoint_3__hidden", "checkpoint_3__visible"]
    assert by["checkpoint_2"].score == 0 and len(by["checkpoint_2"].notes) == 1
    assert "your cell 42" in by["checkpoint_2"].notes[0] and "ignored the interrupt" in by["checkpoint_2"].notes[0]
    assert by["checkpoint_3"].score == 0 and "was not run (the kernel was lost 4 times)" in by["checkpoint_3"].notes[0]
    assert by["summative_q1"].score == 4 and by["summative_q1"].notes == [
        f"{exercise_title(SPEC, 'summative_q1')}: your cell 69 raised ValueError: bad red line"]
    assert fault_notes_outside_items(faults, SPEC, 10) == [
        "a cell ran past the 10 s time limit and was interrupted (an infinite loop?) (outside the exercises: no points lost)"]
