"""What the bandwidth monitor writes out: the JSON-lines log, Prometheus metrics (per request and,
at scrape time, over all traffic) and plain-sentence recommendations."""
from __future__ import annotations

import json
import logging
import math

from typing import TYPE_CHECKING

import numpy as np

from ..validation import BandwidthInputError
from .alerts import LEVELS, AlertRecord

if TYPE_CHECKING:
    from .core import BandwidthMonitor, RequestRecord

logger = logging.getLogger("residual_bandwidth.monitor")


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    return _finite_or_none(obj)


class ExportMixin:
    """Log, Prometheus and recommendation methods of :class:`~residual_bandwidth.monitor.BandwidthMonitor`."""

    # ---- recommendations -------------------------------------------------------------------
    def recommendations(self, curve=None) -> list[str]:
        """Plain sentences stating what was measured, per watched layer (nothing invented).

        ``curve`` (or the monitor's ``compression_curve``): an object with ``records()`` ->
        ``[{layer, k, subspace, loss, kl, delta_loss}]``, ``base_loss``, ``tolerance`` and
        ``smallest_k: {layer: k or None}``; its measured cost of compressing a layer is quoted.
        """
        curve = curve if curve is not None else self.compression_curve
        p = round(100 * self.variance_threshold)
        out = []
        tot = self.totals()
        if tot["requests_bad"]:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(tot["bad_reasons"].items()))
            out.append(f"{tot['requests_bad']} of {tot['requests']} requests were rejected as bad input "
                       f"({reasons}); they are in no statistic.")
        curve_recs = self._curve_records(curve)
        for s in self.traffic_summary():
            L = s["layer"]
            if s["variance_rank"] is None:
                out.append(f"layer {L}: {s['n']} sampled position(s) so far; not enough for a spectrum.")
                continue
            sampled = (f"at most {self.max_positions} sampled positions per request"
                       if self.max_positions is not None else "all positions")
            excl = (f", massive-activation rows left out" if self.exclude_massive and s["massive_tokens"] else "")
            text = (f"layer {L}: {p} % of traffic variance in {s['variance_rank']} of {s['d_model']} "
                    f"directions (participation ratio {s['participation_ratio']:.1f}, stable rank "
                    f"{s['stable_rank']:.2f}; {s['n']:,} positions from {s['requests']:,} requests, "
                    f"{sampled}{excl}).")
            if s["massive_tokens"]:
                text += (f" {s['massive_tokens']:,} of {s['tokens']:,} tokens "
                         f"({100 * s['massive_tokens'] / s['tokens']:.1f} %) had a norm >= "
                         f"{self.massive_ratio:g}x the reference norm (min of the request's median and the "
                         f"layer's typical norm; largest ratio "
                         f"{s['max_norm_ratio']:.0f}x); {s['massive_first_tokens']:,} of them were the "
                         f"first token of their sequence.")
            if not s["can_judge_width"]:
                text += (f" These {s['n']:,} positions span at most {s['n'] - 1:,} directions, so this rank "
                         f"describes the sample, not the width of {s['d_model']}: judging the width needs "
                         f"at least {s['positions_needed']:,} positions ({s['positions_missing']:,} more).")
            if curve is not None:
                text += " " + self._curve_sentence(curve, curve_recs.get(L, []), L)
            out.append(text)
        return out

    @staticmethod
    def _curve_records(curve) -> dict[int, list[dict]]:
        if curve is None:
            return {}
        by_layer: dict[int, list[dict]] = {}
        for r in curve.records():
            by_layer.setdefault(int(r["layer"]), []).append(r)
        return by_layer

    @staticmethod
    def _curve_sentence(curve, recs: list[dict], layer: int) -> str:
        if not recs:
            return "The compression curve has no measurement for this layer."
        principal = [r for r in recs if r.get("subspace") == "pca"]
        recs = principal or recs  # smallest_k is about the principal subspace, not random baselines
        smallest = (getattr(curve, "smallest_k", None) or {}).get(layer)
        base = float(curve.base_loss)
        tol = getattr(curve, "tolerance", None)
        tol_txt = f" (delta loss <= {tol:g})" if isinstance(tol, (int, float)) else ""
        if smallest is None:
            best = min(recs, key=lambda r: r["delta_loss"])
            return (f"Compression curve: no tested k stays within tolerance{tol_txt}; the best, "
                    f"k = {best['k']}, costs {_pct(best, base)} loss (delta {best['delta_loss']:+.4f}, "
                    f"KL {best['kl']:.4f}).")
        at_k = [r for r in recs if int(r["k"]) == int(smallest)]
        if not at_k:
            return f"Compression curve says k = {smallest} is the smallest within tolerance{tol_txt}."
        r = min(at_k, key=lambda r: r["delta_loss"])
        return (f"Compression curve says k = {smallest} costs {_pct(r, base)} loss "
                f"(delta {r['delta_loss']:+.4f}, KL {r['kl']:.4f}, {r['subspace']} subspace; "
                f"the smallest k within tolerance{tol_txt}).")

    # ---- logging ---------------------------------------------------------------------------
    def _write_log(self, obj: dict) -> None:
        if self._log is None:
            return
        line = json.dumps(_json_safe(obj), allow_nan=False)
        try:
            with self._log_lock:
                self._log.write(line + "\n")
        except Exception:  # a full disk must not stop serving
            logger.exception("bandwidth monitor: could not write the log")

    # ---- Prometheus ------------------------------------------------------------------------
    def _init_prometheus(self, registry, ns: str) -> None:
        from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram, Info
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, self.namespace = self.registry, ns
        self._requests = PCounter(f"{ns}_requests", "Requests seen, by status (ok or bad input)", ["status"], registry=r)
        self._bad = PCounter(f"{ns}_bad_requests", "Bad requests by reason", ["reason"], registry=r)
        self._internal_errors = PCounter(f"{ns}_internal_errors", "Errors inside the monitor (requests were still served)", registry=r)
        self._tokens = PCounter(f"{ns}_tokens", "Real (unpadded) tokens seen per layer", ["layer"], registry=r)
        self._massive = PCounter(f"{ns}_massive_activations", "Tokens with norm >= massive_ratio x request median", ["layer"], registry=r)
        self._last = {m: Gauge(f"{ns}_last_{m}", f"{m} of the last good request", ["layer"], registry=r)
                      for m in ("mean_norm", "max_norm_ratio", "massive_fraction", "massive_other_fraction",
                                "participation_ratio", "variance_rank")}
        exp_buckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
        self._h_pr = Histogram(f"{ns}_request_participation_ratio", "Per-request participation ratio (sum lambda)^2/sum lambda^2",
                               ["layer"], buckets=exp_buckets, registry=r)
        self._h_ratio = Histogram(f"{ns}_request_max_norm_ratio", "Per-request max/median token norm",
                                  ["layer"], buckets=exp_buckets, registry=r)
        self._alerts_total = PCounter(f"{ns}_alerts", "Alert state changes", ["layer", "metric", "level"], registry=r)
        self._alert_level = Gauge(f"{ns}_alert_level", "Current alert state (0 ok, 1 warning, 2 critical)",
                                  ["layer", "metric"], registry=r)
        self._processing = Histogram(f"{ns}_processing_seconds", "Time spent in the monitor per request, after the forward pass",
                                     buckets=[1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25],
                                     registry=r)
        self._children: dict[int, dict] = {}
        self._info = Info(f"{ns}_monitor", "Monitor configuration", registry=r)
        r.register(_TrafficCollector(self))

    def _layer_children(self, L: int) -> dict:
        """The per-layer Prometheus children, looked up once (``labels()`` takes a lock each call)."""
        ch = self._children.get(L)
        if ch is None:
            lab = str(L)
            ch = {"tokens": self._tokens.labels(layer=lab), "massive": self._massive.labels(layer=lab),
                  "pr": self._h_pr.labels(layer=lab), "ratio": self._h_ratio.labels(layer=lab),
                  "last": {m: g.labels(layer=lab) for m, g in self._last.items()}}
            self._children[L] = ch
        return ch

    def _export(self, record: RequestRecord, alerts: list[AlertRecord]) -> None:
        self._requests.labels(status=record.status).inc()
        for reason in record.reasons:
            self._bad.labels(reason=reason).inc()
        for L, lr in record.layers.items():
            ch = self._layer_children(L)
            ch["tokens"].inc(lr.n_tokens)
            if lr.massive_count:
                ch["massive"].inc(lr.massive_count)
            for m, g in ch["last"].items():
                v = getattr(lr, m)
                if v is not None:
                    g.set(v)
            if lr.participation_ratio is not None:
                ch["pr"].observe(lr.participation_ratio)
            ch["ratio"].observe(lr.max_norm_ratio)
        for a in alerts:
            lab = "all" if a.layer is None else str(a.layer)
            self._alerts_total.labels(layer=lab, metric=a.metric, level=a.level).inc()
            self._alert_level.labels(layer=lab, metric=a.metric).set(
                0 if a.level == "resolved" else LEVELS.index(a.level))

    def prometheus_text(self) -> str:
        """The Prometheus text exposition of this monitor's registry."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode("utf-8")

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` (loopback by default; 0 = a free port).

        Returns the bound port. :meth:`stop_server` (or :meth:`close`) shuts it down.
        """
        from prometheus_client import start_http_server
        if self._server is not None:
            raise BandwidthInputError("serve: already serving; stop_server() first")
        self._server, self._server_thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def stop_server(self) -> None:
        """Stop the HTTP server started by :meth:`serve` (no-op when none)."""
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


