"""Out-of-kernel re-check: grader side (inputs, references, verdicts). See :mod:`autograder.check.probes`.

:class:`ProbeSet` draws every probe's cases once per grading run (from the run's probe seed) and
computes the references once. :func:`start` launches :mod:`autograder.check.recheck_runner` for one
submission, inside the operating-system sandbox (:mod:`autograder.isolate.sandbox`) unless the run is
``--sandbox off``; its only writable folder holds the request (and whatever the student's code writes).
It runs, in the notebook's order, the student's answer and added cells **and the instructor's
visible test cells** (so visible points too are decided outside the kernel: nothing done to the
kernel's replies, tracebacks or hooks changes them), then the probes.

**The channels back are pipes whose read ends stay in the grader** (:class:`~autograder.isolate.guard.PipeReader`):
one for the records (verdict lines), one for the guard's tripwire log. Nothing is read back from a
file the student's code could write. The records are *hostile data*: the grader knows the exact
sequence the runner writes (``seq`` 0: set-up, written before any student code exists; then one
record per step, one per probed item, then ``done``), so a record out of place — a forged
``setup_error``, a duplicated item or step — cannot change a verdict: it is evidence
(``recheck-output-forged``, flagged) and the items of a forged run get no re-check points. Every
text taken from a record is cleaned (:func:`clean_text`) before it reaches results or feedback.
:func:`finish` waits for it (wall-clock and memory limits) and returns a :class:`Verdict` per item:

* ``pass``      every case agrees with the reference;
* ``mismatch``  the answer ran but returned wrong values on hidden inputs;
* ``error``     the answer is missing, raised, timed out, or the process died;
* ``no-probe``  no probe is defined for the item (nbgrader alone grades it).

The verdict awards the item's hidden-test points (:mod:`autograder.check.scoring`). A failing verdict
names, for the student, the *property* its first failing case checks (``Verdict.prop``) and, for
the instructor, the case and what differed (``Verdict.detail``).
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autograder.isolate import cgroups, sandbox
from autograder.isolate.guard import PipeReader
from autograder.ingest.notebook import LessonSpec, cell_label, grade_id, is_added
from autograder.check.probes import PROBES, Case, Probe, T
from autograder.isolate.procs import run_limited

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Verdict:
    """Re-check outcome for one item."""
    item: str
    verdict: str          # pass | mismatch | error | no-probe
    detail: str = ""
    cases: int = 0
    prop: str = ""        # student-facing: the property the first failing case checks
    visible: str = ""     # the visible tests outside the kernel: pass | fail ("" = not re-checked)
    visible_detail: str = ""

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "detail": self.detail, "cases": self.cases, "prop": self.prop,
                "visible": self.visible, "visible_detail": self.visible_detail}


_CONTROL = (dict.fromkeys(c for c in range(32) if c not in (9, 10)) | {127: None} | dict.fromkeys(range(0x80, 0xA0))
            | dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))   # + bidirectional overrides


def clean_text(value, limit: int = 500) -> str:
    """Text from a student's process made safe to store: a string, control characters (terminal
    escapes included) and bidirectional overrides removed, at most ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text[: limit * 2].translate(_CONTROL).replace("\n", " ")[:limit]


def _encode(obj):
    if isinstance(obj, T):
        return {"__tensor__": np.ascontiguousarray(obj.array)}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_encode(v) for v in obj)
    return obj


def item_rng(seed: int, item: str) -> np.random.Generator:
    """The generator of one item's hidden inputs: the offering's seed and the item's name only."""
    return np.random.default_rng([seed, zlib.crc32(item.encode())])


@dataclass
class ProbeSet:
    """The run's probe cases and references for the items present in the notebook."""
    seed: int
    probes: dict[str, Probe]
    cases: dict[str, list[Case]]
    expected: dict[str, list]
    payload: dict = field(default_factory=dict)   # what the sandbox receives (no references)

    @classmethod
    def build(cls, spec: LessonSpec, seed: int, probes: dict[str, Probe] = PROBES) -> "ProbeSet":
        active = {item: probes[item] for item in spec.items if item in probes}
        cases, expected, payload = {}, {}, {}
        for item, probe in sorted(active.items()):
            rng = item_rng(seed, item)
            cases[item] = probe.cases(rng)
            expected[item] = [probe.expected(c) for c in cases[item]]
            payload[item] = {"target": probe.target, "nonfinite": probe.nonfinite, "cases": [
                {"label": c.label, "target": c.target or probe.target, "args": _encode(tuple(c.args)), "kwargs": _encode(dict(c.kwargs)),
                 "calls": [(m, _encode(tuple(a)), _encode(dict(kw))) for m, a, kw in c.calls],
                 "read": list(c.read) if c.read else None} for c in cases[item]]}
        return cls(seed, active, cases, expected, payload)


