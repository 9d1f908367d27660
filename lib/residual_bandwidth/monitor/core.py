"""Watch the residual stream of a model while it serves requests. :class:`BandwidthMonitor` is small:
it owns the hooks, one lock and the request history, and composes three parts: the measurement
(:mod:`.measure`: per-request records and the streaming statistics), the alert policy
(:mod:`.alerts`) and the exporters (:mod:`.export`: a JSON-lines log, Prometheus metrics).

The seed lesson's ``ProductionBandwidthMonitor`` re-analysed stored states per batch and printed
advice built on invented latency multipliers. This one measures, and says only what it measured.

How it works
============
``BandwidthMonitor(model).attach()`` (or ``with BandwidthMonitor(model) as mon:``) registers:

* a forward **pre**-hook on ``model`` itself: it opens a *request* (one call of ``model(...)``, e.g.
  one batch, or one step of ``generate``) in a thread-local buffer and reads the attention mask from
  the call's arguments (``attention_mask=`` keyword, or the 2nd positional argument);
* one forward hook per watched layer (``resid_post`` = the block's output by default; ``kind`` may
  be any of :data:`residual_bandwidth.capture.KINDS`, found with the same architecture adapters
  as :func:`~residual_bandwidth.capture.capture_residuals`): it copies that layer's real-token rows
  into the thread's buffer;
* a forward hook on ``model`` with ``always_call=True``: it closes the request and processes it
  (also when the forward raised, so no half request is left behind).

Every hook returns ``None`` (the model's output is never changed) and catches its own errors (a
monitor bug is counted as ``internal_errors`` and logged; the request still gets its answer).

Padding. With a 2-D ``attention_mask`` ``[batch, S]`` and hidden states ``[batch, T, d]`` the real
rows are ``h[mask[:, -T:] == 1]``: the last ``T`` mask columns belong to the tokens of this call (with a
KV cache the mask also covers the past). Left and right padding both work. Without a usable mask
(none given, or a 4-D mask) every position is counted and the request record says ``masked=False``.

Threads. Hooks run in the thread that called the model, so each thread has its own request buffer
(``threading.local``); requests from concurrent threads never mix. The shared state (streaming
statistics, counters, history, alert state) is updated under one lock, so concurrent use gives the
same totals as sequential use (the streaming mean/covariance up to float round-off, because
Chan's merge is exact algebra in any order). One caveat: which tokens count as *massive* depends
on the typical norm of *earlier* traffic (below), so at the margin that classification, and with
``exclude_massive`` the rows that enter the statistics, can depend on the order requests finish.

Per request and watched layer ``L`` (rows ``x_i``, ``i = 1..n`` = the request's real tokens)
===========================================================================================
* ``mean_norm = (1/n) sum ||x_i||``, ``median_norm``, ``max_norm`` and
  ``max_norm_ratio = max_i ||x_i|| / m`` (the reference norm ``m`` of the next item).
* massive activations: ``||x_i|| >= massive_ratio * m`` (``massive_ratio = 4``, as in
  :mod:`residual_bandwidth.outliers`) with the reference norm ``m = min(median_k ||x_k||, t)``, where
  ``t`` is the layer's *typical traffic norm* (running mean norm of the non-massive rows of all
  earlier requests; until there is one, ``m`` is the request's median). The request's own median
  alone fails on short or repetitive requests: SmolLM2 turns a lone first token, and every token of
  "!!!!!!!!", into a ~22,900-norm sink, so the request's median *is* a sink (typical norms: ~200).
  ``massive_count`` and ``massive_fraction = count / n``.
  Many models park a massive activation on the *first* token of every sequence (an attention sink;
  SmolLM2: ~100x the median norm at layers 12-28), so every short request has one.
  ``massive_first`` counts massive rows that are the first real token of their sequence (known from
  the attention mask: the column where the mask's running sum reaches 1; without a mask, column 0)
  and ``massive_other_fraction = (massive_count - massive_first) / n`` measures the unexpected ones,
  for requests of at least ``min_tokens_for_share`` tokens (``None`` below: a 2-token request with one
  loud token would read 50 %, a count of one, not a rate; no alert changes state on it).
* rank rows: the non-massive rows (``exclude_massive=True``; SmolLM2's position-0 vector is ~100x
  louder and would collapse every spectrum to rank 1), then at most ``max_positions`` of them
  drawn at random (seeded by the request number, so reruns are reproducible).
* when there are at least ``min_tokens_for_rank`` rank rows: the centred spectrum
  ``lambda = eig(Xc Xc^T)`` and from it ``variance_rank`` r_p (smallest k with
  ``sum_{i<=k} lambda_i / sum lambda >= p``), ``participation_ratio = (sum lambda)^2 / sum lambda^2``,
  ``stable_rank = sum lambda / lambda_max``, ``entropy_rank`` (Roy & Vetterli), and
  ``utilization_available = r_p / min(n, d)`` and ``utilization_d_model = r_p / d``. A short request
  cannot have a high rank (``r_p <= n - 1``): this is why the *traffic* statistics below matter.
* the rank rows update the layer's :class:`~residual_bandwidth.streaming.StreamingMoments`
  (running mean and ``M2 = Xc^T Xc`` over all traffic so far, float64, constant memory). Its
  eigenvalues are computed lazily: only when :meth:`BandwidthMonitor.traffic_summary`,
  :meth:`~BandwidthMonitor.recommendations` or a Prometheus scrape asks, cached until the next update.

Bad input
=========
A request is *bad* when a watched layer's rows are empty (e.g. an all-zero attention mask),
contain NaN/Inf (found through the float64 row norms; a float64 row whose norm overflows counts
too), have a width different from the monitor's ``d_model`` (e.g. a different model attached to a
monitor that already holds statistics), are missing or have an unexpected shape, or when the
forward pass itself raised. A bad request updates no statistic of any layer (all or nothing, so
every layer's statistics cover the same requests); it is counted (``bad_requests_total{reason}``),
written to the log and raises the request-level alert ``bad_input`` (layer ``None``); the next
request is served as usual.


Cost and defaults
=================
Everything runs synchronously in the request's thread, after the forward pass; the hooks only copy
the real-token rows. Per request and watched layer the monitor does O(n d) work for the norms and
one small ``m x m`` eigendecomposition for the per-request ranks (``m <= max_positions``). The
streaming update costs ``2 m d^2`` flops per request and layer (the one cost that grows with
traffic, hence the sampling); the rows are collected in a per-layer buffer and merged
``covariance_batch_rows`` at a time, because the forward pass evicts the d x d matrices from the
CPU caches between requests. Nothing of size ``d^3`` runs per request: the traffic's eigenvalues are
computed only when asked for and cached until the next update. No background thread.

Defaults: ``layers`` = the last block of each third of the network (:func:`default_layers`),
``max_positions=32`` sampled rows per request and layer, ``covariance_batch_rows=256``,
``min_tokens_for_rank=8``, ``min_tokens_for_share=8``, logging off (all in :class:`~.measure.MonitorConfig`). Pass ``layers="all"`` and
``config=MonitorConfig(max_positions=None)`` to see
everything. The measured overhead is in BENCHMARKS.md (``python bench/monitor_overhead.py --compare``).
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter, deque
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..convergence import width_rule
from ..capture import KINDS, add_hook, architecture_of, check_layers, hook_point, model_dims, torch_threads
from ..streaming import StreamingMoments
from ..validation import BandwidthInputError, check_int
from .alerts import AlertPolicy
from .export import JsonLinesLog, PrometheusExporter, recommendations
from .measure import (LAYER_METRICS, LayerTraffic, Measurement, MonitorConfig, Request,
                      RequestRecord, check_block_indices, default_layers)

logger = logging.getLogger("residual_bandwidth.monitor")


class BandwidthMonitor:
    """Residual-bandwidth monitor for a live Hugging Face causal LM (llama and gpt2 families).

    model: the model to watch (``attach()`` hooks it); may be ``None`` when you only call
        :meth:`observe` with activations you captured yourself.
    layers: block indices to watch, ``"all"``, or ``None`` for :func:`default_layers`.
    kind: which residual tensor (``"resid_post"`` default; see ``capture.KINDS``).
    config: a :class:`~.measure.MonitorConfig` (how it measures; defaults in the module docstring).
    alerts: an :class:`~.alerts.AlertPolicy` (thresholds, hysteresis; default thresholds when ``None``).
    log: a path, a writable text stream or a :class:`~.export.JsonLinesLog` (``None``: no log).
    prometheus: a :class:`~.export.PrometheusExporter` (a private registry when ``None``).
    clock: the time source of the records' timestamps.
    """

    def __init__(self, model: torch.nn.Module | None = None, *, layers: Sequence[int] | str | None = None,
                 kind: str = "resid_post", config: MonitorConfig | None = None, alerts: AlertPolicy | None = None,
                 log=None, prometheus: PrometheusExporter | None = None, clock: Callable[[], float] = time.time):
        if kind not in KINDS:
            raise BandwidthInputError(f"kind: expected one of {KINDS}, got {kind!r}")
        self.model, self.kind, self.clock = model, kind, clock
        self._layers_arg = layers
        self.layers: list[int] | None = None if layers is None or layers == "all" else check_block_indices(layers)
        self.config = config if config is not None else MonitorConfig()
        self.d_model = self.config.d_model
        self.measure = Measurement(self.config)
        self.alerts = alerts if alerts is not None else AlertPolicy()
        self.log = log if isinstance(log, JsonLinesLog) or log is None else JsonLinesLog(log)
        self.prometheus = prometheus if prometheus is not None else PrometheusExporter()
        self.prometheus.summaries = self.traffic_summary
        self.exporters = [self.prometheus] + ([self.log] if self.log is not None else [])
        self._lock = threading.RLock()
        self._tls = threading.local()
        self._ids = itertools.count(1)
        self._handles: list = []
        self._traffic: dict[int, LayerTraffic] = {}
        self._history: deque[RequestRecord] = deque(maxlen=self.config.history_size)
        self._counts = Counter()          # requests_ok, requests_bad, internal_errors, unmasked
        self._bad_reasons = Counter()
        self._summary_cache: dict[int, tuple[int, dict]] = {}

    # ---- the parts, as the monitor's own read-outs ---------------------------------------------
    @property
    def registry(self):
        """The Prometheus registry holding this monitor's metrics."""
        return self.prometheus.registry

    @property
    def thresholds(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {"warning": w, "critical": c}}`` of the alert policy (a copy)."""
        return self.alerts.thresholds

    @property
    def threshold_directions(self) -> dict[str, str]:
        """``{metric: "above" | "below"}``: whether large or small values are bad."""
        return self.alerts.directions

    def prometheus_text(self) -> str:
        """The Prometheus text exposition of this monitor's registry."""
        return self.prometheus.text()

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (loopback by default; 0 = a free port); returns the port."""
        return self.prometheus.serve(port, addr)

    def stop_server(self) -> None:
        """Stop the HTTP server started by :meth:`serve` (no-op when none)."""
        self.prometheus.stop_server()

    def recommendations(self, curve=None) -> list[str]:
        """Plain sentences stating what was measured (:func:`~.export.recommendations`); ``curve``: a
        compression curve whose measured cost of compressing each layer is quoted."""
        return recommendations(self.traffic_summary(), self.totals(), self.config, curve)

    # ---- attach / detach -------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: torch.nn.Module | None = None) -> "BandwidthMonitor":
        """Register the hooks on ``model`` (or the one given at construction). Returns ``self``."""
        if self._handles:
            raise BandwidthInputError("attach: the monitor is already attached; detach() first")
        model = model if model is not None else self.model
        if model is None:
            raise BandwidthInputError("attach: no model given")
        arch = architecture_of(model)
        blocks = arch.blocks(model)
        if self._layers_arg is None:
            layers = default_layers(len(blocks))
        else:
            layers = list(range(len(blocks))) if self._layers_arg == "all" else check_layers(model, self._layers_arg)
        dims = model_dims(model)
        with self._lock:
            self.d_model = dims["d_model"] if self.d_model is None else self.d_model
            self.layers = layers
        self.model = model
        name = self.prometheus.model_name or str(getattr(model.config, "_name_or_path", "") or dims["model_type"])
        self.prometheus.describe({"model": name, "kind": self.kind, "d_model": dims["d_model"],
                                  "layers": ",".join(map(str, layers)),
                                  "variance_threshold": self.config.variance_threshold,
                                  "max_positions": self.config.max_positions})
        handles = []
        try:
            handles.append(model.register_forward_pre_hook(self._begin_hook, with_kwargs=True))
            for L in layers:
                module, where = hook_point(arch, blocks[L], self.kind)
                handles.append(add_hook(module, where, functools.partial(self._capture, L)))
            handles.append(model.register_forward_hook(self._end_hook, always_call=True))
        except Exception:
            for h in handles:
                h.remove()
            raise
        self._handles = handles
        return self

    def detach(self) -> None:
        """Remove every hook this monitor registered (safe to call twice)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._tls = threading.local()  # forget any request left open by an interrupted forward

    def __enter__(self) -> "BandwidthMonitor":
        if not self._handles:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def close(self) -> None:
        """Detach, stop the HTTP server and close a log file this monitor opened."""
        self.detach()
        for exporter in self.exporters:
            exporter.close()

    # ---- hooks -----------------------------------------------------------------------------
    def _begin_hook(self, module, args, kwargs):
        try:
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
                mask = args[1]
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            batch = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.ndim >= 2 else None
            self._tls.req = Request(next(self._ids), mask=mask if isinstance(mask, torch.Tensor) else None,
                                    batch_size=batch)
        except Exception as e:  # never let the monitor break a request
            self._internal_error("begin", e)
        return None

    def _capture(self, layer: int, h):
        req = getattr(self._tls, "req", None)
        if req is None:
            return
        try:
            if not isinstance(h, torch.Tensor):
                req.problems.append(("shape", layer, f"hook output is {type(h).__name__}, not a tensor"))
                return
            req.add(layer, h)
        except Exception as e:
            self._internal_error(f"capture layer {layer}", e)

    def _end_hook(self, module, args, output):
        req = getattr(self._tls, "req", None)
        if req is None:
            return None
        self._tls.req = None
        try:
            if output is None:  # the forward pass raised (always_call hook)
                req.problems.append(("forward_error", None, "the model's forward pass raised"))
            self._process(req)
        except Exception as e:
            self._internal_error("process", e)
        return None

    def _internal_error(self, where: str, exc: Exception) -> None:
        with self._lock:
            self._counts["internal_errors"] += 1
        logger.exception("bandwidth monitor internal error in %s: %s", where, exc)
        now = self.clock()
        for exporter in self.exporters:
            exporter.on_error(where, exc, now)

    # ---- direct input ----------------------------------------------------------------------
    def observe(self, states, attention_mask: torch.Tensor | None = None) -> RequestRecord:
        """Process one request's activations without hooks (same path as a hooked forward).

        ``states``: ``{layer: tensor}`` or a list indexed by layer; each tensor is ``[n, d]`` (real
        tokens) or ``[batch, T, d]`` (masked with ``attention_mask`` when given). When the monitor
        has a layer list only those layers are used (a missing one makes the request bad);
        otherwise every layer given is used. Returns the request's record.
        """
        if isinstance(states, Mapping):
            items = dict(states)
        elif isinstance(states, Sequence) and not isinstance(states, (str, bytes)):
            items = dict(enumerate(states))
        else:
            raise BandwidthInputError("states: expected {layer: tensor} or a list of per-layer tensors")
        req = Request(next(self._ids), mask=attention_mask)
        for layer, h in items.items():
            layer = check_int(layer, "states: a key (block index)", low=0)
            if self.layers is not None and layer not in self.layers:
                continue
            h = torch.from_numpy(h) if isinstance(h, np.ndarray) else h
            if not isinstance(h, torch.Tensor) or h.ndim not in (2, 3) or not (h.is_floating_point() or h.numel() == 0):
                req.problems.append(("shape", layer, f"expected a float [n, d] or [batch, T, d] tensor, "
                                                     f"got {getattr(h, 'shape', type(h).__name__)}"))
                continue
            req.batch_size = int(h.shape[0]) if h.ndim == 3 else req.batch_size
            req.add(layer, h)
        return self._process(req)

    # ---- the work --------------------------------------------------------------------------
    def _process(self, req: Request) -> RequestRecord:
        """Process one finished request (:meth:`_process_request`) on one intra-op thread.

        The monitor's arithmetic is small (matrices of a few hundred rows). On a CPU shared with
        other processes an OpenMP team of 2+ threads waits for a descheduled member (BENCHMARKS.md
        has the measurement), so it runs with ``torch.set_num_threads(1)`` and restores the caller's
        setting afterwards (``MonitorConfig(single_thread=False)`` to keep it). Caveat: torch's
        default for threads that have not used it yet is global, so a thread that starts torch work
        during this window (about a millisecond) starts with one thread.
        """
        with torch_threads(1 if self.config.single_thread else None):
            return self._process_request(req)

    def _measure(self, req: Request, layers: list[int]):
        """``(problems, {layer: (record, rank rows, typical norm sum)})`` of one request."""
        with self._lock:
            d_model = self.d_model
            typical = {L: t.typical_norm for L, t in self._traffic.items()}
        problems, prepared = self.measure.validate(req, layers, d_model)
        if problems:
            return problems, {}
        return problems, {L: self.measure.layer_stats(L, *prepared[L], req.first.get(L), req.request,
                                                      typical.get(L)) for L in layers}

    def _record(self, req: Request, problems: list, stats: dict, t0: float) -> tuple[RequestRecord, list]:
        """Count one measured request (under the lock): traffic, counters, alerts and history."""
        now = self.clock()
        if not problems:
            if self.d_model is None:
                self.d_model = next(iter(stats.values()))[1].shape[1]
            for L, (rec, rows, typical_sum) in stats.items():
                if L not in self._traffic:
                    self._traffic[L] = LayerTraffic(
                        L, StreamingMoments(self.d_model, buffer_rows=self.config.covariance_batch_rows))
                self._traffic[L].add(rec, rows, typical_sum)
        reasons = sorted({p[0] for p in problems})
        self._counts["requests_bad" if problems else "requests_ok"] += 1
        self._bad_reasons.update(reasons)
        self._counts["unmasked"] += not req.masked
        alerts = self.alerts.update({L: s[0] for L, s in stats.items()}, bool(problems), req.request, now)
        n_tokens = max((int(x.shape[0]) for x in req.acts.values() if x.ndim >= 1), default=0)
        record = RequestRecord(
            request=req.request, timestamp=now, status="bad" if problems else "ok", n_tokens=n_tokens,
            batch_size=req.batch_size, masked=req.masked, processing_seconds=time.perf_counter() - t0,
            thread=threading.current_thread().name, reasons=reasons, layers={L: s[0] for L, s in stats.items()},
            problems=[f"layer {L}: {reason}: {detail}" if L is not None else f"{reason}: {detail}"
                      for reason, L, detail in problems])
        self._history.append(record)
        return record, alerts

    def _process_request(self, req: Request) -> RequestRecord:
        t0 = time.perf_counter()
        problems, stats = self._measure(req, list(self.layers) if self.layers is not None else sorted(req.acts))
        with self._lock:
            record, alerts = self._record(req, problems, stats, t0)
        for exporter in self.exporters:
            exporter.on_request(record, alerts)
        for a in alerts:
            logger.log(logging.INFO if a.level == "resolved" else (
                logging.CRITICAL if a.level == "critical" else logging.WARNING), "bandwidth alert: %s", a.message)
        record.processing_seconds = time.perf_counter() - t0
        self.prometheus.observe_processing(record.processing_seconds)
        return record

    # ---- read-outs -------------------------------------------------------------------------
    @property
    def history(self) -> list[RequestRecord]:
        """The last ``history_size`` request records, oldest first (a copy)."""
        with self._lock:
            return list(self._history)

    def alert_records(self) -> list[dict]:
        """``[{request, timestamp, layer, metric, level, value, threshold}, ...]`` (ring buffer)."""
        with self._lock:
            return [a.to_dict() for a in self.alerts.records]

    def timeline_records(self, metrics: Sequence[str] | None = None) -> list[dict]:
        """``[{request, timestamp, layer, metric, value}, ...]`` over the history ring buffer.

        One entry per request, layer and defined metric (``metrics`` restricts which); bad requests
        contribute ``{"metric": "bad_input", "value": 1.0, "layer": None}``.
        """
        wanted = set(metrics) if metrics is not None else set(LAYER_METRICS) | {"bad_input"}
        out = []
        for rec in self.history:
            base = {"request": rec.request, "timestamp": rec.timestamp}
            if rec.status == "bad" and "bad_input" in wanted:
                out.append({**base, "layer": None, "metric": "bad_input", "value": 1.0})
            for L, lr in rec.layers.items():
                out += [{**base, "layer": L, "metric": m, "value": float(getattr(lr, m))}
                        for m in LAYER_METRICS if m in wanted and getattr(lr, m) is not None]
        return out

    def totals(self) -> dict:
        """Counters since construction: requests, bad requests by reason, alerts, tokens per layer."""
        with self._lock:
            per_layer, c = sorted(self._traffic.items()), self._counts
            return {"requests": c["requests_ok"] + c["requests_bad"], "requests_ok": c["requests_ok"],
                    "requests_bad": c["requests_bad"], "bad_reasons": dict(self._bad_reasons),
                    "internal_errors": c["internal_errors"], "requests_without_mask": c["unmasked"],
                    "alerts": sum(self.alerts.counts.values()), "tokens": {L: t.tokens for L, t in per_layer},
                    "massive_tokens": {L: t.massive_tokens for L, t in per_layer},
                    "covariance_rows": {L: t.moments.n for L, t in per_layer}}

    def _layer_traffic(self, layer: int) -> LayerTraffic:
        if layer not in self._traffic:
            raise BandwidthInputError(f"layer {layer}: no traffic recorded (watched: {self.layers})")
        return self._traffic[layer]

    def traffic(self, layer: int) -> StreamingMoments:
        """A snapshot (copy) of ``layer``'s streaming mean and scatter over all good traffic."""
        with self._lock:
            return self._layer_traffic(layer).moments.copy()

    def traffic_summary(self, layer: int | None = None) -> dict | list[dict]:
        """Effective-rank family of all traffic so far, per layer (eigenvalues computed here, lazily).

        Keys: ``layer, requests, tokens, massive_tokens, massive_first_tokens, mean_norm,
        max_norm_ratio`` and, over the
        covariance rows (``n``), ``variance_rank, participation_ratio, stable_rank, entropy_rank,
        spectral_entropy, utilization_d_model, utilization_available, total_variance``, and the
        sample-size rule of :func:`width_rule` (``can_judge_width, positions_needed, positions_missing``).
        """
        with self._lock:
            layers = sorted(self._traffic) if layer is None else [layer]
        out = []
        for L in layers:
            with self._lock:
                tr = self._layer_traffic(L)
                version, cached = tr.moments.version, self._summary_cache.get(L)
                snap = None if (cached and cached[0] == version) else tr.moments.copy()
                counts = tr.counts()
            if snap is not None:  # the eigendecomposition runs outside the lock
                cached = (version, snap.summary(self.config.variance_threshold))
                with self._lock:
                    self._summary_cache[L] = cached
            out.append({**counts, **cached[1], **width_rule(cached[1]["n"], cached[1]["d_model"])})
        return out[0] if layer is not None else out

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"BandwidthMonitor({state}, kind={self.kind!r}, layers={self.layers}, "
                f"requests={self.totals()['requests']})")
