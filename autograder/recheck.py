"""Out-of-kernel re-check: grader side (inputs, references, verdicts). See :mod:`autograder.probes`.

:class:`ProbeSet` draws every probe's cases once per grading run (from the run's probe seed) and
computes the references once. :func:`start` launches :mod:`autograder.recheck_runner` for one
submission, inside the operating-system sandbox (:mod:`autograder.sandbox`) unless the run is
``--sandbox off``; its only writable folder holds the request and the result file;
:func:`finish` waits for it (wall-clock and memory limits) and returns a :class:`Verdict` per item:

* ``pass``      every case agrees with the reference;
* ``mismatch``  the answer ran but returned wrong values on hidden inputs;
* ``error``     the answer is missing, raised, timed out, or the process died;
* ``no-probe``  no probe is defined for the item (nbgrader alone grades it).

The verdict awards the item's hidden-test points (:mod:`autograder.scoring`). A failing verdict
names, for the student, the *property* its first failing case checks (``Verdict.prop``) and, for
the instructor, the case and what differed (``Verdict.detail``).
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cgroups, sandbox
from .guard import read_log
from .notebook import LessonSpec, student_code_cells
from .probes import PROBES, Case, Probe, T
from .procs import run_limited

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Verdict:
    """Re-check outcome for one item."""
    item: str
    verdict: str          # pass | mismatch | error | no-probe
    detail: str = ""
    cases: int = 0
    prop: str = ""        # student-facing: the property the first failing case checks

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "detail": self.detail, "cases": self.cases, "prop": self.prop}


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
            payload[item] = {"target": probe.target, "cases": [
                {"label": c.label, "target": c.target or probe.target, "args": _encode(tuple(c.args)), "kwargs": _encode(dict(c.kwargs)),
                 "calls": [(m, _encode(tuple(a)), _encode(dict(kw))) for m, a, kw in c.calls],
                 "read": list(c.read) if c.read else None} for c in cases[item]]}
        return cls(seed, active, cases, expected, payload)


@dataclass
class Running:
    """A re-check in progress (a thread waiting on the re-check process)."""
    thread: threading.Thread
    result_path: Path
    box: dict
    guard_log: Path


INSIDE = "/tmp/recheck"   # where the scratch folder appears inside the sandbox (also the cwd)


class RegradeNeeded(RuntimeError):
    """The re-check did not finish for the grader's own reasons (its wall clock): the submission is
    reported ``errored`` (re-grade), never as a wrong answer."""


def start(nb, spec: LessonSpec, probes: ProbeSet, workdir: Path, guard: dict, *, timeout: float,
          memory_bytes: int, case_timeout: float, cell_timeout: float, sandboxed: bool = True,
          cgroup_procs: list[str] = ()) -> Running:
    """Launch the re-check process for submission ``nb`` (returns at once).

    ``workdir/box`` is its scratch folder: the request (written here, before any student code
    runs), its result file and the guard's log. ``guard``: protected/allowed paths of the in-process
    guard (its ``allow`` and ``log`` are set here to the scratch folder).
    """
    scratch = workdir / "box"
    scratch.mkdir(parents=True, exist_ok=True)
    here = INSIDE if sandboxed else str(scratch)
    setup = [(f"locked cell {gid}", src) for gid, src in spec.locked_cells.items()]
    req = {"setup": setup, "cells": student_code_cells(nb, spec), "probes": probes.payload,
           "guard": {**guard, "allow": [here], "log": f"{here}/guard.jsonl"},
           "case_timeout": case_timeout, "cell_timeout": cell_timeout}
    with open(scratch / "request.pkl", "wb") as f:
        pickle.dump(req, f)
    os.chmod(scratch / "request.pkl", 0o644)
    argv = [sys.executable, "-m", "autograder.recheck_runner", f"{here}/request.pkl", f"{here}/result.jsonl"]
    if sandboxed:
        box_ = sandbox.Box(scratch, INSIDE, sandbox.Limits(memory_bytes=memory_bytes, cpu_seconds=int(timeout) + 30))
        sandbox.prepare_scratch(box_)
        cmd, cwd, env = cgroups.enter(sandbox.command(argv, box_), list(cgroup_procs)), None, None
    else:
        cmd, cwd = argv, scratch
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    box: dict = {}

    def target():
        box["limited"] = run_limited(cmd, timeout=timeout, memory_bytes=memory_bytes, cwd=cwd, env=env,
                                     stderr_path=workdir / "recheck-stderr.txt")

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return Running(thread, scratch / "result.jsonl", box, scratch / "guard.jsonl")


def finish(running: Running, probes: ProbeSet, spec: LessonSpec) -> tuple[dict[str, Verdict], list[str]]:
    """Wait for the re-check process; return per-item verdicts and notes about the student's cells."""
    running.thread.join()
    limited = running.box.get("limited")
    records = read_log(running.result_path)
    setup_error = next((r["setup_error"] for r in records if "setup_error" in r), None)
    if setup_error:
        raise RuntimeError(f"re-check: the instructor's locked helper cell failed outside the kernel: {setup_error}")
    notes = [f"{r['cell']}: {r['error']}" for r in records if "cell" in r and "error" in r]
    by_item = {r["item"]: r for r in records if "item" in r}
    ended = "process ended before checking this item"
    if limited and limited.killed == "wall-clock":
        raise RegradeNeeded(f"the out-of-kernel re-check did not finish within its {limited.seconds:.0f} s wall clock "
                            "(a busy machine, or code that ignores the per-case time limit); no hidden points "
                            "were decided: re-grade this submission")
    if limited and limited.killed:
        ended = f"re-check killed ({limited.killed} limit) before checking this item"
    verdicts: dict[str, Verdict] = {}
    for item in spec.items:
        if item not in probes.probes:
            verdicts[item] = Verdict(item, "no-probe", "no out-of-kernel probe defined for this item")
            continue
        rec = by_item.get(item)
        n = len(probes.cases[item])
        if rec is None:
            verdicts[item] = Verdict(item, "error", ended, n, "the hidden tests could not run to this item")
        elif "missing" in rec:
            verdicts[item] = Verdict(item, "error", rec["missing"], n, rec["missing"])
        else:
            verdicts[item] = _judge(item, rec.get("results", []), probes)
    return verdicts, notes


def _judge(item: str, results: list, probes: ProbeSet) -> Verdict:
    probe, cases, expected = probes.probes[item], probes.cases[item], probes.expected[item]
    if not isinstance(results, list) or len(results) != len(cases):
        return Verdict(item, "error", "incomplete re-check results", len(cases))
    for case, want, res in zip(cases, expected, results):
        if not isinstance(res, dict) or not res.get("ok"):
            err = res.get("error", "failed") if isinstance(res, dict) else "failed"
            return Verdict(item, "error", f"{case.target or probe.target} on hidden input ({case.label}): {err}", len(cases),
                           "not attempted (the answer still raises NotImplementedError)" if "NotImplementedError" in str(err)
                           else f"raised an error on {case.prop}" if case.prop else "raised an error on a hidden input")
        try:
            msg = probe.compare(res.get("value"), want, case)
        except Exception as e:  # a comparator must not crash the grader on odd data
            msg = f"result could not be compared ({type(e).__name__}: {e})"
        if msg:
            return Verdict(item, "mismatch", f"{case.target or probe.target} on hidden input ({case.label}): {msg}",
                           len(cases), f"fails on {case.prop}" if case.prop else "fails on a hidden input")
    return Verdict(item, "pass", f"{len(cases)} hidden cases agree with the reference", len(cases))
