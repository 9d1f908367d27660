"""Out-of-kernel probes: THE one specification of each assessment item's hidden tests.

For every item with a probe, the grader runs the student's answer code in a fresh subprocess (not
the notebook's kernel, so nothing a student monkeypatched there applies), calls the function or
class the answer cell defines on hidden inputs made here, converts the results to plain JSON in
that subprocess (so always-equal objects cannot survive the trip) and compares them, in the grader,
with references computed here. **This verdict is what awards an item's hidden-test points**; the
``<item>__hidden`` cell in the notebook only checks that the answer runs (see
:mod:`autograder.check.scoring` and ``autograder/README.md``, "Scoring and determinism").

Inputs are **fixed per offering**: ``cases(rng)`` draws from a generator seeded with the offering's
``probe_seed`` (``autograder/offering.toml``) and the item's name, so the same submission always
meets the same inputs, and adding an item never changes another item's inputs.

A probe (one per item, in :data:`PROBES`):

* ``item``: the assessment item (grade ids ``<item>__visible`` / ``<item>__hidden``);
* ``target``: the name the answer cell defines (a function or a class); a case may name another
  one with ``Case(target=...)`` (an item whose answer cell defines two functions);
* ``cases(rng)``: a list of :class:`Case` (synthetic inputs, plus real residual streams of the
  embedded model recorded once by :mod:`autograder.check.record_probe_data`), ordered from the plainest input to the special ones.
  Each case names the **property** it checks (``prop``, e.g. "data with a large mean"); the first
  failing case's property is the student's feedback — never its inputs or code. Arrays the
  student's code should receive as torch tensors are wrapped in :func:`T`. A case calls
  ``target(*args, **kwargs)``; with ``calls`` it then calls those methods on the returned object
  (a class instance) in order; with ``read`` the result is ``{attr: getattr(obj, attr)}``.
* ``expected(case)``: the reference result as plain data, computed in the grader process;
* ``compare(got, want, case)``: ``None`` when the student's plain result ``got`` agrees with
  ``want``, else a short message for the instructor (it names values; students never see it).

Tolerances follow each quantity's conditioning: ranks and levels are exact, and the inputs are
drawn so that no cumulative variance share, norm ratio or spread lies near a decision threshold
(a float32 computation cannot land on the other side); real-valued results are compared with the
relative tolerance a correct float32 computation meets (``REL_F32``), except where the exercise asks
for float64 accuracy because the question needs it (the streaming covariance with a large mean). Correct answers
written with numpy, scikit-learn, ``eigvalsh`` of the covariance or float32 arithmetic pass
(``tests/test_fair_grading.py`` grades such answers through the real pipeline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

RANK_SLACK = 1e-9    # ranks computed at p +- this are accepted (exact ties in floating point)
MARGIN = 1e-3        # inputs keep every decision quantity this far (relative) from its threshold
REL_F32 = 1e-4       # relative accuracy of a correct float32 computation of a well-conditioned quantity


@dataclass(frozen=True)
class T:
    """An array the sandbox hands to the student's code as a torch tensor (same dtype)."""
    array: np.ndarray


@dataclass(frozen=True)
class Case:
    """One probe call (see the module docstring)."""
    label: str                     # instructor-facing: what the input is (sizes, seeds)
    args: tuple = ()
    target: str | None = None      # call this name instead of the probe's target (items with two functions)
    kwargs: dict = field(default_factory=dict)
    calls: tuple = ()              # ((method, args, kwargs), ...) on the returned object
    read: tuple | None = None      # attributes to read instead of the return value
    extra: dict = field(default_factory=dict)   # grader-side data for expected/compare (never sent)
    prop: str = ""                 # student-facing: the property this case checks


@dataclass(frozen=True)
class Probe:
    """How to re-check one item outside the kernel."""
    item: str
    target: str
    cases: Callable[[np.random.Generator], list[Case]]
    expected: Callable[[Case], Any]
    compare: Callable[[Any, Any, Case], str | None]
    nonfinite: bool = False        # True only if a correct answer may return inf/nan (none today): the
                                   # sandbox then passes them on and the comparator must expect them


