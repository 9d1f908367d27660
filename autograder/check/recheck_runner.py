"""The out-of-kernel re-check process (run as ``python -m autograder.check.recheck_runner REQUEST``).

It is started fresh for each submission by :mod:`autograder.check.recheck`, inside the operating-system
sandbox (:mod:`autograder.isolate.sandbox`; its scratch folder holds REQUEST). Its records go to an
inherited pipe (``result_fd``; the read end is the grader's), one JSON line each with a sequence
number; the grader knows the order and treats every record as hostile data. In order:

1. load the request (pickled by the grader: trusted helper code, the student's cells, the probe
   inputs) and turn the probe inputs into torch tensors — before any student code exists;
2. install the guard (:mod:`autograder.isolate.guard`), forget the grader's modules;
3. run the locked helper cells from the *instructor source* and write the set-up record (the last
   record written before any student code exists); then, in the notebook's order, the student's
   answer and added cells and the instructor's visible test cells, each on its own with one record
   each (an error in one cell is recorded, the rest still run). Before each visible test the
   instructor's helpers, the builtins and the names of the modules the tests use (``TEST_MODULES``,
   the course package) are put back as the set-up left them;
4. for each probed item call the target on every case (each under a SIGALRM time limit), convert the
   result to plain JSON here (non-finite numbers refused) and write one record per item.

The grader compares those plain values with its own references; nothing the student's code returns
is ever trusted as an object. This process never sees the expected values.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import signal
import sys
import traceback

MAX_RESULT_CHARS = 5_000_000
# modules whose names restore() puts back before each visible test: the course's package (its checks)
# and the numerical modules the checks call
TEST_PACKAGES = ("residual_bandwidth.",)
TEST_MODULES = frozenset({"residual_bandwidth", "torch", "torch.linalg", "numpy", "numpy.linalg", "math"})


class _CaseTimeout(BaseException):
    """Raised by SIGALRM when one probe call runs too long."""


def _alarm(signum, frame):
    raise _CaseTimeout()


def _decode(obj, torch):
    if isinstance(obj, dict) and "__tensor__" in obj and len(obj) == 1:
        return torch.from_numpy(obj["__tensor__"].copy())
    if isinstance(obj, dict):
        return {k: _decode(v, torch) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, torch) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_decode(v, torch) for v in obj)
    return obj


def make_plain(torch, np, nonfinite: bool = False):
    """A converter from the student's result to JSON-able builtins (raises TypeError otherwise).

    Non-finite floats (``inf``, ``nan``) are refused unless ``nonfinite`` (a probe that expects
    them): no reference of this lesson is infinite, and ``inf`` compares as "close" to everything
    under a relative tolerance. Integers are limited to 64 bits (a correct answer never needs more;
    a huge one would not survive JSON).
    """
    finite = math.isfinite

    def number(v: float) -> float:
        if not nonfinite and not finite(v):
            raise TypeError(f"returned a non-finite number ({v!r})")
        return v

    def integer(v: int) -> int:
        if v.bit_length() > 64:
            raise TypeError("returned an integer larger than 64 bits")
        return v

    def plain(x, depth=0):
        if depth > 20:
            raise TypeError("result nested too deeply")
        if x is None or type(x) in (bool, str):
            return x
        if type(x) is int:
            return integer(x)
        if type(x) is float:
            return number(x)
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            t = torch.Tensor.double(t) if t.is_floating_point() else t
            return plain(torch.Tensor.tolist(t), depth + 1)
        if isinstance(x, (np.ndarray, np.generic)):
            return plain(np.asarray(x).tolist(), depth + 1)
        if isinstance(x, bool):
            return bool.__bool__(x) if type(x) is bool else bool(int.__int__(x))
        if isinstance(x, int):
            return integer(int.__int__(x))          # an int subclass becomes its real value, overrides ignored
        if isinstance(x, float):
            return number(float.__float__(x) + 0.0)
        if isinstance(x, str):
            return str.__str__(x)[:10000] + ""
        if isinstance(x, dict):
            return {plain(k, depth + 1) if isinstance(k, str) else str(k): plain(v, depth + 1)
                    for k, v in dict.items(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v, depth + 1) for v in (list.__iter__(x) if isinstance(x, list) else tuple.__iter__(x))]
        raise TypeError(f"returned a {type(x).__name__}, not plain data (numbers, strings, dicts, lists, tensors)")

    return plain


def _no_shell(ns: dict):
    """``get_ipython`` for cells that use IPython syntax (``!cmd``, ``%magic``; the cell is transformed
    as the kernel does): shell commands and line magics do nothing here, the body of ``%%time`` /
    ``%%capture`` runs, so an honest answer cell that starts with a magic still defines its functions."""

    class NoShell:
        def system(self, *a, **k):
            return None

        def getoutput(self, *a, **k):
            return []

        def run_line_magic(self, *a, **k):
            return None

        def run_cell_magic(self, name, line, cell):
            if name in ("time", "capture", "prun"):
                exec(compile(cell, "<cell magic>", "exec"), ns)

    shell = NoShell()
    return lambda: shell


def _describe(e: BaseException) -> str:
    """``Name: message`` of an exception, without trusting the student's ``__str__``."""
    try:
        msg = str(e)[:300]
    except BaseException:
        msg = "(unprintable)"
    return f"{type(e).__name__}: {msg}"


