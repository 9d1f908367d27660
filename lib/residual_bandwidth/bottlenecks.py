"""Bottlenecks per (layer, position): which residual vectors crowd the stream.

Why the seed's detector cannot find loud positions
--------------------------------------------------
The seed flags a position when the participation ratio of ``|x|``, ``(sum_j |x_j|)^2 / sum_j x_j^2``,
exceeds ``0.8 d``. That number ignores the scale of ``x`` (multiply ``x`` by 100 and it does not
change), so it cannot tell a loud position from a quiet one: loudness never changes its verdict.
For a row with i.i.d. Gaussian coordinates it is ``~ d (E|x_j|)^2 / E x_j^2 = (2/pi) d ~ 0.64 d``,
below the threshold, loud or quiet (:func:`seed_abs_participation_ratio` shows it). It does fire on
rows whose coordinates have nearly equal magnitudes (a ``+-c`` sign pattern reads exactly ``d``),
quiet or loud: it measures how flat a row is in the coordinate basis, a basis the residual stream
does not privilege, not crowding.

What the detector below guarantees, exactly: a row is ``"warning"`` or ``"critical"`` only if
``norm_ratio >= loud_ratio`` and ``spread >= 1``; the severities do not change under a rotation
``X -> X Q`` or a common rescaling ``X -> c X`` of the layer (both quantities are ratios of
basis-free numbers). The thresholds are conventions: a flag does not say the model is hurt (the
compression curve, :mod:`.compression`, measures what narrowing the stream costs).

The definition used here (basis-free)
-------------------------------------
For one layer with rows ``x_i`` (tokens):

* **energy**: ``norm_ratio_i = ||x_i|| / median_j ||x_j||`` (as in :mod:`.outliers`).
* **the layer's principal directions**: PCA (centred, mean ``mu``) fitted on the layer's *typical*
  rows, those with ``norm_ratio < loud_ratio`` (2 by default). A loud row is therefore measured in
  a basis it did not shape; otherwise a single loud vector would become its own principal direction
  and look one-dimensional whatever it is. Typical rows, however, are measured in a basis they
  helped fit, and a fitted basis can concentrate its own rows in its top directions, so that in
  sample they look *less* spread than a row the fit did not see and the comparison favours flagging
  loud rows. :func:`heldout_spread` measures that bias and the same spread out of sample on both
  sides (see there); the lesson reports both.
* **spread**: the participation ratio of the row's squared PCA coordinates
  ``c_ik = (x_i - mu) . v_k``:  ``PR_i = (sum_k c_ik^2)^2 / sum_k c_ik^4`` (1 when the row lies along
  one principal direction, K when spread evenly over K of them), relative to the typical row:
  ``spread_i = PR_i / median_{j typical} PR_j``.
* **score** ``= norm_ratio * spread``: roughly "how many typical rows' worth of bandwidth" the row
  takes (louder and over more of the layer's directions).

Severity (thresholds are arguments):

* ``"massive"``: ``norm_ratio >= massive_ratio`` (4, the :mod:`.outliers` rule): a massive activation
  (Sun et al. 2024), reported as what it is and not as a bottleneck, whatever its spread. Why the
  norm alone: a massive activation is concentrated in one or two *coordinates* of the model's basis
  (SmolLM2: ~98 % of the energy in dimension 507, see ``outliers.MassiveActivation.top_dims``), a
  basis that element-wise operations (norm gains, SwiGLU) do privilege. Seen from the layer's
  principal directions it is *not* concentrated: its direction is one along which typical tokens
  hardly vary, so it spreads over many of their principal directions (measured spread 0.6 to 3). A
  basis-free spread test therefore cannot recognise it, and the basis-free norm rule is used.
* ``"critical"``: ``loud_ratio <= norm_ratio < massive_ratio``, ``spread >= 1`` and
  ``score >= critical_score`` (4): loud and spread over at least as many principal directions as a
  typical token.
* ``"warning"``: ``loud_ratio <= norm_ratio < massive_ratio`` and ``spread >= 1``, score below
  ``critical_score``.
* ``"none"``: everything else, including loud rows concentrated in few principal directions
  (``spread < 1``): loud but one-dimensional is not crowding.

``massive`` in the records is the same :mod:`.outliers` rule, so the same rows are flagged as in the
bandwidth report.

Checked out of sample
---------------------
The severities are a screen computed in sample. For every flagged row,
:attr:`BottleneckReport.out_of_sample` repeats the spread test out of sample on both sides
(:func:`heldout_spread` on the row's layer: ``spread_heldout``, ``percentile_heldout`` = share of
held-out typical rows less spread than the row, and the layer's in-sample ``bias``) and records
``massive_elsewhere``: the same (prompt, position) is massive at another of the analysed layers, so its loudness here
may be the tail of a massive row rather than crowding of its own. A flag is **confirmed** when
``percentile_heldout >= 0.95`` and it is not ``massive_elsewhere`` (:meth:`BottleneckReport.confirmed`).

Per layer, :meth:`BottleneckReport.per_layer_records` gives the utilization of the layer's
non-massive rows (variance-threshold rank / min(n, d) and / d, as in :mod:`.metrics`) and the number
of flagged rows, and ``utilization_slope`` is the least-squares slope of utilization_d_model per layer.
Everything depends on norms and on a PCA, so it is unchanged by a rotation ``X -> X Q`` of the basis.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .capture import as_capture, hook_name
from .convergence import width_rule
from .metrics import compute_metrics, principal_directions
from .outliers import DEFAULT_MASSIVE_RATIO, massive_mask
from .validation import BandwidthInputError, as_matrix, check_fraction, check_positive

SEVERITIES = ("none", "warning", "critical", "massive")
#: the keys of one (layer, row) record of :meth:`BottleneckReport.grid_records`
GRID_KEYS = ("layer", "prompt", "position", "token", "norm_ratio", "spread", "score", "severity", "massive")


def seed_abs_participation_ratio(x) -> torch.Tensor:
    """The seed's per-position metric ``(sum_j |x_ij|)^2 / sum_j x_ij^2`` for every row (kept only to
    show why it fails: it is ``~ (2/pi) d`` for any Gaussian row, whatever its norm)."""
    x = as_matrix(x, name="x", min_rows=1).detach().double()
    a = x.abs()
    return a.sum(1) ** 2 / (a**2).sum(1)


@dataclass
class BottleneckReport:
    """Per-row and per-layer results of :func:`find_bottlenecks` (formulas in the module docstring)."""
    layers: list[int]
    rows: list[dict]
    layer_stats: list[dict]
    kind: str
    loud_ratio: float
    massive_ratio: float
    critical_score: float
    variance_threshold: float
    d_model: int
    notes: list[str] = field(default_factory=list)
    out_of_sample: list[dict] = field(default_factory=list)   # one per flagged row (module docstring)

    def grid_records(self) -> list[dict]:
        """One dict per (layer, row): ``{layer, prompt, position, token, norm_ratio, spread, score,
        severity, massive}``."""
        return self.rows

    def per_layer_records(self) -> list[dict]:
        """``{layer, utilization_available, utilization_d_model, variance_rank, n_flagged}``."""
        return [{k: s[k] for k in ("layer", "utilization_available", "utilization_d_model",
                                   "variance_rank", "n_flagged")} for s in self.layer_stats]

    @property
    def utilization_slope(self) -> float | None:
        """Least-squares slope of ``utilization_d_model`` against layer index (growth with depth); None
        for one layer, or unless every layer has ``n - 1 >= d_model`` non-massive rows (below that the
        sample caps the rank and the width is not judgeable: :mod:`.convergence`)."""
        if len(self.layer_stats) < 2 or not all(width_rule(s["n_rows"] - s["excluded_massive"], self.d_model)["can_judge_width"] for s in self.layer_stats):
            return None
        x = np.array([s["layer"] for s in self.layer_stats], float)
        y = np.array([s["utilization_d_model"] for s in self.layer_stats], float)
        return float(np.polyfit(x, y, 1)[0])

    def counts(self) -> dict:
        """Number of (layer, row) records per severity."""
        c = {s: 0 for s in SEVERITIES}
        for r in self.rows:
            c[r["severity"]] += 1
        return c

    def flagged(self, severities=("warning", "critical")) -> list[dict]:
        """Records with one of ``severities``, highest score first."""
        return sorted((r for r in self.rows if r["severity"] in severities), key=lambda r: -r["score"])

    def confirmed(self, percentile: float = 0.95) -> list[dict]:
        """Out-of-sample records of flagged rows more spread than ``percentile`` of held-out typical
        rows and not massive at another layer."""
        return [r for r in self.out_of_sample if not r["massive_elsewhere"] and (r["percentile_heldout"] or 0) >= percentile]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "d_model": self.d_model,
                "out_of_sample": self.out_of_sample, "n_confirmed": len(self.confirmed()),
                "n_massive_elsewhere": sum(r["massive_elsewhere"] for r in self.out_of_sample),
                "thresholds": {"loud_ratio": self.loud_ratio, "massive_ratio": self.massive_ratio,
                               "critical_score": self.critical_score, "spread_min": 1.0,
                               "variance_threshold": self.variance_threshold},
                "counts": self.counts(), "utilization_slope": self.utilization_slope,
                "per_layer": self.per_layer_records(), "grid": self.rows, "notes": self.notes}


def _check_loud(loud_ratio) -> float:
    v = check_positive(loud_ratio, "loud_ratio")
    if v <= 1:
        raise BandwidthInputError(f"loud_ratio: must be > 1 (a multiple of the median norm), got {v}")
    return v


def _pr(x, mu, v) -> torch.Tensor:
    """``PR_i = (sum_k c_ik^2)^2 / sum_k c_ik^4`` with ``c_ik = (x_i - mu) . v_k`` (1 for a row at ``mu``)."""
    c2 = ((x - mu) @ v.T) ** 2
    t = c2.sum(1)
    return torch.where(t > 0, t**2 / (c2**2).sum(1).clamp_min(1e-300), torch.ones_like(t))


def layer_scores(x, loud_ratio: float = 2.0, layer=None) -> dict:
    """``norm_ratio``, ``PR``, ``spread`` and ``score`` of every row of one ``[positions, d_model]`` matrix.

    Returns a dict of 1-D float64 tensors plus ``typical`` (bool mask of the rows the PCA was fitted on).
    """
    loud_ratio = _check_loud(loud_ratio)
    x = as_matrix(x, name="residual_states", layer=layer, min_rows=3).detach().to("cpu", torch.float64)
    norms = x.norm(dim=1)
    med = norms.median()
    if not med > 0:
        raise BandwidthInputError(f"residual_states (layer {layer}): median row norm is 0")
    ratio = norms / med
    typical = ratio < loud_ratio     # loud_ratio > 1, so every row at or below the median: >= 2 rows
    mu, basis, variances = principal_directions(x[typical], layer=layer)
    v = basis[:, variances > 0].T    # the principal directions with variance, as rows
    if v.shape[0] == 0:
        raise BandwidthInputError(f"residual_states (layer {layer}): the typical rows are identical; "
                                  "no principal directions")
    pr = _pr(x, mu, v)
    spread = pr / pr[typical].median()
    return {"norm_ratio": ratio, "pr": pr, "spread": spread, "score": ratio * spread, "typical": typical}


def heldout_spread(x, loud_ratio: float = 2.0, n_splits: int = 8, seed: int = 0, layer=None) -> dict:
    """The spread of :func:`layer_scores`, measured out of sample on both sides of the comparison.

    For each of ``n_splits`` random halvings of the typical rows into a *fit* half A and a *reference*
    half B: fit the PCA (mean and directions) on A only, compute every row's ``PR_i`` in that basis,
    and divide by the median PR of B. Rows of B and loud rows are then both rows the fit did not see,
    so ``spread = 1`` means "as spread as a typical row the fit did not see". Returns float64 tensors
    over rows: ``spread`` (mean over the splits in which the row was not in A; NaN if never) and
    ``percentile`` (mean share of B's rows whose PR is below the row's); and the float ``bias`` =
    mean over splits of ``median PR(B) / median PR(A)``: how spread a held-out typical row looks when
    measured against the rows the basis was fitted on, as the in-sample comparison does (1 = no bias).
    """
    loud_ratio = _check_loud(loud_ratio)
    x = as_matrix(x, name="residual_states", layer=layer, min_rows=3).detach().to("cpu", torch.float64)
    ratio = x.norm(dim=1) / x.norm(dim=1).median()
    typical = torch.nonzero(ratio < loud_ratio).flatten()
    if len(typical) < 6:
        raise BandwidthInputError(f"residual_states (layer {layer}): {len(typical)} typical rows; a held-out "
                                  "split needs at least 6")
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    bias = []
    tot_spread, tot_pct, count = torch.zeros(3, n, dtype=torch.float64)
    for _ in range(n_splits):
        perm = typical[torch.randperm(len(typical), generator=g)]
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        mu = x[a].mean(0)
        _, sv, vh = torch.linalg.svd(x[a] - mu, full_matrices=False)   # [|A|, d]: cheaper than a d x d eigh
        pr = _pr(x, mu, vh[sv > 1e-9 * sv[0]])
        seen = torch.zeros(n, dtype=torch.bool)
        seen[a] = True
        ref = pr[b]
        bias.append(float(ref.median() / pr[a].median()))
        tot_spread[~seen] += pr[~seen] / ref.median()
        tot_pct[~seen] += (ref[None, :] < pr[~seen][:, None]).double().mean(1)
        count[~seen] += 1
    spread = torch.where(count > 0, tot_spread / count.clamp_min(1), torch.full_like(count, float("nan")))
    pct = torch.where(count > 0, tot_pct / count.clamp_min(1), torch.full_like(count, float("nan")))
    return {"spread": spread, "percentile": pct, "norm_ratio": ratio, "bias": float(np.mean(bias))}


def severity(norm_ratio: float, spread: float, loud_ratio: float = 2.0,
             massive_ratio: float = DEFAULT_MASSIVE_RATIO, critical_score: float = 4.0) -> str:
    """The severity rule of the module docstring for one row (``norm_ratio >= massive_ratio`` is
    :func:`.outliers.massive_mask` on a ratio already divided by the median)."""
    if norm_ratio >= massive_ratio:
        return "massive"
    if norm_ratio >= loud_ratio and spread >= 1.0:
        return "critical" if norm_ratio * spread >= critical_score else "warning"
    return "none"


def find_bottlenecks(states, kind: str = "resid_post", loud_ratio: float = 2.0,
                     massive_ratio: float = DEFAULT_MASSIVE_RATIO, critical_score: float = 4.0,
                     variance_threshold: float = 0.95, layers=None) -> BottleneckReport:
    """Score every (layer, position) of ``states`` and summarise each layer (module docstring).

    ``states``: a :class:`~residual_bandwidth.capture.ResidualCapture`, a hook-name mapping or a list
    of ``[positions, d_model]`` tensors (one per layer). ``kind`` picks the activations (default
    ``resid_post``); ``layers`` a subset of the captured layers.
    """
    loud_ratio = _check_loud(loud_ratio)
    massive_ratio = check_positive(massive_ratio, "massive_ratio")
    critical_score = check_positive(critical_score, "critical_score")
    variance_threshold = check_fraction(variance_threshold, "variance_threshold")
    if massive_ratio < loud_ratio:
        raise BandwidthInputError(f"massive_ratio ({massive_ratio}) must be >= loud_ratio ({loud_ratio})")
    cap = as_capture(states, kind)
    use = cap.layers if layers is None else list(layers)
    xs = {L: cap.get(kind, L) for L in use}     # a layer that was not captured is named before any work
    rows, stats, notes = [], [], []
    for L, x in xs.items():
        s = layer_scores(x, loud_ratio, layer=L)
        massive = massive_mask(x.to(torch.float64).norm(dim=1), massive_ratio)
        for i in range(len(x)):
            nr, sp = float(s["norm_ratio"][i]), float(s["spread"][i])
            sev = severity(nr, sp, loud_ratio, massive_ratio, critical_score)
            rows.append({"layer": L, "prompt": int(cap.prompt_index[i]), "position": int(cap.position[i]),
                         "token": cap.tokens[i], "norm_ratio": nr, "spread": sp, "score": nr * sp,
                         "severity": sev, "massive": bool(massive[i])})
        keep = ~massive
        if int(keep.sum()) < 2:
            raise BandwidthInputError(f"{hook_name(kind, L)}: fewer than 2 non-massive rows")
        m = compute_metrics(x[keep], center=True, variance_threshold=variance_threshold, layer=L,
                            name=hook_name(kind, L), excluded_positions=int((~keep).sum()))
        stats.append({"layer": L, "utilization_available": m.utilization_available,
                      "utilization_d_model": m.utilization_d_model, "variance_rank": m.variance_rank,
                      "n_flagged": sum(r["severity"] in ("warning", "critical") for r in rows[-len(x):]),
                      "n_rows": len(x), "excluded_massive": int((~keep).sum())})
    if cap.n_rows < cap.d_model:
        notes.append(f"{cap.n_rows} positions < d_model {cap.d_model}: principal directions and "
                     "utilization are limited by the sample; utilization_available uses min(n, d)")
    return BottleneckReport(layers=use, rows=rows, layer_stats=stats, kind=kind, loud_ratio=loud_ratio,
                            massive_ratio=massive_ratio, critical_score=critical_score,
                            variance_threshold=variance_threshold, d_model=cap.d_model, notes=notes,
                            out_of_sample=_out_of_sample(cap, kind, loud_ratio, rows, notes))


def _out_of_sample(cap, kind, loud_ratio, rows, notes) -> list[dict]:
    """The out-of-sample record of every flagged row (module docstring): one :func:`heldout_spread`
    per layer with flags; ``None`` values where the layer has too few typical rows to split."""
    index = {(int(p), int(q)): i for i, (p, q) in enumerate(zip(cap.prompt_index, cap.position))}
    massive_at = {(r["prompt"], r["position"], r["layer"]) for r in rows if r["massive"]}
    out, held = [], {}
    for r in (r for r in rows if r["severity"] in ("warning", "critical")):
        L, i = r["layer"], index[(r["prompt"], r["position"])]
        if L not in held:
            try:
                held[L] = heldout_spread(cap.get(kind, L), loud_ratio, layer=L)
            except BandwidthInputError as e:
                held[L] = None
                notes.append(f"flags at layer {L} not checked out of sample: {e}")
        hs = held[L]
        out.append({**{k: r[k] for k in ("layer", "prompt", "position", "token", "norm_ratio", "spread")},
                    **{key: None if hs is None else float(hs[name][i]) for key, name in
                       (("spread_heldout", "spread"), ("percentile_heldout", "percentile"))},
                    "bias": None if hs is None else hs["bias"],
                    "massive_elsewhere": any((r["prompt"], r["position"], m) in massive_at for m in cap.layers if m != L)})
    return out