# ---- comparison helpers ---------------------------------------------------------------------------
def is_close(a, b, rel: float = 1e-6, abs_: float = 1e-9, *, nonfinite: bool = False) -> bool:
    """|a - b| <= max(abs_, rel * max(|a|, |b|)) for plain finite numbers (bools are not numbers here).

    A non-finite value on *either* side is never close (``inf`` would otherwise satisfy the test
    against every finite reference: |inf - b| = inf <= rel * inf); with ``nonfinite=True`` (a probe
    that expects them) ``inf`` equals only the same ``inf`` and ``nan`` only ``nan``.
    """
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return False
    try:
        fa, fb = float(a), float(b)
    except OverflowError:   # an int too large for a float
        return False
    if not (math.isfinite(fa) and math.isfinite(fb)):
        return nonfinite and (fa == fb or (math.isnan(fa) and math.isnan(fb)))
    return abs(fa - fb) <= max(abs_, rel * max(abs(fa), abs(fb)))


def arrays_close(got, want, rtol: float, atol: float, *, nonfinite: bool = False) -> bool:
    """Same shape and element-wise close; any non-finite element (either side) fails unless ``nonfinite``."""
    try:
        g = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return False
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return False
    if not nonfinite and not (np.isfinite(g).all() and np.isfinite(w).all()):
        return False
    return bool(np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=nonfinite))


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
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or not lo <= value <= hi):
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
    return rb.compute_metrics(torch.as_tensor(np.asarray(x), dtype=torch.float64), variance_threshold=p)


def variance_shares(x: np.ndarray) -> np.ndarray:
    """Cumulative variance shares of the centred rows of ``x`` (float64), largest direction first."""
    x = np.asarray(x, dtype=np.float64)
    lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return np.cumsum(lam) / lam.sum()


def rank_is_clear(x: np.ndarray, p: float) -> bool:
    """No cumulative share lies within ``MARGIN`` of ``p``: every correct method finds the same rank."""
    return bool(np.all(np.abs(variance_shares(x) - p) > MARGIN))


def _rank_range(x: np.ndarray, p: float) -> tuple[int, int]:
    """Ranks a correct implementation may report: r_p computed at p - slack and p + slack."""
    import torch
    import residual_bandwidth as rb
    spec = rb.spectrum(torch.as_tensor(np.asarray(x), dtype=torch.float64))
    lo = rb.variance_threshold_rank(spec, max(1e-9, p - RANK_SLACK))
    hi = rb.variance_threshold_rank(spec, min(1.0, p + RANK_SLACK))
    return lo, hi


def _low_rank(rng, n, d, r, offset=0.0, noise=0.05, dtype=np.float64) -> np.ndarray:
    x = rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) + offset + noise * rng.standard_normal((n, d))
    return x.astype(dtype)


def _offset(rng, size: float, d: int) -> np.ndarray:
    """A mean vector of norm about ``size`` times sqrt(d) (a real mean, not a constant on one axis)."""
    return size * (1.0 + rng.random(d))


def _clear(draw, p: float, tries: int = 200):
    """Draw until the pooled data's rank at ``p`` is unambiguous (deterministic: same rng, same draws)."""
    for _ in range(tries):
        out = draw()
        x = np.concatenate(out) if isinstance(out, list) else out
        if rank_is_clear(x, p):
            return out
    raise RuntimeError("could not draw an input whose rank is clear of the threshold")