def steps_of(nb, spec: LessonSpec) -> list[tuple[str, str, str]]:
    """What the re-check runs, in the notebook's order: ``("cell", label, source)`` for the
    student's answer and added cells, ``("visible", grade_id, instructor source)`` for the visible
    test cells (the hidden-points cells only report in the notebook; their tests are the probes)."""
    from autograder.check.scoring import is_hidden_part
    instructor = {grade_id(c): c.source for c in spec.source.cells if grade_id(c)}
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        gid = grade_id(cell)
        if (gid and gid in spec.answer_cells) or (not gid and is_added(cell, spec)):
            out.append(("cell", cell_label(cell, i), cell.source))
        elif gid in spec.grade_cells and not is_hidden_part(gid) and gid in instructor:
            out.append(("visible", gid, instructor[gid]))
    return out


@dataclass
class Running:
    """A re-check in progress (a thread waiting on the re-check process, readers on its pipes)."""
    thread: threading.Thread
    box: dict
    steps: list
    results: PipeReader
    guard: PipeReader
    guard_records: list = field(default_factory=list)   # filled by finish()
    forged: list = field(default_factory=list)          # records out of place (filled by finish())


INSIDE = "/tmp/recheck"   # where the scratch folder appears inside the sandbox (also the cwd)


class RegradeNeeded(RuntimeError):
    """The re-check did not finish for the grader's own reasons (its wall clock): the submission is
    reported ``errored`` (re-grade), never as a wrong answer."""


def start(nb, spec: LessonSpec, probes: ProbeSet, workdir: Path, guard: dict, *, timeout: float,
          memory_bytes: int, case_timeout: float, cell_timeout: float, sandboxed: bool = True,
          cgroup_procs: list[str] = ()) -> Running:
    """Launch the re-check process for submission ``nb`` (returns at once).

    ``workdir/box`` is its scratch folder: the request (written here, before any student code
    runs). The results and the guard's log come back through two pipes (write ends inherited by the
    process, read ends kept here). ``guard``: protected paths of the in-process guard (its ``allow``
    is set here to the scratch folder, its ``log`` to the pipe).
    """
    scratch = workdir / "box"
    scratch.mkdir(parents=True, exist_ok=True)
    here = INSIDE if sandboxed else str(scratch)
    res_r, res_w = os.pipe()
    log_r, log_w = os.pipe()
    setup = [(f"locked cell {gid}", src) for gid, src in spec.locked_cells.items()]
    steps = steps_of(nb, spec)
    req = {"setup": setup, "steps": steps, "probes": probes.payload, "result_fd": res_w,
           "guard": {**guard, "allow": [here], "log": log_w},
           "case_timeout": case_timeout, "cell_timeout": cell_timeout}
    with open(scratch / "request.pkl", "wb") as f:
        pickle.dump(req, f)
    os.chmod(scratch / "request.pkl", 0o644)
    argv = [sys.executable, "-m", "autograder.check.recheck_runner", f"{here}/request.pkl"]
    if sandboxed:
        box_ = sandbox.Box(scratch, INSIDE, sandbox.Limits(memory_bytes=memory_bytes, cpu_seconds=int(timeout) + 30))
        sandbox.prepare_scratch(box_)
        cmd, cwd, env = cgroups.enter(sandbox.command(argv, box_), list(cgroup_procs)), None, None
    else:
        cmd, cwd = argv, scratch
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    box: dict = {}
    readers = PipeReader(res_r), PipeReader(log_r)

    def target():
        try:
            box["limited"] = run_limited(cmd, timeout=timeout, memory_bytes=memory_bytes, cwd=cwd, env=env,
                                         stderr_path=workdir / "recheck-stderr.txt", pass_fds=(res_w, log_w))
        finally:
            os.close(res_w)
            os.close(log_w)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return Running(thread, box, steps, *readers)


def _sequence(records: list[dict], steps: list, items: list[str]) -> tuple[list[dict], list[str]]:
    """The records in the exact order the runner writes them (``seq`` 0, 1, ...), and what was
    out of place. The prefix up to the first anomaly is the runner's (nothing else could write
    before the set-up record, and each later record must be the next expected one); everything
    after an anomaly is discarded."""
    expected = [("setup", None)] + [("step", i) for i in range(len(steps))] + [("item", it) for it in items] + [("done", None)]
    good, forged = [], []
    for k, rec in enumerate(records):
        kind, key = expected[k] if k < len(expected) else ("extra", None)
        fits = rec.get("seq") == k and (
            (kind == "setup" and ("setup" in rec or "setup_error" in rec) and k == 0)
            or (kind == "step" and rec.get("step") == key and isinstance(rec.get("ok"), bool))
            or (kind == "item" and rec.get("item") == key)
            or (kind == "done" and rec.get("done") is True and len(rec) == 2))
        if not fits:
            forged.append(f"record {k} is not the runner's ({clean_text(json.dumps(rec)[:200], 200)})")
            break
        good.append(rec)
    return good, forged