def _pct(rec: dict, base: float) -> str:
    if base and math.isfinite(base):
        return f"{100 * (float(rec['loss']) - base) / base:+.1f} %"
    return f"{float(rec['delta_loss']):+.4f} (absolute)"


class _TrafficCollector:
    """Prometheus collector for the streaming (all-traffic) statistics, computed at scrape time."""

    def __init__(self, monitor: BandwidthMonitor):
        self.monitor = monitor

    def _families(self):
        from prometheus_client.core import GaugeMetricFamily
        ns = self.monitor.namespace
        fams = {
            "n": GaugeMetricFamily(f"{ns}_traffic_rows", "Positions in the streaming covariance", labels=["layer"]),
            "variance_rank": GaugeMetricFamily(
                f"{ns}_traffic_variance_rank", "Directions holding p of all traffic variance", labels=["layer"]),
            "participation_ratio": GaugeMetricFamily(
                f"{ns}_traffic_participation_ratio", "(sum lambda)^2 / sum lambda^2 of all traffic", labels=["layer"]),
            "stable_rank": GaugeMetricFamily(
                f"{ns}_traffic_stable_rank", "sum lambda / lambda_max of all traffic", labels=["layer"]),
            "utilization_d_model": GaugeMetricFamily(
                f"{ns}_traffic_utilization_d_model", "variance rank / d_model of all traffic", labels=["layer"]),
            "mean_norm": GaugeMetricFamily(
                f"{ns}_traffic_mean_norm", "Mean token norm over all traffic", labels=["layer"]),
        }
        return fams

    def describe(self):
        return list(self._families().values())

    def collect(self):
        fams = self._families()
        try:
            summaries = self.monitor.traffic_summary()
        except Exception:  # a scrape must not fail because of one layer
            logger.exception("bandwidth monitor: traffic summary failed during a scrape")
            summaries = []
        for s in summaries:
            for key, fam in fams.items():
                v = s.get(key)
                if v is not None:
                    fam.add_metric([str(s["layer"])], float(v))
        return list(fams.values())
