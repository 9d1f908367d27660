"""Crafted submissions for tests/test_hostile_trust.py (issue 20, items 1-4, 6, 10 and 12).

Each attack is a notebook a cheating student could hand in, next to honest controls (strong,
typical, weak: answers of tests/fair_grading_answers.py, written independently of the solutions).
``build(folder)`` writes them as ``folder/<name>/<lesson>/<notebook>`` and returns
``{name: Case}``; a case states the exact score the submission deserves and whether it must be
flagged, so a point won by an attack or lost by an honest student fails the test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograder.ingest.notebook import grade_id, load_spec, strip_solution_markers
from autograder.check.threshold_suite import answered, insert_after_setup
from fair_grading_answers import ANSWERS
from residual_bandwidth.course import DEFAULT_LESSON

SPEC = load_spec(DEFAULT_LESSON)
SOURCE = {grade_id(c): strip_solution_markers(c.source) for c in SPEC.source.cells if grade_id(c) in SPEC.answer_cells}
ANSWER_GID = {a.item: gid for gid, a in SPEC.answer_cells.items()}
ITEM_POINTS = {item: SPEC.item_points(item) for item in SPEC.items}
STUB = None


@dataclass
class Case:
    score: float                     # exactly what the submission deserves
    flagged: bool | None = False     # True: must be flagged; False: must not be; None: either
    evidence: list[str] = field(default_factory=list)   # rules that must appear
    kernel_points: bool = False      # the attack did win points inside the kernel (nbgrader's own total)


def _cell(source: str, cid: str):
    c = nbformat.v4.new_code_cell(source)
    c.id = cid
    return c


def submission(answers: dict, before_answers: str = "", last: str = "") -> nbformat.NotebookNode:
    """The released notebook; each item's answer is ``answers[item]`` (code, or STUB), the source
    solution when the item is absent. ``before_answers``: an added cell right after the set-up;
    ``last``: an added cell at the end."""
    nb = answered(SPEC, answers)
    if before_answers:
        nb = insert_after_setup(nb, SPEC, before_answers, "hostile-before")
    if last:
        nb.cells.append(_cell(last, "hostile-last"))
    return nb


# ---- honest controls ---------------------------------------------------------------------------------
def _honest(pick: dict[str, str]) -> tuple[dict, float]:
    """Answers by (item -> answer name) from fair_grading_answers, and the score they earn."""
    answers, score = {}, 0.0
    for item in SPEC.items:
        a = next(a for a in ANSWERS if a.item == item and a.name == pick[item]) if item in pick else None
        if a is None:
            score += ITEM_POINTS[item]
        else:
            answers[item] = a.code
            score += a.expect
    return answers, score


STRONG = {"checkpoint_1": "sklearn", "checkpoint_2": "float32", "summative_q1": "eigvalsh_of_covariance",
          "summative_q3": "eigvalsh"}
TYPICAL = {"checkpoint_1": "no_centring", "checkpoint_3": "strict_comparison", "summative_q1": "numpy",
           "summative_q2": "divides_by_n"}
WEAK = {"checkpoint_1": "sigma_not_variance", "checkpoint_2": "mean_not_median", "checkpoint_3": "ignores_p",
        "summative_q1": "ranks_on_sigma", "summative_q2": "forgets_the_merge_term", "summative_q3": "ratio_of_sums"}

# honest code whose words name the grader's folders (the guard matched them as substrings before)
HONEST_WORDS = '''
notes = "my homework folder: work, results, out, solutions"
import os
os.makedirs("work/results/out", exist_ok=True)
with open("work/results/out/solutions.txt", "w") as fh:
    fh.write(notes)
_ = !echo "my homework folder" && ls work/results && echo results out solutions
_ = !cat work/results/out/solutions.txt
print(notes, len(_))
'''

# ---- attacks -------------------------------------------------------------------------------------------
INF = '''
import torch as _torch
def _hostile_inf(v):
    """every float of a result becomes inf"""
    if isinstance(v, bool) or isinstance(v, int):
        return v
    if isinstance(v, float):
        return float("inf")
    if isinstance(v, _torch.Tensor):
        return _torch.full_like(v, float("inf")) if v.is_floating_point() else v
    if isinstance(v, dict):
        return {k: _hostile_inf(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_hostile_inf(x) for x in v)
    return v
def _hostile_wrap(f):
    def g(*a, **k):
        return _hostile_inf(f(*a, **k))
    return g
'''


def _inf_answer(item: str) -> str:
    gid = ANSWER_GID[item]
    code = SOURCE[gid] + INF
    for name in SPEC.answer_cells[gid].defines:
        code += f"\n{name} = _hostile_wrap({name})"
    return code


# attempted but wrong answers (constants) for Q1 and Q3, whose visible tests compare with close()
WRONG_Q1 = '''
def effective_rank_family(X):
    return {"participation_ratio": 1.0, "stable_rank": 1.0, "entropy_rank": 1.0}
'''
WRONG_Q3 = '''
def eraser_share(W_V, W_O):
    return 0.5

def write_read_projection(write, read):
    return 0.5
'''
# the first line is IPython syntax (plain ast.parse fails on the whole cell); the rest patches builtins
HIDDEN_BEHIND_SHELL = '''_ = !true
import builtins
builtins.abs = lambda x: 0.0          # close() now says "close" to everything
'''

# the kernel reports every test as passed: no traceback shown, the error cleared after each cell
KERNEL_HOOKS = '''
_ip = get_ipython()
setattr(_ip, "_show" + "traceback", lambda *a, **k: None)
def _clear(result):
    result.error_in_exec = None
    result.error_before_exec = None
getattr(_ip, "eve" + "nts").register("post_" + "run_cell", _clear)
'''

# the visible tests' own module: its assertion helper made a no-op, by a name the static scan does not see
PATCH_CHECKS = '''
import importlib
_m = importlib.import_module("residual_bandwidth.course." + "che" + "cks")
setattr(_m, "che" + "ck", lambda *a, **k: None)
setattr(_m, "clo" + "se", lambda *a, **k: True)
'''

# forge the re-check's verdict channel: a setup_error line (with terminal escapes) into every pipe
# this process can write, before and after a flagged builtins patch
FORGE = r'''
import builtins, os, stat, json
builtins.sum = lambda *a, **k: 0        # plainly flagged tampering (patch-module)
_line = (json.dumps({"setup_error": "\x1b[31mgrader broken\x07\x1b]0;pwned\x07 =HYPERLINK()"}) + "\n").encode()
for _fd in range(3, 64):
    try:
        if stat.S_ISFIFO(os.fstat(_fd).st_mode):
            os.write(_fd, _line)
            os.write(_fd, (json.dumps({"seq": 1, "step": 0, "ok": True}) + "\n").encode())
    except OSError:
        pass
for _name in os.listdir("."):
    if _name.endswith((".jsonl", ".json")):
        try:
            with open(_name, "a") as _f:
                _f.write(_line.decode())
        except OSError:
            pass
raise ValueError("\x1b[2J\x1b]0;title\x07 cleared your terminal")
'''

# a blocked access (tripwire), then every way to erase the log: truncate files, fds, /proc/self/fd
TRUNCATE = r'''
import os, stat
try:
    open("/proc/1/environ").read()
except OSError:
    pass
for _name in os.listdir("."):
    try:
        open(_name, "w").close()
    except OSError:
        pass
for _fd in range(3, 64):
    try:
        os.ftruncate(_fd, 0)
    except OSError:
        pass
    try:
        if stat.S_ISFIFO(os.fstat(_fd).st_mode):
            _r = os.open(f"/proc/self/fd/{_fd}", os.O_RDONLY | os.O_NONBLOCK)
            os.read(_r, 1 << 20)
    except OSError:
        pass
'''


def build(folder: Path) -> dict[str, Case]:
    """Write every submission; return the expected outcome of each."""
    cases: dict[str, tuple[Case, object]] = {}
    for name, pick in (("honest_strong", STRONG), ("honest_typical", TYPICAL), ("honest_weak", WEAK)):
        answers, score = _honest(pick)
        cases[name] = (Case(score), submission(answers))
    cases["honest_words_and_shell"] = (Case(SPEC.total_points), submission({}, before_answers=HONEST_WORDS))
    stubs = {item: STUB for item in SPEC.items}
    checkpoints = [i for i in SPEC.items if i.startswith("checkpoint")]
    cases["attack_inf_checkpoints"] = (Case(0.0, None), submission(
        {**stubs, **{i: _inf_answer(i) for i in checkpoints}}))
    honest_part = sum(ITEM_POINTS[i] for i in checkpoints)
    cases["attack_inf_q1_q3_plus_honest"] = (Case(honest_part, None), submission(
        {**{i: STUB for i in SPEC.items if i not in checkpoints},
         "summative_q1": _inf_answer("summative_q1"), "summative_q3": _inf_answer("summative_q3")}))
    cases["attack_builtins_behind_shell_line"] = (
        Case(0.0, True, ["patch-module"], kernel_points=True),
        submission({**stubs, "summative_q1": WRONG_Q1, "summative_q3": WRONG_Q3}, before_answers=HIDDEN_BEHIND_SHELL))
    cases["attack_kernel_hooks"] = (Case(0.0, None, kernel_points=True), submission(stubs, before_answers=KERNEL_HOOKS))
    cases["attack_patch_checks"] = (Case(0.0, None, kernel_points=True), submission(
        {**stubs, "summative_q1": WRONG_Q1, "summative_q3": WRONG_Q3}, before_answers=PATCH_CHECKS))
    cases["attack_forged_verdicts"] = (Case(0.0, True, ["patch-module"]), submission(stubs, before_answers=FORGE))
    cases["attack_truncate_tripwire"] = (Case(0.0, True, ["blocked-access"]), submission(stubs, last=TRUNCATE))
    for name, (case, nb) in cases.items():
        path = folder / name / SPEC.lesson_id / SPEC.notebook_name
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(path))
    return {name: case for name, (case, _) in cases.items()}
