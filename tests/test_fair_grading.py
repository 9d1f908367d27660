"""Fair, deterministic grading (issue 13), proven through the real pipeline.

Honest answers written independently of the solutions (``tests/fair_grading_answers.py``: correct
answers in numpy / scikit-learn / eigvalsh / float32 and plausible mistakes, several per item) are
put into submissions — every item of one submission holds a different answer, so a score that
leaked from one item into another would show — and graded twice with
``python -m autograder grade --mode fast`` on the offering's probe seed. Asserted:

* the two runs give byte-identical per-item scores, parts, verdicts and status (determinism);
* each answer gets its expected item score (4 correct, 1 visible tests pass but hidden fail, 0 the
  visible tests catch it), the visible test's message names the cause, the hidden feedback names
  the property; no honest submission is ``flagged``;
* the points table of ``solutions/README.md`` holds for real submissions;
* a custom exception handler (``set_custom_exc``) that hides test failures is flagged and earns no
  hidden points.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from autograder import offering  # noqa: E402
from autograder.ingest.notebook import grade_id, load_spec, strip_solution_markers  # noqa: E402
from autograder.check.probes import MEDIANS, crowded_reference  # noqa: E402
from autograder.check.recheck import ProbeSet  # noqa: E402
from autograder.check.threshold_suite import CORRUPT, answered, solved  # noqa: E402
from fair_grading_answers import ANSWERS  # noqa: E402
from residual_bandwidth.course import DEFAULT_LESSON  # noqa: E402

SPEC = load_spec(DEFAULT_LESSON)
LESSON, NB = SPEC.lesson_id, SPEC.notebook_name
SOURCE = {grade_id(c): strip_solution_markers(c.source) for c in SPEC.source.cells if grade_id(c) in SPEC.answer_cells}
ANSWER_GID = {a.item: gid for gid, a in SPEC.answer_cells.items()}
STUB = None   # the released stub (raise NotImplementedError)


def submission(answers: dict) -> nbformat.NotebookNode:
    """The released notebook with each item's answer cell set: code, STUB, or (absent) the solution."""
    return answered(SPEC, answers)


BY_ITEM: dict[str, list] = {}
for _a in ANSWERS:
    BY_ITEM.setdefault(_a.item, []).append(_a)
MIXES = max(len(v) for v in BY_ITEM.values())


def mix(k: int) -> dict:
    return {item: answers[k] for item, answers in BY_ITEM.items() if k < len(answers)}


def named(item: str, name: str):
    return next(a for a in ANSWERS if a.item == item and a.name == name)


# (submission, answers, expected score) — rows of the points table in solutions/README.md
TABLE = {
    "table_all_correct": ({}, 24),
    "table_one_missing": ({"checkpoint_1": STUB}, 20),
    "table_two_hidden": ({"checkpoint_1": named("checkpoint_1", "ignores_p").code,
                          "checkpoint_3": named("checkpoint_3", "ignores_p").code}, 18),
    "table_missing_and_hidden": ({"summative_q1": STUB, "checkpoint_1": named("checkpoint_1", "ignores_p").code}, 17),
    "table_two_missing": ({"summative_q2": STUB, "summative_q3": STUB}, 16),
    "table_three_hidden": ({"checkpoint_1": named("checkpoint_1", "ignores_p").code,
                            "checkpoint_3": named("checkpoint_3", "ignores_p").code,
                            "summative_q1": named("summative_q1", "drops_small_values").code}, 15),
}
CUSTOM_EXC = "get_ipython().set_custom_exc((Exception,), lambda *args, **kwargs: None)   # hides every failure"


