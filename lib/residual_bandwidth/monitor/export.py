"""What the bandwidth monitor writes out: exporters (:class:`JsonLinesLog`, :class:`PrometheusExporter`:
per request and, at scrape time, over all traffic) and plain-sentence :func:`recommendations`.

An exporter is any object with ``on_request(record, alerts)``, ``on_error(where, exc, timestamp)``
and ``close()``; the monitor calls them after each request, outside its lock."""
from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import numpy as np

from ..validation import BandwidthInputError
from .alerts import LEVELS, AlertRecord
from .measure import RequestRecord


logger = logging.getLogger("residual_bandwidth.monitor")


def _json_safe(obj):
    """A copy JSON can write without NaN/Inf (non-finite floats become ``null``, numpy scalars Python's)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    obj = obj.item() if isinstance(obj, (np.floating, np.integer)) else obj
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def recommendations(summaries: list[dict], totals: dict, config, curve=None) -> list[str]:
    """Plain sentences stating what was measured, per watched layer (nothing invented).

    ``summaries``/``totals``: :meth:`BandwidthMonitor.traffic_summary` and ``totals()``; ``config``:
    its :class:`~.measure.MonitorConfig`. ``curve``: an object with ``records()`` ->
    ``[{layer, k, subspace, loss, kl, delta_loss}]``, ``base_loss``, ``tolerance`` and
    ``smallest_k: {layer: k or None}``; its measured cost of compressing a layer is quoted.
    """
    p = round(100 * config.variance_threshold)
    out = []
    if totals["requests_bad"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(totals["bad_reasons"].items()))
        out.append(f"{totals['requests_bad']} of {totals['requests']} requests were rejected as bad input "
                   f"({reasons}); they are in no statistic.")
    curve_recs = _curve_records(curve)
    for s in summaries:
        L = s["layer"]
        if s["variance_rank"] is None:
            out.append(f"layer {L}: {s['n']} sampled position(s) so far; not enough for a spectrum.")
            continue
        sampled = (f"at most {config.max_positions} sampled positions per request"
                   if config.max_positions is not None else "all positions")
        excl = ", massive rows left out" if config.exclude_massive and s["massive_tokens"] else ""
        text = (f"layer {L}: {p} % of traffic variance in {s['variance_rank']} of {s['d_model']} "
                f"directions (participation ratio {s['participation_ratio']:.1f}, stable rank "
                f"{s['stable_rank']:.2f}; {s['n']:,} positions from {s['requests']:,} requests, "
                f"{sampled}{excl}).")
        if s["massive_tokens"]:
            text += (f" {s['massive_tokens']:,} of {s['tokens']:,} tokens ({100 * s['massive_tokens'] / s['tokens']:.1f} %) "
                     f"had a norm >= {config.massive_ratio:g}x the reference norm (min of the request's median and "
                     f"the layer's typical norm; largest ratio {s['max_norm_ratio']:.0f}x); "
                     f"{s['massive_first_tokens']:,} of them were the first token of their sequence.")
        if not s["can_judge_width"]:
            text += (f" These {s['n']:,} positions span at most {s['n'] - 1:,} directions, so this rank "
                     f"describes the sample, not the width of {s['d_model']}: judging the width needs "
                     f"at least {s['positions_needed']:,} positions ({s['positions_missing']:,} more).")
        if curve is not None:
            text += " " + _curve_sentence(curve, curve_recs.get(L, []), L)
        out.append(text)
    return out


def _curve_records(curve) -> dict[int, list[dict]]:
    by_layer: dict[int, list[dict]] = {}
    for r in curve.records() if curve is not None else []:
        by_layer.setdefault(int(r["layer"]), []).append(r)
    return by_layer

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
            f"the smallest k whose held-out average is within tolerance{tol_txt}; check its interval).")


class JsonLinesLog:
    """The monitor's JSON-lines log: one object per line (``event``: ``request``, ``alert`` or
    ``internal_error``). ``target``: a path (appended to) or a writable text stream;
    ``requests=False`` writes only alerts, bad requests and internal errors."""

    def __init__(self, target, requests: bool = True):
        self.requests = bool(requests)
        self._lock = threading.Lock()
        self._owned = isinstance(target, (str, Path))
        if self._owned:
            self.stream = open(target, "a", encoding="utf-8", buffering=1)
        elif hasattr(target, "write"):
            self.stream = target
        else:
            raise BandwidthInputError(f"log: expected a path or a writable stream, got {type(target).__name__}")

    def write(self, obj: dict) -> None:
        if self.stream is None:
            return
        line = json.dumps(_json_safe(obj), allow_nan=False)
        try:
            with self._lock:
                self.stream.write(line + "\n")
        except Exception:  # a full disk must not stop serving
            logger.exception("bandwidth monitor: could not write the log")

    def on_request(self, record: RequestRecord, alerts: list[AlertRecord]) -> None:
        if record.status == "bad" or self.requests:
            self.write({"event": "request", **record.to_dict()})
        for a in alerts:
            self.write({"event": "alert", **a.to_dict(), "message": a.message})

    def on_error(self, where: str, exc: Exception, timestamp: float) -> None:
        self.write({"event": "internal_error", "where": where, "error": repr(exc), "timestamp": timestamp})

    def close(self) -> None:
        """Close the file when this log opened it (a stream passed in stays open)."""
        if self._owned and self.stream is not None:
            with self._lock:
                self.stream.close()
            self.stream = None


class PrometheusExporter:
    """Prometheus metrics of a monitor: counters and histograms per request and, at scrape time, the
    all-traffic statistics (``summaries``: a callable returning ``traffic_summary()``, set by the
    monitor). ``registry``: a ``prometheus_client.CollectorRegistry`` (a private one by default);
    ``namespace`` prefixes every metric name; ``model_name`` goes into the info metric."""

    def __init__(self, registry=None, namespace: str = "residual_bandwidth", model_name: str | None = None):
        from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram, Info
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.namespace, self.model_name, self.summaries = ns, model_name, None
        self._requests = PCounter(f"{ns}_requests", "Requests seen, by status (ok or bad input)", ["status"], registry=r)
        self._bad = PCounter(f"{ns}_bad_requests", "Bad requests by reason", ["reason"], registry=r)
        self._internal_errors = PCounter(f"{ns}_internal_errors", "Errors inside the monitor (requests were still served)", registry=r)
        self._tokens = PCounter(f"{ns}_tokens", "Real (unpadded) tokens seen per layer", ["layer"], registry=r)
        self._massive = PCounter(f"{ns}_massive_activations", "Tokens with norm >= massive_ratio x request median", ["layer"], registry=r)
        self._last = {m: Gauge(f"{ns}_last_{m}", f"{m} of the last good request (NaN: too short to measure)",
                               ["layer"], registry=r)
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
        self._server = self._server_thread = None
        r.register(_TrafficCollector(self))

    def describe(self, info: dict) -> None:
        """Set the info metric (model, kind, d_model, layers, ...) when the monitor attaches."""
        self._info.info({k: str(v) for k, v in info.items()})

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

    def on_request(self, record: RequestRecord, alerts: list[AlertRecord]) -> None:
        self._requests.labels(status=record.status).inc()
        for reason in record.reasons:
            self._bad.labels(reason=reason).inc()
        for L, lr in record.layers.items():
            ch = self._layer_children(L)
            ch["tokens"].inc(lr.n_tokens)
            if lr.massive_count:
                ch["massive"].inc(lr.massive_count)
            for m, g in ch["last"].items():   # NaN, not the previous request's value, when not measured
                g.set(math.nan if getattr(lr, m) is None else getattr(lr, m))
            if lr.participation_ratio is not None:
                ch["pr"].observe(lr.participation_ratio)
            ch["ratio"].observe(lr.max_norm_ratio)
        for a in alerts:
            lab = "all" if a.layer is None else str(a.layer)
            self._alerts_total.labels(layer=lab, metric=a.metric, level=a.level).inc()
            self._alert_level.labels(layer=lab, metric=a.metric).set(
                0 if a.level == "resolved" else LEVELS.index(a.level))

    def text(self) -> str:
        """The Prometheus text exposition of this monitor's registry."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry).decode("utf-8")

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` (loopback by default; 0 = a free port).

        Returns the bound port. :meth:`stop_server` (or the monitor's ``close()``) shuts it down.
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

    def on_error(self, where: str, exc: Exception, timestamp: float) -> None:
        self._internal_errors.inc()

    def observe_processing(self, seconds: float) -> None:
        self._processing.observe(seconds)

    def close(self) -> None:
        self.stop_server()


def _pct(rec: dict, base: float) -> str:
    if base and math.isfinite(base):
        return f"{100 * (float(rec['loss']) - base) / base:+.1f} %"
    return f"{float(rec['delta_loss']):+.4f} (absolute)"


class _TrafficCollector:
    """Prometheus collector for the streaming (all-traffic) statistics, computed at scrape time."""

    def __init__(self, exporter: PrometheusExporter):
        self.exporter = exporter

    #: summary key -> (metric name after ``<namespace>_traffic_``, help text)
    FAMILIES = {"n": ("rows", "Positions in the streaming covariance"),
                "variance_rank": ("variance_rank", "Directions holding p of all traffic variance"),
                "participation_ratio": ("participation_ratio", "(sum lambda)^2 / sum lambda^2 of all traffic"),
                "stable_rank": ("stable_rank", "sum lambda / lambda_max of all traffic"),
                "utilization_d_model": ("utilization_d_model", "variance rank / d_model of all traffic"),
                "mean_norm": ("mean_norm", "Mean token norm over all traffic")}

    def _families(self):
        from prometheus_client.core import GaugeMetricFamily
        ns = self.exporter.namespace
        return {key: GaugeMetricFamily(f"{ns}_traffic_{name}", text, labels=["layer"])
                for key, (name, text) in self.FAMILIES.items()}

    def describe(self):
        return list(self._families().values())

    def collect(self):
        fams = self._families()
        try:
            summaries = self.exporter.summaries() if self.exporter.summaries else []
        except Exception:  # a scrape must not fail because of one layer
            logger.exception("bandwidth monitor: traffic summary failed during a scrape")
            summaries = []
        for s in summaries:
            for key, fam in fams.items():
                v = s.get(key)
                if v is not None:
                    fam.add_metric([str(s["layer"])], float(v))
        return list(fams.values())