# ---- checkpoint_1: analyze_bandwidth(residual_states, p) ------------------------------------------
def _ck1_cases(rng) -> list[Case]:
    cases = []
    plan = [  # (property, layers, n, d, rank, offset size, p, dtype)
        ("a typical stack of layers (more positions than dimensions)", 2, 120, 24, 6, 0.0, 0.95, np.float64),
        ("data with a large mean (centre the pooled rows first)", 2, 150, 32, 8, 40.0, 0.95, np.float64),
        ("fewer positions than dimensions (n < d: utilization_available divides by min(n, d))", 3, 6, 48, 20, 0.0, 0.95,
         np.float64),
        ("another threshold p (0.8)", 2, 100, 20, 12, 3.0, 0.8, np.float64),
        ("another threshold p (0.5)", 1, 200, 16, 10, 0.0, 0.5, np.float64),
        ("float32 input with a mean", 3, 60, 40, 12, 10.0, 0.9, np.float32),
    ]
    for prop, layers, n, d, r, size, p, dtype in plan:
        def draw():
            mean = _offset(rng, size, d) if size else 0.0
            return [_low_rank(rng, n, d, r, mean, dtype=dtype) for _ in range(layers)]
        states = _clear(draw, p)
        cases.append(Case(f"{layers} layers of {n}x{d}, rank {r}, mean size {size}, p={p}, {np.dtype(dtype).name}",
                          args=([T(s) for s in states],), kwargs={"p": p},
                          extra={"X": np.concatenate(states).astype(np.float64), "p": p}, prop=prop))
    real = _recorded()           # the real model: blocks 3 and 6 of SmolLM2-135M on one paragraph
    states = [real[3], real[6]]
    if rank_is_clear(np.concatenate(states), 0.95):
        cases.append(Case("recorded SmolLM2-135M resid_post, blocks 3 and 6 (62 x 576 each), p=0.95",
                          args=([T(x) for x in states],), kwargs={"p": 0.95},
                          extra={"X": np.concatenate(states).astype(np.float64), "p": 0.95},
                          prop="two real layers of SmolLM2-135M (massive activations, fewer positions than dimensions)"))
    return cases


def _recorded() -> dict[int, np.ndarray]:
    """Real residual streams recorded once from the embedded model (:mod:`autograder.check.record_probe_data`)."""
    from autograder.check.record_probe_data import load
    return load()


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
                          floats=("utilization_available", "utilization_d_model"), rel=1e-9)