def grade(subs: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "autograder", "grade", str(subs), "--lesson", LESSON, "--out", str(out),
                        "--quiet", "--jobs", "2", "--mode", "fast", "--cell-timeout", "60", "--timeout", "300"],
                       cwd=ROOT, capture_output=True, text=True, timeout=3000, env={**os.environ, "MPLBACKEND": "Agg"})
    assert (out / "results.json").exists(), r.stdout + r.stderr
    data = json.loads((out / "results.json").read_text())
    data["by"] = {s["student"]: s for s in data["students"]}
    return data


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    base = tmp_path_factory.mktemp("fair")
    subs = base / "subs"
    nbs = {f"mix_{k}": submission({item: a.code for item, a in mix(k).items()}) for k in range(MIXES)}
    nbs.update({name: submission(answers) for name, (answers, _) in TABLE.items()})
    tamper = solved(SPEC, "_variant_corrupt", CORRUPT)           # wrong answers ...
    idx = max(i for i, c in enumerate(tamper.cells) if grade_id(c) in SPEC.locked_cells)
    cell = nbformat.v4.new_code_cell(CUSTOM_EXC)                 # ... whose failures are hidden
    cell.id = "custom-exc"
    tamper.cells.insert(idx + 1, cell)
    nbs["tamper_custom_exc"] = tamper
    for name, nb in nbs.items():
        path = subs / name / LESSON / NB
        path.parent.mkdir(parents=True)
        nbformat.write(nb, str(path))
    first, second = grade(subs, base / "out1"), grade(subs, base / "out2")
    return SimpleNamespace(base=base, first=first, second=second, out=base / "out1")


def item_of(student: dict, item: str) -> dict:
    return next(i for i in student["items"] if i["item"] == item)


def cell_errors(out: Path, student: str, gid: str) -> str:
    nb = nbformat.read(str(out / "autograded" / student / LESSON / NB), as_version=4)
    cell = next(c for c in nb.cells if grade_id(c) == gid)
    return " | ".join(f"{o.get('ename')}: {o.get('evalue')}" for o in cell.get("outputs", []) if o.get("output_type") == "error")


# ---- determinism ------------------------------------------------------------------------------------
def test_the_same_folder_graded_twice_gives_byte_identical_item_scores(graded):
    def digest(run):
        return json.dumps([[s["student"], s["status"], s["score"], s["pass"],
                            [[i["item"], i["score"], i["parts"], i["recheck"], i["recheck_detail"], i["zeroed"]]
                             for i in s["items"]]] for s in run["students"]], sort_keys=True).encode()
    assert digest(graded.first) == digest(graded.second)
    assert graded.first["probe_seed"] == graded.second["probe_seed"] == offering.probe_seed()


def test_probe_inputs_depend_only_on_the_offering_seed_and_the_item():
    a, b, c = ProbeSet.build(SPEC, 11), ProbeSet.build(SPEC, 11), ProbeSet.build(SPEC, 12)
    flat = lambda ps: [np.asarray(x.array) for cs in ps.cases.values() for case in cs for x in case.args  # noqa: E731
                       if hasattr(x, "array")]
    assert all(np.array_equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(flat(a), flat(c)))
    # an item's inputs do not move when another item is added or removed
    from autograder.check.probes import PROBES
    only = ProbeSet.build(SPEC, 11, {"summative_q1": PROBES["summative_q1"]})
    assert all(np.array_equal(x.args[0].array, y.args[0].array)
               for x, y in zip(only.cases["summative_q1"], a.cases["summative_q1"]))


def test_offering_seed_errors_name_the_problem(tmp_path):
    bad = tmp_path / "offering.toml"
    bad.write_text('probe_seed = "abc"\n')
    with pytest.raises(ValueError, match="probe_seed must be a non-negative integer"):
        offering.probe_seed(bad)
    with pytest.raises(ValueError, match="missing"):
        offering.probe_seed(tmp_path / "none.toml")


