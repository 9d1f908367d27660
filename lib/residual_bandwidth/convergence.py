"""How r_p depends on the sample size n: the convergence curve behind the sample-size rule.

A centred sample of n vectors spans at most ``n - 1`` directions, so ``r_p <= n - 1`` and
``r_p / d <= (n - 1) / d``: with ``n - 1 < d`` the width is not *judgeable* (the ratio cannot reach
1 whatever the stream does). ``n - 1 >= d`` makes it judgeable, not measured: the eigenvalues of a
sample covariance are more spread out than the true ones (the large ones overestimated, the small
ones underestimated; Marchenko and Pastur 1967), so a finite sample looks more concentrated than the
stream is, ``r_p`` is biased low, and the bias shrinks only slowly as n grows. :func:`rank_against_n` measures that on one matrix: for each n, ``repeats`` random subsets of
n rows (without replacement; one subset when n is all rows) and ``r_p`` of each (centred,
:func:`~residual_bandwidth.metrics.compute_metrics`).
"""
from __future__ import annotations

import torch

from .metrics import compute_metrics
from .validation import BandwidthInputError, as_matrix, check_int


def width_rule(n: int, d: int) -> dict:
    """The sample-size rule for judging the residual *width* from ``n`` positions of dimension ``d``.

    ``n`` centred vectors span at most ``n - 1`` directions, so ``r_p <= n - 1`` whatever the model
    does: a rank (or ``utilization_d_model = r_p / d``) from fewer than ``d + 1`` positions measures
    the sample, not the width. ``{"can_judge_width": n - 1 >= d, "positions_needed": d + 1,
    "positions_missing": max(0, d + 1 - n)}``. (``min_tokens_for_rank`` is a different, smaller bar: the
    per-request rank family describes that request's own tokens and never judges the width.)
    """
    return {"can_judge_width": n - 1 >= d, "positions_needed": d + 1, "positions_missing": max(0, d + 1 - n)}


def rank_against_n(x, ns, repeats: int = 5, p: float = 0.95, seed: int = 0, layer=None) -> list[dict]:
    """``[{layer, n, mean, min, max, repeats, judgeable}]``: r_p of random n-row subsets of ``x``.

    ``judgeable`` is ``n - 1 >= d``. ``ns`` larger than the number of rows are skipped."""
    x = as_matrix(x, name="x", layer=layer, min_rows=2).detach().double()
    repeats = check_int(repeats, "repeats", low=1)
    g = torch.Generator().manual_seed(seed)
    total, d = x.shape
    out = []
    for n in sorted({int(n) for n in ns}):
        if n < 2 or n > total:
            continue
        reps = 1 if n == total else repeats
        rs = [compute_metrics(x[torch.randperm(total, generator=g)[:n]], variance_threshold=p).variance_rank
              for _ in range(reps)]
        out.append({"layer": layer, "n": n, "mean": sum(rs) / len(rs), "min": min(rs), "max": max(rs),
                    "repeats": reps, "judgeable": width_rule(n, d)["can_judge_width"]})
    return out


def plot_rank_against_n(records: list[dict], d_model: int, p: float = 0.95):
    """r_p against n per layer (log n), with the cap r_p <= n - 1 and the judgeable line n - 1 = d.

    Returns an :class:`~residual_bandwidth.viz.AccessibleFigure` (alt text, caption, data table)."""
    from .viz.core import _figure, _finish, _style, format_number
    if not records:
        raise BandwidthInputError("records: nothing to plot")
    fig, axes = _figure((7.5, 4.2))
    ax = axes[0, 0]
    layers = sorted({r["layer"] for r in records}, key=str)
    for i, L in enumerate(layers):
        rs = [r for r in records if r["layer"] == L]
        st = _style(i)
        ax.errorbar([r["n"] for r in rs], [r["mean"] for r in rs],
                    yerr=[[r["mean"] - r["min"] for r in rs], [r["max"] - r["mean"] for r in rs]],
                    capsize=3, label=f"layer {L}: r{round(100 * p)} (mean, min-max of subsets)", **st)
    ns = sorted({r["n"] for r in records})
    ax.plot(ns, [min(n - 1, d_model) for n in ns], color="0.4", linestyle=":", label="cap: n - 1 (and d)")
    ax.axvline(d_model + 1, color="black", linestyle="--", linewidth=1.2,
               label=f"n = d + 1 = {d_model + 1}: judgeable from here")
    ax.set_xscale("log")
    ax.set_xlabel("sample size n (positions), log scale")
    ax.set_ylabel(f"r{round(100 * p)} (directions)")
    title = f"r{round(100 * p)} against the number of positions it is computed from"
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    parts = []
    for L in layers:
        rs = [r for r in records if r["layer"] == L]
        parts.append(f"layer {L}: " + ", ".join(f"n = {r['n']}: {format_number(r['mean'])}" for r in rs))
    alt = (f"Line chart of r{round(100 * p)} against sample size n (log scale), one line per layer, with the "
           f"cap n - 1 and a dashed line at n = {d_model + 1}. " + "; ".join(parts) + ".")
    table = [{k: r[k] for k in ("layer", "n", "mean", "min", "max", "repeats", "judgeable")} for r in records]
    return _finish(fig, alt, table, title, [])