def finish(running: Running, probes: ProbeSet, spec: LessonSpec) -> tuple[dict[str, Verdict], list[str]]:
    """Wait for the re-check process; return per-item verdicts and notes about the student's cells.

    Also fills ``running.guard_records`` (the guard's log) and ``running.forged`` (records out of
    place: tampering with the channel; the items then get no re-check points at all)."""
    running.thread.join()
    limited = running.box.get("limited")
    raw = running.results.finish()
    running.guard_records = running.guard.records()
    running.guard.finish()
    items = [i for i in probes.payload]
    records, forged = _sequence(running.results.records(), running.steps, items)
    if running.results.truncated:
        forged.append(f"more than {len(raw)} bytes of output")
    running.forged = forged
    if records and "setup_error" in records[0]:   # written before any student code ran: a grader problem
        raise RuntimeError(f"re-check: the instructor's locked helper cell failed outside the kernel: "
                           f"{clean_text(records[0]['setup_error'])}")
    ended = "process ended before checking this item"
    if forged:
        ended = "the re-check's output was tampered with (records not written by the grader's runner)"
    elif limited and limited.killed == "wall-clock":
        raise RegradeNeeded(f"the out-of-kernel re-check did not finish within its {limited.seconds:.0f} s wall clock "
                            "(a busy machine, or code that ignores the per-case time limit); no hidden points "
                            "were decided: re-grade this submission")
    elif limited and limited.killed:
        ended = f"re-check killed ({limited.killed} limit) before checking this item"
    steps = {r["step"]: r for r in records if "step" in r}
    notes = [f"{label}: {clean_text(steps[i].get('error', ''))}" for i, (kind, label, _) in enumerate(running.steps)
             if kind == "cell" and i in steps and not steps[i]["ok"]]
    visible: dict[str, list[str]] = {}
    for i, (kind, gid, _) in enumerate(running.steps):
        if kind == "visible" and gid in spec.grade_cells:
            rec = None if forged else steps.get(i)
            why = "" if rec and rec["ok"] else clean_text(rec.get("error", "failed")) if rec else ended
            visible.setdefault(spec.grade_cells[gid].item, []).append(why)
    by_item = {} if forged else {r["item"]: r for r in records if "item" in r}
    verdicts: dict[str, Verdict] = {}
    for item in spec.items:
        if item not in probes.probes:
            v = Verdict(item, "no-probe", "no out-of-kernel probe defined for this item")
        else:
            rec = by_item.get(item)
            n = len(probes.cases[item])
            if rec is None:
                v = Verdict(item, "error", ended, n, "the hidden tests could not run to this item")
            elif "missing" in rec:
                msg = clean_text(rec["missing"])
                v = Verdict(item, "error", msg, n, msg)
            else:
                v = _judge(item, rec.get("results", []), probes)
        fails = [w for w in visible.get(item, []) if w]
        if item in visible:
            v.visible, v.visible_detail = ("fail", fails[0]) if fails else ("pass", "")
        verdicts[item] = v
    return verdicts, notes


def _judge(item: str, results: list, probes: ProbeSet) -> Verdict:
    probe, cases, expected = probes.probes[item], probes.cases[item], probes.expected[item]
    if not isinstance(results, list) or len(results) != len(cases):
        return Verdict(item, "error", "incomplete re-check results", len(cases))
    for case, want, res in zip(cases, expected, results):
        if not isinstance(res, dict) or res.get("ok") is not True:
            err = clean_text(res.get("error", "failed")) if isinstance(res, dict) else "failed"
            return Verdict(item, "error", f"{case.target or probe.target} on hidden input ({case.label}): {err}", len(cases),
                           "not attempted (the answer still raises NotImplementedError)" if "NotImplementedError" in err
                           else f"raised an error on {case.prop}" if case.prop else "raised an error on a hidden input")
        try:
            msg = probe.compare(res.get("value"), want, case)
        except Exception as e:  # a comparator must not crash the grader on odd data
            msg = f"result could not be compared ({type(e).__name__}: {e})"
        if msg:
            return Verdict(item, "mismatch", f"{case.target or probe.target} on hidden input ({case.label}): {clean_text(msg)}",
                           len(cases), f"fails on {case.prop}" if case.prop else "fails on a hidden input")
    return Verdict(item, "pass", f"{len(cases)} hidden cases agree with the reference", len(cases))