def main(argv: list[str]) -> int:
    """Run the re-check described in the module docstring; 0 when it got to the end."""
    req_path = argv[1]
    with open(req_path, "rb") as f:
        req = pickle.load(f)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import builtins

    import numpy as np
    import torch
    torch.set_num_threads(1)
    probes = {item: {"target": p["target"], "nonfinite": p.get("nonfinite", False), "cases": [
        {"label": c["label"], "target": c["target"], "args": _decode(c["args"], torch), "kwargs": _decode(c["kwargs"], torch),
         "calls": _decode(c["calls"], torch), "read": c["read"]} for c in p["cases"]]} for item, p in req["probes"].items()}
    out_fd = req["result_fd"]
    os.set_inheritable(out_fd, False)
    dumps, write = json.dumps, os.write
    plain = {False: make_plain(torch, np), True: make_plain(torch, np, nonfinite=True)}
    seq = [0]

    def emit(record: dict) -> None:
        record = {"seq": seq[0], **record}
        seq[0] += 1
        text = dumps(record, allow_nan=True)
        if len(text) > MAX_RESULT_CHARS:
            text = dumps({**{k: v for k, v in record.items() if k != "results"},
                          "results": [{"ok": False, "error": "result too large"}]})
        write(out_fd, (text + "\n").encode())

    from autograder.isolate import guard
    guard.install(req["guard"]["protect"], req["guard"]["allow"], req["guard"].get("log"))
    for name in [m for m in sys.modules if m == "autograder" or m.startswith("autograder.")]:
        del sys.modules[name]
    del guard

    ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    ns["get_ipython"] = _no_shell(ns)
    for label, code in req["setup"]:
        try:
            exec(compile(code, label, "exec"), ns)
        except BaseException as e:  # the instructor's helper cell failing is a grader problem
            emit({"setup_error": f"{label}: {_describe(e)}"})
            return 3
    emit({"setup": "ok"})   # the last record written before any student code exists
    helpers = {k: v for k, v in ns.items() if not k.startswith("__")}
    pristine_builtins = dict(builtins.__dict__)
    # the modules the visible tests' code runs on: a replaced function there (checks.check, torch.allclose)
    # would make an instructor's test pass; new names are left alone (imports add them)
    pristine_modules = {name: (m, dict(vars(m))) for name, m in list(sys.modules.items())
                        if m is not None and (name in TEST_MODULES or name.startswith(TEST_PACKAGES))}

    def restore() -> None:
        """The instructor's helpers, the builtins and the test modules' names as the set-up left
        them (before a visible test)."""
        for k, v in helpers.items():
            if ns.get(k) is not v:
                ns[k] = v
        for name, (module, names) in pristine_modules.items():
            if sys.modules.get(name) is not module:
                sys.modules[name] = module
            current = vars(module)
            for k, v in names.items():
                if current.get(k, names) is not v:
                    current[k] = v
        current = builtins.__dict__
        for k in [k for k in current if k not in pristine_builtins]:
            del current[k]
        for k, v in pristine_builtins.items():
            if current.get(k) is not v:
                current[k] = v

    signal.signal(signal.SIGALRM, _alarm)
    cell_timeout = int(req.get("cell_timeout", 30))
    for index, (kind, label, code) in enumerate(req["steps"]):
        error = None
        try:
            if kind == "visible":
                restore()
            try:
                compiled = compile(code, label, "exec")
            except SyntaxError:
                from IPython.core.inputtransformer2 import TransformerManager
                compiled = compile(TransformerManager().transform_cell(code), label, "exec")
            signal.alarm(cell_timeout)
            try:
                exec(compiled, ns)
            finally:
                signal.alarm(0)
        except _CaseTimeout:
            error = f"the cell ran longer than {cell_timeout} s"
        except BaseException as e:
            error = _describe(e)
        emit({"step": index, "ok": error is None, **({"error": error} if error else {})})

    case_timeout = int(req.get("case_timeout", 20))
    for item, probe in probes.items():
        missing = sorted({c["target"] for c in probe["cases"] if not callable(ns.get(c["target"]))})
        if missing:
            emit({"item": item, "missing": f"the answer code does not define {', '.join(map(repr, missing))}"})
            continue
        results, too_long = [], False
        to_plain = plain[bool(probe["nonfinite"])]
        for case in probe["cases"]:
            if too_long:   # an infinite loop costs one case's limit, not one per case
                results.append({"ok": False, "error": "not run: an earlier case took too long"})
                continue
            signal.alarm(case_timeout)
            try:
                obj = ns[case["target"]](*case["args"], **case["kwargs"])
                for method, args, kwargs in case["calls"]:
                    getattr(obj, method)(*args, **kwargs)
                value = {a: getattr(obj, a) for a in case["read"]} if case["read"] else obj
                results.append({"ok": True, "value": to_plain(value)})
            except _CaseTimeout:
                results.append({"ok": False, "error": f"took longer than {case_timeout} s"})
                too_long = True
            except BaseException as e:
                tb = traceback.extract_tb(e.__traceback__)
                where = f" (line {tb[-1].lineno} of {tb[-1].filename})" if tb else ""
                results.append({"ok": False, "error": f"{_describe(e)}{where}"})
            finally:
                signal.alarm(0)
        emit({"item": item, "results": results})
    emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
