"""Out-of-kernel probes: THE one place that says how each assessment item is re-checked.

For every item with a probe, the grader runs the student's answer code in a fresh subprocess (not
the notebook's kernel, so nothing a student monkeypatched there applies), calls the function or
class the answer cell defines on hidden inputs made here, converts the results to plain JSON in
that subprocess (so always-equal objects cannot survive the trip) and compares them, in the grader,
with references computed here from ``residual_bandwidth`` / numpy. See :mod:`autograder.recheck`.

Adding a probe (e.g. for ``checkpoint_2`` or ``summative_q3``) means adding one :class:`Probe` to
:data:`PROBES`:

* ``item``: the assessment item (grade ids ``<item>__visible`` / ``<item>__hidden``);
* ``target``: the name the answer cell defines (a function or a class); a case may name another
  one with ``Case(target=...)`` (an item whose answer cell defines two functions);
* ``cases(rng)``: a list of :class:`Case` — inputs drawn from ``rng`` (a ``numpy.random.Generator``
  seeded per grading run, so nobody can precompute the answers). Arrays that the student's code
  should receive as torch tensors are wrapped in :func:`T`. A case calls
  ``target(*args, **kwargs)``; with ``calls`` it then calls those methods on the returned object
  (a class instance) in order; with ``read`` the result is ``{attr: getattr(obj, attr)}``.
* ``expected(case)``: the reference result as plain data (dict / list / float / int / str),
  computed in the grader process;
* ``compare(got, want, case)``: ``None`` when the student's plain result ``got`` agrees with
  ``want``, else a short message (it becomes evidence). Helpers: :func:`compare_fields`.

Items without a probe are reported as ``no-probe``: they are graded by nbgrader alone (static
checks still apply).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

RANK_SLACK = 1e-6   # ranks computed at p +- this are accepted (float32 inputs, exact ties)


@dataclass(frozen=True)
class T:
    """An array the sandbox hands to the student's code as a torch tensor (same dtype)."""
    array: np.ndarray


@dataclass(frozen=True)
class Case:
    """One probe call (see the module docstring)."""
    label: str
    args: tuple = ()
    target: str | None = None      # call this name instead of the probe's target (items with two functions)
    kwargs: dict = field(default_factory=dict)
    calls: tuple = ()              # ((method, args, kwargs), ...) on the returned object
    read: tuple | None = None      # attributes to read instead of the return value
    extra: dict = field(default_factory=dict)   # grader-side data for expected/compare (never sent)


@dataclass(frozen=True)
class Probe:
    """How to re-check one item outside the kernel."""
    item: str
    target: str
    cases: Callable[[np.random.Generator], list[Case]]
    expected: Callable[[Case], Any]
    compare: Callable[[Any, Any, Case], str | None]