# ---- one specification: the references -------------------------------------------------------------
def test_crowded_reference_agrees_with_the_library():
    import torch
    from residual_bandwidth.bottlenecks import layer_scores, severity
    rng = np.random.default_rng(0)
    x = rng.standard_normal((151, 24)) * np.linspace(2, 0.2, 24) + 1.0
    for j, i in enumerate(rng.choice(151, 6, replace=False)):
        x[i] *= 1.5 + j
    ref = layer_scores(torch.as_tensor(x), loud_ratio=2.0)
    want = {i: severity(float(ref["norm_ratio"][i]), float(ref["spread"][i]), loud_ratio=2.0) for i in range(151)}
    want = {i: s for i, s in want.items() if s != "none"}
    # the library takes torch.median (the lower middle value); here 146 rows are typical (an even count)
    got, arrays = crowded_reference(x, 2.0, norm_median="lower", pr_median="lower")
    assert {i: r["severity"] for i, r in got.items()} == want
    np.testing.assert_allclose(arrays["spread"], ref["spread"].numpy(), rtol=1e-10)
    np.testing.assert_allclose(arrays["energy"], ref["norm_ratio"].numpy(), rtol=1e-12)
    assert int(ref["typical"].sum()) % 2 == 0
    _, other = crowded_reference(x, 2.0, norm_median="lower", pr_median="mean")   # np.median's convention
    assert not np.allclose(other["spread"], arrays["spread"], rtol=1e-6)       # ... differs: both are accepted
    assert set(MEDIANS) == {("lower", "lower"), ("lower", "mean"), ("mean", "lower"), ("mean", "mean")}


# ---- each item on its own, mistakes and correct-but-different answers ----------------------------------
@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: f"{a.item}-{a.name}")
def test_each_answer_gets_its_expected_item_score(graded, answer):
    k = BY_ITEM[answer.item].index(answer)
    s = graded.first["by"][f"mix_{k}"]
    assert s["status"] == "graded", (s["status"], s["reason"], s["evidence"])   # honest work is never flagged
    it = item_of(s, answer.item)
    vis, hid = f"{answer.item}__visible", f"{answer.item}__hidden"
    assert it["score"] == answer.expect, (it, cell_errors(graded.out, f"mix_{k}", vis))
    if answer.expect == 4:
        assert it["recheck"] == "pass", it
    elif answer.expect == 0:   # the visible test catches it and names the cause
        assert answer.says in cell_errors(graded.out, f"mix_{k}", vis)
    else:                      # visible tests pass, hidden tests fail and say which property
        assert it["parts"][vis] == 1 and it["recheck"] == "mismatch", it
        assert answer.prop in it["recheck_detail"].split(" — ")[0], it
        assert "HiddenTestFailed: hidden tests: fails on" in cell_errors(graded.out, f"mix_{k}", hid)


def test_other_items_of_a_mixed_submission_are_unaffected(graded):
    for k in range(MIXES):
        s = graded.first["by"][f"mix_{k}"]
        want = {item: (a.expect if (a := mix(k).get(item)) else 4) for item in SPEC.items}
        assert {i["item"]: i["score"] for i in s["items"]} == want, f"mix_{k}"
        assert s["score"] == sum(want.values())


def test_hidden_feedback_names_the_property_never_the_inputs(graded):
    k = BY_ITEM["checkpoint_1"].index(named("checkpoint_1", "ignores_p"))
    page = graded.out / "feedback" / f"mix_{k}" / LESSON / "lesson.html"
    text = page.read_text(encoding="utf-8")
    assert "fails on another threshold p" in text
    assert "layers of" not in text and "expected 8" not in text   # the instructor-only detail stays out


# ---- the points table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TABLE))
def test_points_table_of_the_solutions_readme_holds(graded, name):
    s, want = graded.first["by"][name], TABLE[name][1]
    assert s["status"] == "graded", s["reason"]
    assert s["score"] == want, [(i["item"], i["score"], i["recheck_detail"]) for i in s["items"]]
    assert s["pass"] is (want >= 0.75 * SPEC.total_points)
    readme = (ROOT / "solutions" / "README.md").read_text()
    assert f"| {want} |" in readme


# ---- tampering --------------------------------------------------------------------------------------------
def test_custom_exception_handler_is_flagged_and_earns_no_hidden_points(graded):
    s = graded.first["by"]["tamper_custom_exc"]
    assert s["status"] == "flagged", s["reason"]
    assert "ipython-hooks" in {e["rule"] for e in s["evidence"] if e["flag"]}
    for it in s["items"]:
        assert it["recheck"] in ("mismatch", "error"), it
        assert it["parts"][f"{it['item']}__hidden"] == 0 or it["zeroed"], it
        assert it["score"] <= 1, it