# ---- checkpoint_2: find_crowded_positions(X, loud_ratio, massive_ratio, critical_score) --------------
def _median(v: np.ndarray, kind: str) -> float:
    """``lower``: the lower middle value (torch.median); ``mean``: the mean of the two (np.median)."""
    v = np.sort(np.asarray(v, dtype=np.float64))
    return float(v[(len(v) - 1) // 2]) if kind == "lower" else float(np.median(v))


def crowded_reference(x: np.ndarray, loud: float = 2.0, massive: float = 4.0, critical: float = 4.0,
                      norm_median: str = "lower", pr_median: str = "lower") -> tuple[dict, dict]:
    """Section 5's definition, in numpy (checked against ``residual_bandwidth.bottlenecks``).

    ``norm_ratio_i = ||x_i|| / median_j ||x_j||``; typical rows have ``norm_ratio < loud``; the
    principal directions are those of the centred typical rows (singular value > 1e-9 s_max);
    ``spread_i = PR(c_i^2) / median over typical rows``, with ``c_i`` the coordinates of
    ``x_i - mean(typical)`` on those directions and ``PR(a) = (sum a)^2 / sum a^2``. Severity:
    ``massive`` if ``norm_ratio >= massive``, else ``critical``/``warning`` if ``norm_ratio >= loud``
    and ``spread >= 1`` (``critical`` when ``norm_ratio * spread >= critical``).
    Returns (records by position, per-row arrays for the margin check).
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    energy = norms / _median(norms, norm_median)
    typical = energy < loud
    mu = x[typical].mean(0)
    _, s, vh = np.linalg.svd(x[typical] - mu, full_matrices=False)
    c2 = ((x - mu) @ vh[s > 1e-9 * s[0]].T) ** 2
    pr = c2.sum(1) ** 2 / (c2 ** 2).sum(1)
    spread = pr / _median(pr[typical], pr_median)
    out = {}
    for i, (e, sp) in enumerate(zip(energy, spread)):
        if e >= massive:
            level = "massive"
        elif e >= loud and sp >= 1.0:
            level = "critical" if e * sp >= critical else "warning"
        else:
            continue
        out[i] = {"severity": level, "norm_ratio": float(e), "spread": float(sp)}
    return out, {"energy": energy, "spread": spread}


MEDIANS = [(a, b) for a in ("lower", "mean") for b in ("lower", "mean")]


def _ck2_clear(x: np.ndarray, loud: float) -> bool:
    """No row's norm ratio, spread or score is near a threshold, under any median convention."""
    for nm, pm in MEDIANS:
        _, arr = crowded_reference(x, loud, norm_median=nm, pr_median=pm)
        e, sp = arr["energy"], arr["spread"]
        near = lambda v, t: np.abs(v / t - 1.0) < MARGIN  # noqa: E731
        if near(e, loud).any() or near(e, 4.0).any():
            return False
        loud_rows = (e >= loud) & (e < 4.0)
        if near(sp[loud_rows], 1.0).any() or near(e[loud_rows] * sp[loud_rows], 4.0).any():
            return False
    return True


def _ck2_layer(rng, n, d, offset, n_loud=6):
    x = rng.standard_normal((n, d)) * np.linspace(2.0, 0.2, d)
    x = x @ np.linalg.qr(rng.standard_normal((d, d)))[0] + offset
    for j, i in enumerate(rng.choice(n, size=n_loud, replace=False)):
        x[i] *= 1.5 + j                                   # rows 1.5x .. 6.5x louder, spread as they were
    return x


def _ck2_planted(rng, n, d):
    x = rng.standard_normal((n, d))
    typical = float(np.median(np.linalg.norm(x, axis=1)))
    vh = np.linalg.svd(x - x.mean(0), full_matrices=False)[2]
    even = vh.sum(0) / np.linalg.norm(vh.sum(0))
    x[11] = x.mean(0) + 3.0 * typical * even               # loud and spread: crowded
    x[22] = x.mean(0) + 3.0 * typical * vh[0]              # loud along one direction only
    x[33] = 0.0
    x[33, 3] = 40.0 * typical                              # massive
    return x


def _ck2_cases(rng) -> list[Case]:
    plan = [  # (property, maker, loud_ratio, dtype)
        ("a crowded row, a loud one-directional row and a massive row",
         lambda: _ck2_planted(rng, 151, int(rng.integers(20, 40))), 2.0, np.float64),
        ("several loud rows in data with a mean", lambda: _ck2_layer(rng, 201, 24, 3.0), 2.0, np.float64),
        ("another loud_ratio", lambda: _ck2_layer(rng, 181, 32, 1.0), 2.5, np.float64),
        ("an even number of rows (either median convention is accepted)",
         lambda: _ck2_layer(rng, 160, 20, 2.0), 2.0, np.float64),
        ("data with a large mean", lambda: _ck2_layer(rng, 121, 16, 20.0, n_loud=3), 2.0, np.float64),
        ("float32 input", lambda: _ck2_layer(rng, 141, 28, 1.0), 2.0, np.float32),
        ("a real layer of SmolLM2-135M (block 3: massive activations)", lambda: _recorded()[3], 2.0, np.float32),
    ]
    cases = []
    for prop, make, loud, dtype in plan:
        for _ in range(200):
            x = make().astype(dtype)
            if _ck2_clear(x, loud):
                break
        else:
            raise RuntimeError(f"checkpoint_2: no clear input for {prop!r}")
        n, d = x.shape
        cases.append(Case(f"{n}x{d} {np.dtype(dtype).name}, loud_ratio {loud}", args=(T(x),),
                          kwargs={"loud_ratio": loud}, extra={"x": x, "loud": loud}, prop=prop))
        if len(cases) == 2:   # the same layer in a rotated basis
            q = np.linalg.qr(rng.standard_normal((d, d)))[0]
            xr = x @ q
            cases.append(Case(f"case 2 rotated ({n}x{d})", args=(T(xr),), kwargs={"loud_ratio": loud},
                              extra={"x": xr, "loud": loud},
                              prop="a rotated basis (the answer must not depend on coordinates)"))
    return cases


def _ck2_expected(case: Case) -> list[dict]:
    return [crowded_reference(case.extra["x"], case.extra["loud"], norm_median=nm, pr_median=pm)[0] for nm, pm in MEDIANS]


def _ck2_compare(got, wants, case) -> str | None:
    if not isinstance(got, list) or not all(isinstance(r, dict) for r in got):
        return f"returned {type(got).__name__}, expected a list of dicts"
    try:
        by_pos = {int(r["position"]): r for r in got}
    except (KeyError, TypeError, ValueError):
        return "every record needs an integer 'position'"
    first = None
    for want in wants:     # any median convention is accepted
        want = {int(k): v for k, v in want.items()}
        msg = None
        if set(by_pos) != set(want):
            msg = f"positions {sorted(by_pos)}, expected {sorted(want)}"
        else:
            for i, w in want.items():
                m = compare_fields(by_pos[i], w, exact=("severity",), floats=("norm_ratio", "spread"), rel=REL_F32)
                if m:
                    msg = f"position {i}: {m}"
                    break
        if msg is None:
            return None
        first = first or msg
    return first


# ---- checkpoint_3: utilization_alert(state, warning, critical, p) -----------------------------------
def _spread_layer(rng, n, d, k, offset=0.0):
    return rng.standard_normal((n, d)) @ np.diag(np.r_[np.ones(k), 0.02 * np.ones(d - k)]) + offset


def _ck3_cases(rng) -> list[Case]:
    cases = []

    def add(prop, x, **kw):
        n, d = x.shape
        cases.append(Case(f"{n}x{d} {kw}", args=(T(x),), kwargs=kw, extra={"x": x, **kw}, prop=prop))

    def clear(n, d, k, offset=0.0, p=0.95):
        return _clear(lambda: _spread_layer(rng, n, d, k, _offset(rng, offset, d) if offset else 0.0), p)

    add("a layer that uses few of its directions ('ok')", clear(400, 48, 8))
    add("a layer that uses most of its directions ('critical')", clear(300, 32, 32))
    add("between the two thresholds ('warning')", clear(300, 40, 30), warning=0.5, critical=0.9)
    add("data with a large mean", clear(300, 32, 20, offset=50.0), warning=0.4, critical=0.8)
    add("another p", clear(250, 24, 12, p=0.8), p=0.8, warning=0.3, critical=0.6)
    x = clear(300, 40, 16)
    u = _metrics(x).variance_rank / 40
    add("utilization exactly at the warning threshold (an alert at the threshold fires: >=)", x, warning=u, critical=1.0)
    x = clear(300, 40, 28)
    u = _metrics(x).variance_rank / 40
    add("utilization exactly at the critical threshold (>=)", x, warning=0.1, critical=u)
    add("too few positions to span the stream (n - 1 < d, here n == d)", rng.standard_normal((32, 32)))
    add("too few positions to span the stream (n < d)", rng.standard_normal((15, 48)))
    add("the smallest sample that can span the stream (n - 1 == d)", rng.standard_normal((25, 24)))
    return cases


def _ck3_expected(case: Case) -> dict:
    x = case.extra["x"]
    w, c, p = case.extra.get("warning", 0.75), case.extra.get("critical", 0.9), case.extra.get("p", 0.95)
    n, d = x.shape
    if n - 1 < d:
        return {"level": "insufficient_data"}
    r = _metrics(x, p).variance_rank
    u = r / d
    level = "critical" if u >= c else "warning" if u >= w else "ok"
    return {"level": level, "effective_rank": (r, r), "d": d}


def _ck3_compare(got, want, case) -> str | None:
    msg = compare_fields(got, want, exact=("level",))
    if msg or want["level"] == "insufficient_data":
        return msg
    msg = compare_fields(got, want, ranks=("effective_rank",))
    if msg:
        return msg
    return compare_fields(got, {"utilization_d_model": int(got["effective_rank"]) / want["d"]},
                          floats=("utilization_d_model",), rel=1e-9)


# ---- summative_q1: effective_rank_family(X) ------------------------------------------------------
def _q1_cases(rng) -> list[Case]:
    plan = [  # (property, n, d, rank, mean size, noise, dtype)
        ("a typical layer (more positions than dimensions, mean near zero)", 200, 24, 6, 0.0, 0.1, np.float64),
        ("data with a large mean (centre first)", 150, 32, 8, 30.0, 0.1, np.float64),
        ("fewer positions than dimensions (n < d)", 12, 48, 8, 2.0, 0.1, np.float64),
        ("a square matrix", 64, 64, 10, 1.0, 0.1, np.float64),
        ("exactly low rank (zero singular values: 0 log 0 = 0)", 100, 20, 5, 1.0, 0.0, np.float64),
        ("float32 input", 120, 40, 12, 5.0, 0.1, np.float32),
    ]
    cases = []
    for prop, n, d, r, size, noise, dtype in plan:
        mean = _offset(rng, size, d) if size else 0.0
        x = _low_rank(rng, n, d, r, mean, noise=noise, dtype=dtype)
        cases.append(Case(f"{n}x{d}, rank {r}, mean size {size}, noise {noise}, {np.dtype(dtype).name}", args=(T(x),),
                          extra={"x": x}, prop=prop))
        if len(cases) == 2:
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            cases.append(Case("case 2 rotated", args=(T(x @ q),), extra={"x": x},
                              prop="a rotated basis (the family must not change under X -> XQ)"))
    return cases


def _q1_expected(case: Case) -> dict:
    m = _metrics(case.extra["x"])
    return {"participation_ratio": m.participation_ratio, "stable_rank": m.stable_rank, "entropy_rank": m.entropy_rank}


def _q1_compare(got, want, case) -> str | None:
    return compare_fields(got, want, floats=("participation_ratio", "stable_rank", "entropy_rank"), rel=REL_F32)


# ---- summative_q2: RunningCovariance(d).update(...) -----------------------------------------------
def _chunks(rng, n, low, high):
    sizes, i = [], 0
    while i < n:
        s = int(rng.integers(low, high + 1))
        sizes.append((i, min(n, i + s)))
        i += s
    return sizes


def _q2_cases(rng) -> list[Case]:
    cases = []
    plan = [  # (property, n, d, mean size, chunk sizes, tolerance)
        ("one update with all the data", 200, 5, 1.0, None, 1e-8),
        ("two updates", 60, 4, 1.0, [(0, 23), (23, 60)], 1e-8),
        ("many updates of random sizes", 700, 6, 2.0, "random", 1e-8),
        ("updates of a single row", 120, 3, 1.0, "ones", 1e-8),
        ("a mean 1e9 times the spread (merge centred statistics)", 400, 3, 1e9, "random", 1e-4),
    ]
    for prop, n, d, size, chunks, tol in plan:
        data = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + size * (1.0 + rng.random(d))
        if chunks is None:
            chunks = [(0, n)]
        elif chunks == "random":
            chunks = _chunks(rng, n, 1, 40)
        elif chunks == "ones":
            chunks = _chunks(rng, n, 1, 1)
        calls = tuple(("update", (T(data[a:b]),), {}) for a, b in chunks)
        cases.append(Case(f"{n}x{d} in {len(chunks)} updates, mean size {size:g}", args=(d,), calls=calls,
                          read=("n", "mean", "cov"), extra={"data": data, "tol": tol}, prop=prop))
    return cases


def _q2_expected(case: Case) -> dict:
    data = case.extra["data"]
    return {"n": int(data.shape[0]), "mean": data.mean(axis=0).tolist(), "cov": np.cov(data.T, ddof=1).tolist()}


def _q2_compare(got, want, case) -> str | None:
    tol = case.extra["tol"]
    return compare_fields(got, want, exact=("n",), arrays=("mean", "cov"), rtol=tol, atol=tol)


# ---- summative_q3: eraser_share(W_V, W_O), write_read_projection(write, read) ---------------------
def _clear_head(rng, d, dh):
    """A random head whose eigenvalues are all clearly left or right of the imaginary axis."""
    for _ in range(200):
        w_v, w_o = rng.standard_normal((d, dh)), rng.standard_normal((dh, d))
        eig = np.linalg.eigvals(w_o @ w_v)
        if np.all(np.abs(eig.real) > MARGIN * np.abs(eig).max()):
            return w_v, w_o
    raise RuntimeError("could not draw a clear head")


def _q3_cases(rng) -> list[Case]:
    cases = []

    def head(prop, w_v, w_o, rel=REL_F32, **extra):   # a share in [0, 1]: float32 accuracy answers the question
        d, dh = w_v.shape
        cases.append(Case(f"head {d}x{dh} {w_v.dtype}", args=(T(w_v), T(w_o)),
                          extra={"kind": "eig", "W_V": w_v.astype(np.float64), "W_O": w_o.astype(np.float64), "rel": rel},
                          prop=prop))

    head("a random head (eigenvalues are complex: W_OV is not symmetric)", *_clear_head(rng, 32, 8))
    head("a random head of another size", *_clear_head(rng, 64, 16))
    u = np.linalg.qr(rng.standard_normal((40, 10)))[0]
    head("a head that erases a subspace exactly (W_OV = -U U^T)", u, -u.T)
    head("a head that copies a subspace (W_OV = +U U^T)", u, u.T.copy())
    w_v, w_o = _clear_head(rng, 48, 12)
    head("float32 weights", w_v.astype(np.float32), w_o.astype(np.float32))
    q = np.linalg.qr(rng.standard_normal((48, 48)))[0]
    head("a rotated residual basis (W_V -> Q^T W_V, W_O -> W_O Q)", q.T @ w_v, w_o @ q)

    def proj(prop, write, read):
        t, d = write.shape
        cases.append(Case(f"write/read over {t} tokens, d={d}", args=(T(write), T(read)), target="write_read_projection",
                          extra={"kind": "proj", "write": write.astype(np.float64), "read": read.astype(np.float64)},
                          prop=prop))

    read = rng.standard_normal((50, 32)) * (0.2 + 3 * rng.random((50, 1))) + 1.5
    proj("tokens of different norms (the mean over tokens of each token's ratio)",
         rng.standard_normal((50, 32)) - 0.5 * read, read)
    read = rng.standard_normal((30, 24))
    proj("a component that writes -0.7 x what it read", -0.7 * read, read)
    read = (rng.standard_normal((40, 16)) + 2.0).astype(np.float32)
    proj("float32 input", rng.standard_normal((40, 16)).astype(np.float32), read)
    return cases


def _q3_expected(case: Case) -> float:
    if case.extra["kind"] == "eig":
        eig = np.linalg.eigvals(case.extra["W_O"] @ case.extra["W_V"])
        mag = np.abs(eig)
        return float((mag * (eig.real < 0)).sum() / mag.sum())
    w, r = case.extra["write"], case.extra["read"]
    return float(((w * r).sum(-1) / (r * r).sum(-1)).mean())


def _q3_compare(got, want, case) -> str | None:
    rel = case.extra.get("rel", REL_F32)
    return None if is_close(got, want, rel=rel, abs_=1e-9) else f"returned {got!r}, expected {want!r}"


PROBES: dict[str, Probe] = {p.item: p for p in [
    Probe("checkpoint_1", "analyze_bandwidth", _ck1_cases, _ck1_expected, _ck1_compare),
    Probe("checkpoint_2", "find_crowded_positions", _ck2_cases, _ck2_expected, _ck2_compare),
    Probe("checkpoint_3", "utilization_alert", _ck3_cases, _ck3_expected, _ck3_compare),
    Probe("summative_q1", "effective_rank_family", _q1_cases, _q1_expected, _q1_compare),
    Probe("summative_q2", "RunningCovariance", _q2_cases, _q2_expected, _q2_compare),
    Probe("summative_q3", "eraser_share", _q3_cases, _q3_expected, _q3_compare),
]}