# ---- comparison helpers ---------------------------------------------------------------------------
def is_close(a, b, rel: float = 1e-6, abs_: float = 1e-9) -> bool:
    """|a - b| <= max(abs_, rel * max(|a|, |b|)) for plain numbers (bools are not numbers here)."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    if math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


def arrays_close(got, want, rtol: float, atol: float) -> bool:
    try:
        g = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    w = np.asarray(want, dtype=np.float64)
    return g.shape == w.shape and bool(np.allclose(g, w, rtol=rtol, atol=atol))


def compare_fields(got, want: dict, *, exact=(), floats=(), arrays=(), rel=1e-6, rtol=1e-6, atol=1e-9,
                   ranks=()) -> str | None:
    """Compare a returned dict field by field.

    ``exact``: equal plain values; ``floats``: :func:`is_close` with ``rel``; ``arrays``:
    element-wise with ``rtol``/``atol``; ``ranks``: ``want[key]`` is a ``(low, high)`` range.
    """
    if not isinstance(got, dict):
        return f"returned {type(got).__name__}, expected a dict with keys {sorted(want)}"
    for key in (*exact, *floats, *arrays, *ranks):
        if key not in got:
            return f"missing key {key!r}"
    for key in ranks:
        lo, hi = want[key]
        value = got[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not lo <= value <= hi:
            return f"{key} = {value!r}, expected {lo}" + (f"..{hi}" if hi != lo else "")
    for key in exact:
        if type(got[key]) is not type(want[key]) and not (isinstance(got[key], (int, float)) and isinstance(want[key], (int, float))
                                                          and not isinstance(got[key], bool)):
            return f"{key} = {got[key]!r}, expected {want[key]!r}"
        if got[key] != want[key]:
            return f"{key} = {got[key]!r}, expected {want[key]!r}"
    for key in floats:
        if not is_close(got[key], want[key], rel=rel):
            return f"{key} = {got[key]!r}, expected {want[key]!r}"
    for key in arrays:
        if not arrays_close(got[key], want[key], rtol, atol):
            return f"{key} differs from the reference (rtol {rtol:g}, atol {atol:g})"
    return None


# ---- references ------------------------------------------------------------------------------------
def _metrics(x: np.ndarray, p: float = 0.95):
    import torch
    import residual_bandwidth as rb
    return rb.compute_metrics(torch.as_tensor(x, dtype=torch.float64), variance_threshold=p)


def _rank_range(x: np.ndarray, p: float) -> tuple[int, int]:
    """Ranks a correct implementation may report: r_p computed at p - slack and p + slack."""
    import torch
    import residual_bandwidth as rb
    spec = rb.spectrum(torch.as_tensor(x, dtype=torch.float64))
    lo = rb.variance_threshold_rank(spec, max(1e-9, p - RANK_SLACK))
    hi = rb.variance_threshold_rank(spec, min(1.0, p + RANK_SLACK))
    return lo, hi


def _low_rank(rng, n, d, r, offset=0.0, noise=0.05, dtype=np.float32) -> np.ndarray:
    x = rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) + offset + noise * rng.standard_normal((n, d))
    return x.astype(dtype)


# ---- checkpoint_1: analyze_bandwidth(residual_states, p) ------------------------------------------
def _ck1_cases(rng) -> list[Case]:
    cases = []
    shapes = [(int(rng.integers(8, 20)), int(rng.integers(32, 64))),      # n < d: rank capped by n
              (int(rng.integers(150, 400)), int(rng.integers(16, 48))),
              (int(rng.integers(60, 120)), int(rng.integers(24, 56)))]
    for k, (n, d) in enumerate(shapes):
        r = int(rng.integers(2, d + 1))
        p = float(rng.choice([0.5, 0.8, 0.9, 0.95, 0.99]))
        offset = float(rng.uniform(-60, 60))
        layers = int(rng.integers(1, 4))
        states = [_low_rank(rng, n, d, r, offset) for _ in range(layers)]
        cases.append(Case(f"{layers} layers of {n}x{d}, rank {r}, p={p}", args=([T(s) for s in states],),
                          kwargs={"p": p}, extra={"X": np.concatenate(states), "p": p}))
    return cases


def _ck1_expected(case: Case) -> dict:
    X, p = case.extra["X"], case.extra["p"]
    n, d = X.shape
    return {"effective_rank": _rank_range(X, p), "total_dimensions": d, "n": n}


def _ck1_compare(got, want, case) -> str | None:
    msg = compare_fields(got, want, ranks=("effective_rank",), exact=("total_dimensions",))
    if msg:
        return msg
    r, n, d = int(got["effective_rank"]), want["n"], want["total_dimensions"]
    return compare_fields(got, {"utilization_available": r / min(n, d), "utilization_d_model": r / d},
                          floats=("utilization_available", "utilization_d_model"))


# ---- checkpoint_3: utilization_alert(state, warning, critical, p) -----------------------------------
def _ck3_cases(rng) -> list[Case]:
    cases = []
    for _ in range(3):
        d = int(rng.integers(24, 64))
        n = int(rng.integers(d + 40, 6 * d))
        k = int(rng.integers(2, d + 1))
        x = (rng.standard_normal((n, d)) @ np.diag(np.r_[np.ones(k), 0.01 * np.ones(d - k)])).astype(np.float32)
        warning = float(rng.uniform(0.2, 0.6))
        critical = float(rng.uniform(warning + 0.05, 0.95))
        cases.append(Case(f"{n}x{d} with {k} strong directions", args=(T(x),),
                          kwargs={"warning": warning, "critical": critical}, extra={"x": x, "w": warning, "c": critical}))
    # exactly at the warning threshold: the alert must fire (>=)
    d = int(rng.integers(20, 40))
    x = (rng.standard_normal((4 * d, d)) @ np.diag(np.r_[np.ones(d // 2), 0.01 * np.ones(d - d // 2)])).astype(np.float32)
    u = _metrics(x).variance_rank / d
    cases.append(Case("utilization exactly at the warning threshold", args=(T(x),), kwargs={"warning": u, "critical": 1.01},
                      extra={"x": x, "w": u, "c": 1.01}))
    for n, d in ((int(rng.integers(5, 30)), 48), (49, 48)):   # n - 1 < d cannot span; n - 1 == d can
        x = rng.standard_normal((n, d)).astype(np.float32)
        cases.append(Case(f"{n}x{d} (n - 1 {'<' if n - 1 < d else '=='} d)", args=(T(x),), extra={"x": x, "w": 0.75, "c": 0.9}))
    return cases


def _ck3_expected(case: Case) -> dict:
    x, w, c = case.extra["x"], case.extra["w"], case.extra["c"]
    n, d = x.shape
    if n - 1 < d:
        return {"level": "insufficient_data"}
    m = _metrics(x)
    u = m.variance_rank / d
    level = "critical" if u >= c else "warning" if u >= w else "ok"
    return {"level": level, "effective_rank": _rank_range(x, 0.95), "d": d}


def _ck3_compare(got, want, case) -> str | None:
    msg = compare_fields(got, want, exact=("level",))
    if msg or want["level"] == "insufficient_data":
        return msg
    msg = compare_fields(got, want, ranks=("effective_rank",))
    if msg:
        return msg
    return compare_fields(got, {"utilization_d_model": int(got["effective_rank"]) / want["d"]},
                          floats=("utilization_d_model",))


# ---- summative_q1: effective_rank_family(X) ------------------------------------------------------
def _q1_cases(rng) -> list[Case]:
    cases = []
    for n, d in ((int(rng.integers(8, 20)), int(rng.integers(30, 60))), (int(rng.integers(100, 300)), int(rng.integers(10, 40))),
                 (int(rng.integers(40, 80)), int(rng.integers(40, 80)))):
        r = int(rng.integers(2, min(n, d)))
        x = _low_rank(rng, n, d, r, offset=float(rng.uniform(-10, 10)), noise=0.1, dtype=np.float64)
        cases.append(Case(f"{n}x{d}, rank {r} + noise, offset", args=(T(x),), extra={"x": x}))
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        cases.append(Case(f"the same {n}x{d} rotated", args=(T(x @ q),), extra={"x": x}))
    return cases


def _q1_expected(case: Case) -> dict:
    m = _metrics(case.extra["x"])
    return {"participation_ratio": m.participation_ratio, "stable_rank": m.stable_rank, "entropy_rank": m.entropy_rank}


def _q1_compare(got, want, case) -> str | None:
    return compare_fields(got, want, floats=("participation_ratio", "stable_rank", "entropy_rank"), rel=1e-6)


# ---- summative_q2: RunningCovariance(d).update(...) -----------------------------------------------
def _q2_cases(rng) -> list[Case]:
    cases = []
    for label, n, d, offset, tol in (("random chunk sizes", int(rng.integers(300, 900)), int(rng.integers(3, 10)), 0.0, 1e-8),
                                     ("a mean 1e9 times the spread", 400, 3, 1e9, 1e-4)):
        data = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + offset
        sizes, i = [], 0
        while i < n:
            s = int(rng.integers(1, 40))
            sizes.append((i, min(n, i + s)))
            i += s
        calls = tuple(("update", (T(data[a:b]),), {}) for a, b in sizes)
        cases.append(Case(f"{label}: {n}x{d} in {len(sizes)} updates", args=(d,), calls=calls, read=("n", "mean", "cov"),
                          extra={"data": data, "tol": tol}))
    return cases


def _q2_expected(case: Case) -> dict:
    data = case.extra["data"]
    return {"n": int(data.shape[0]), "mean": data.mean(axis=0).tolist(), "cov": np.cov(data.T, ddof=1).tolist()}


def _q2_compare(got, want, case) -> str | None:
    tol = case.extra["tol"]
    return compare_fields(got, want, exact=("n",), arrays=("mean", "cov"), rtol=tol, atol=tol)



# ---- checkpoint_2: find_crowded_positions(X, loud_ratio, ...) -------------------------------------
def _ck2_cases(rng) -> list[Case]:
    cases = []
    for _ in range(2):
        n = int(rng.integers(60, 200)) * 2 + 1          # odd: every definition of the median agrees
        d = int(rng.integers(16, 48))
        loud = float(rng.uniform(1.8, 2.6))
        x = rng.standard_normal((n, d)) * np.linspace(2.0, 0.2, d)
        x = x @ np.linalg.qr(rng.standard_normal((d, d)))[0] + float(rng.uniform(-3, 3))
        for j, i in enumerate(rng.choice(n, size=6, replace=False)):
            x[i] *= 1.5 + j                               # rows 1.5x .. 6.5x louder
        cases.append(Case(f"{n}x{d}, six louder rows, loud_ratio {loud:.2f}", args=(T(x),),
                          kwargs={"loud_ratio": loud}, extra={"x": x, "loud": loud}))
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        cases.append(Case(f"the same {n}x{d} in a rotated basis", args=(T(x @ q),),
                          kwargs={"loud_ratio": loud}, extra={"x": x @ q, "loud": loud}))
    # planted: one crowded row, one loud one-dimensional row, one massive row
    n, d = 151, int(rng.integers(20, 40))
    x = rng.standard_normal((n, d))
    typical = float(np.median(np.linalg.norm(x, axis=1)))
    vh = np.linalg.svd(x - x.mean(0), full_matrices=False)[2]
    even = vh.sum(0) / np.linalg.norm(vh.sum(0))
    x[11] = x.mean(0) + 3.0 * typical * even
    x[22] = x.mean(0) + 3.0 * typical * vh[0]
    x[33] = 0.0
    x[33, 3] = 40.0 * typical
    cases.append(Case(f"planted crowded / one-dimensional / massive rows ({n}x{d})", args=(T(x),),
                      extra={"x": x, "loud": 2.0}))
    return cases


def _ck2_expected(case: Case) -> dict:
    import torch
    from residual_bandwidth.bottlenecks import layer_scores, severity
    loud = case.extra["loud"]
    ref = layer_scores(torch.as_tensor(case.extra["x"], dtype=torch.float64), loud_ratio=loud)
    out = {}
    for i in range(len(ref["norm_ratio"])):
        level = severity(float(ref["norm_ratio"][i]), float(ref["spread"][i]), loud_ratio=loud)
        if level != "none":
            out[i] = {"severity": level, "norm_ratio": float(ref["norm_ratio"][i]), "spread": float(ref["spread"][i])}
    return out


def _ck2_compare(got, want, case) -> str | None:
    if not isinstance(got, list) or not all(isinstance(r, dict) for r in got):
        return f"returned {type(got).__name__}, expected a list of dicts"
    try:
        by_pos = {int(r["position"]): r for r in got}
    except (KeyError, TypeError, ValueError):
        return "every record needs an integer 'position'"
    if set(by_pos) != set(want):
        return f"positions {sorted(by_pos)}, expected {sorted(want)}"
    for i, w in want.items():
        msg = compare_fields(by_pos[i], w, exact=("severity",), floats=("norm_ratio", "spread"), rel=1e-6)
        if msg:
            return f"position {i}: {msg}"
    return None


# ---- summative_q3: eraser_share(W_V, W_O), write_read_projection(write, read) ---------------------
def _q3_cases(rng) -> list[Case]:
    cases = []
    for _ in range(2):
        d = int(rng.integers(24, 80))
        dh = int(rng.integers(4, max(5, d // 4)))
        w_v, w_o = rng.standard_normal((d, dh)), rng.standard_normal((dh, d))
        cases.append(Case(f"random head {d}x{dh}", args=(T(w_v), T(w_o)), extra={"kind": "eig", "W_V": w_v, "W_O": w_o}))
    d, dh = int(rng.integers(24, 64)), int(rng.integers(4, 12))
    u = np.linalg.qr(rng.standard_normal((d, dh)))[0]
    cases.append(Case("planted eraser W_OV = -U U^T", args=(T(u), T(-u.T)), extra={"kind": "eig", "W_V": u, "W_O": -u.T}))
    for _ in range(2):
        t, d = int(rng.integers(10, 80)), int(rng.integers(16, 64))
        write, read = rng.standard_normal((t, d)), rng.standard_normal((t, d)) + float(rng.uniform(-2, 2))
        cases.append(Case(f"write/read projection over {t} tokens", args=(T(write), T(read)),
                          target="write_read_projection", extra={"kind": "proj", "write": write, "read": read}))
    return cases


def _q3_expected(case: Case) -> float:
    if case.extra["kind"] == "eig":
        eig = np.linalg.eigvals(case.extra["W_O"] @ case.extra["W_V"])
        mag = np.abs(eig)
        return float((mag * (eig.real < 0)).sum() / mag.sum())
    w, r = case.extra["write"], case.extra["read"]
    return float(((w * r).sum(-1) / (r * r).sum(-1)).mean())


def _q3_compare(got, want, case) -> str | None:
    return None if is_close(got, want, rel=1e-6, abs_=1e-9) else f"returned {got!r}, expected {want!r}"

PROBES: dict[str, Probe] = {p.item: p for p in [
    Probe("checkpoint_1", "analyze_bandwidth", _ck1_cases, _ck1_expected, _ck1_compare),
    Probe("checkpoint_2", "find_crowded_positions", _ck2_cases, _ck2_expected, _ck2_compare),
    Probe("checkpoint_3", "utilization_alert", _ck3_cases, _ck3_expected, _ck3_compare),
    Probe("summative_q1", "effective_rank_family", _q1_cases, _q1_expected, _q1_compare),
    Probe("summative_q2", "RunningCovariance", _q2_cases, _q2_expected, _q2_compare),
    Probe("summative_q3", "eraser_share", _q3_cases, _q3_expected, _q3_compare),
]}
