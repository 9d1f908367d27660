"""Per-layer bandwidth of a captured residual stream (the lesson's LO1 measurements).

``ResidualBandwidthAnalyzer`` keeps the seed lesson's name and its ``analyze_effective_bandwidth``
entry point, with the corrected metrics of :mod:`residual_bandwidth.metrics`. What changed:

* variance is sigma^2 and the data are centred (seed: cumulative sigma, uncentred);
* utilization is reported against ``min(n, d)`` and against ``d_model``, labelled;
* the seed's basis-aligned "subspace distribution" (coordinates 0:115 = "token content", ...) is
  gone: the residual stream has no privileged basis, so a coordinate slice means nothing;
* the seed's "bottleneck severity" and "memory pressure" (coefficient of variation of sigma) were
  unmeasured heuristics and are not computed;
* massive-activation positions are reported, and left out of spectra when ``exclude_massive``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import as_capture, hook_name
from .metrics import BandwidthMetrics, compute_metrics
from .outliers import (DEFAULT_MASSIVE_RATIO, MassiveActivation, OutlierDimension, massive_rows,
                       outlier_dimensions)
from .validation import BandwidthInputError, check_fraction, check_positive


@dataclass
class BandwidthReport:
    """Per-layer metrics with all positions and with massive-activation positions left out."""
    kind: str
    layers: list[int]
    all_positions: list[BandwidthMetrics]
    without_massive: list[BandwidthMetrics]
    massive: list[MassiveActivation]
    outlier_dims: list[OutlierDimension]
    excluded_rows: list[int]
    variance_threshold: float
    n_rows: int
    d_model: int
    notes: list[str] = field(default_factory=list)

    def massive_positions(self) -> list[tuple[int, int, str]]:
        """Distinct ``(prompt, position, token)`` that are massive at some layer."""
        return sorted({(m.prompt, m.position, m.token) for m in self.massive})

    def table(self) -> str:
        """Plain-text table, one row per layer (the same numbers as :meth:`to_dict`)."""
        p = round(100 * self.variance_threshold)
        head = (f"{'layer':>5} {f'r{p}':>5} {f'r{p}*':>6} {'PR*':>7} {'stable*':>8} {'entropy*':>9} "
                f"{'util/min(n,d)*':>15} {'util/d*':>8} {'anisotropy':>10} {'max norm/median':>15}")
        lines = [head]
        by_layer = {}
        for m in self.massive:
            by_layer[m.layer] = max(by_layer.get(m.layer, 0.0), m.ratio)
        for a, c in zip(self.all_positions, self.without_massive):
            lines.append(
                f"{a.layer:>5} {a.variance_rank:>5} {c.variance_rank:>6} {c.participation_ratio:>7.1f} "
                f"{c.stable_rank:>8.2f} {c.entropy_rank:>9.1f} {c.utilization_available:>15.1%} "
                f"{c.utilization_d_model:>8.1%} {c.anisotropy:>10.3f} "
                f"{by_layer.get(a.layer, float('nan')):>15.1f}")
        lines.append(f"r{p}: components holding {p}% of the variance, all {self.n_rows} positions; "
                     f"* = without the {len(self.excluded_rows)} massive row(s) (norm at or above the massive ratio x the median). "
                     f"d_model = {self.d_model}.")
        return "\n".join(lines)

    def to_dict(self, with_spectra: bool = True) -> dict:
        return {
            "kind": self.kind, "layers": self.layers, "n_rows": self.n_rows, "d_model": self.d_model,
            "variance_threshold": self.variance_threshold,
            "all_positions": [m.to_dict(with_spectra) for m in self.all_positions],
            "without_massive": [m.to_dict(with_spectra) for m in self.without_massive],
            "massive_activations": [m.to_dict() for m in self.massive],
            "massive_positions": [{"prompt": p, "position": q, "token": t}
                                  for p, q, t in self.massive_positions()],
            "outlier_dimensions": [o.to_dict() for o in self.outlier_dims],
            "excluded_rows": self.excluded_rows, "notes": self.notes,
        }


class ResidualBandwidthAnalyzer:
    """Measure residual-stream bandwidth layer by layer.

    Args:
        variance_threshold: ``p`` of the variance-threshold rank (default 0.95).
        center: remove the mean residual vector before the spectrum (default True; the mean
            direction is a constant offset, not a channel that carries token information).
        massive_ratio: a position is a massive activation at a layer when its norm is at least
            this many times the layer's median norm (default 4).
        exclude_massive: leave massive positions out of the spectra reported as "without_massive"
            and of the pooled metrics. A position flagged at *any* layer is removed from *every*
            layer, so all layers are measured on the same tokens.
        precision: ``"float64"`` (default) or ``"float32"``: of the covariance products, their
            eigenvalues and the row norms behind ``mean_norm`` and ``anisotropy`` (see
            :func:`residual_bandwidth.metrics.compute_metrics`).
    """

    def __init__(self, variance_threshold: float = 0.95, center: bool = True,
                 massive_ratio: float = DEFAULT_MASSIVE_RATIO, exclude_massive: bool = True,
                 precision: str = "float64"):
        self.variance_threshold = check_fraction(variance_threshold, "variance_threshold")
        self.precision = precision
        if precision not in ("float64", "float32"):
            raise BandwidthInputError(f"precision: expected 'float64' or 'float32', got {precision!r}")
        self.center = bool(center)
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        self.exclude_massive = bool(exclude_massive)

    def find_massive_activations(self, states, kind: str = "resid_post") -> list[MassiveActivation]:
        """Massive rows of every captured layer of ``kind`` (see :mod:`.outliers`)."""
        cap = as_capture(states, kind)
        found = []
        for layer, x in zip(cap.layers, cap.layer_stack(kind)):
            found += massive_rows(x, self.massive_ratio, layer=layer, prompt_index=cap.prompt_index,
                                  position=cap.position, tokens=cap.tokens, name=hook_name(kind, layer),
                                  check=not cap.checked)
        return found

    def massive_mask(self, states, kind: str = "resid_post", massive: list[MassiveActivation] | None = None
                     ) -> torch.Tensor:
        """Boolean ``[N]``: rows that are massive at one or more layers (of ``massive`` when given)."""
        cap = as_capture(states, kind)
        mask = torch.zeros(cap.n_rows, dtype=torch.bool)
        mask[[m.row for m in (self.find_massive_activations(cap, kind) if massive is None else massive)]] = True
        return mask

    def analyze_layers(self, states, kind: str = "resid_post") -> BandwidthReport:
        """Per-layer metrics of ``kind`` for a capture, a hook-name mapping or a list of tensors."""
        cap = as_capture(states, kind)
        massive = self.find_massive_activations(cap, kind)
        mask = self.massive_mask(cap, kind, massive)
        keep = ~mask if self.exclude_massive else torch.ones_like(mask)
        if int(keep.sum()) < 2:
            raise BandwidthInputError(f"after excluding {int(mask.sum())} massive position(s) fewer "
                                      "than 2 positions remain; pass more text or exclude_massive=False")
        all_m, clean_m, dims = [], [], []
        full = bool(keep.all())
        for layer, x in zip(cap.layers, cap.layer_stack(kind)):
            name = hook_name(kind, layer)
            trust = dict(precision=self.precision, check=not cap.checked)
            all_m.append(compute_metrics(x, self.center, self.variance_threshold, layer, name, **trust))
            clean_m.append(compute_metrics(x if full else x[keep], self.center, self.variance_threshold,
                                           layer, name, excluded_positions=int((~keep).sum()), **trust))
            dims += outlier_dimensions(x, exclude_rows=mask, layer=layer, name=name, check=not cap.checked)
        notes = ["exclude_massive=False: 'without_massive' equals 'all_positions'"] if mask.any() and not self.exclude_massive else []
        return BandwidthReport(kind=kind, layers=list(cap.layers), all_positions=all_m,
                               without_massive=clean_m, massive=massive, outlier_dims=dims,
                               excluded_rows=torch.nonzero(~keep).flatten().tolist(),
                               variance_threshold=self.variance_threshold, n_rows=cap.n_rows,
                               d_model=cap.d_model, notes=notes)

    def analyze_effective_bandwidth(self, states, kind: str = "resid_post") -> BandwidthMetrics:
        """The seed's entry point: one set of metrics for all layers pooled into one matrix.

        Pooling stacks every layer's rows, so the spectrum also contains how the stream drifts
        with depth; :meth:`analyze_layers` is the per-layer view. Massive positions are left out
        when ``exclude_massive``.
        """
        cap = as_capture(states, kind)
        keep = ~self.massive_mask(cap, kind) if self.exclude_massive else torch.ones(cap.n_rows, dtype=torch.bool)
        if int(keep.sum()) < 1:
            raise BandwidthInputError("every position is a massive row (norm >= massive_ratio x the median); nothing left to pool")
        pooled = torch.cat(cap.layer_stack(kind, rows=keep))
        return compute_metrics(pooled, self.center,
                               self.variance_threshold, layer="all", name="residual_states (pooled)",
                               excluded_positions=int((~keep).sum()), precision=self.precision,
                               check=not cap.checked)
