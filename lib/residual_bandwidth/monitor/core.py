"""Watch the residual stream of a model while it serves requests: per-request measurements,
streaming statistics over all traffic, alerts (:mod:`.alerts`), a JSON-lines log and Prometheus
metrics (:mod:`.export`).

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
  and ``massive_other_fraction = (massive_count - massive_first) / n`` measures the unexpected ones.
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
``min_tokens_for_rank=8``, logging off. Pass ``layers="all"`` and ``max_positions=None`` to see
everything. The measured overhead is in BENCHMARKS.md (``python bench/monitor_overhead.py --compare``).
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..capture import KINDS, add_hook, architecture_of, check_layers, hook_point, model_dims
from ..metrics import rank_family, spectrum
from ..outliers import DEFAULT_MASSIVE_RATIO, massive_mask
from ..streaming import StreamingMoments
from ..validation import BandwidthInputError, check_fraction, check_positive
from .alerts import DEFAULT_THRESHOLDS, AlertRecord, AlertsMixin, check_thresholds
from .export import ExportMixin

logger = logging.getLogger("residual_bandwidth.monitor")

#: rows per request and layer that enter the rank measures and the streaming covariance (a random
#: sample when the request has more): the d x d update costs 2 d^2 rows flops, the one cost that grows
DEFAULT_MAX_POSITIONS = 32
#: rows collected per layer before the d x d update runs (StreamingMoments.buffer_rows); every
#: read-out merges what is pending first, so results always cover all traffic
DEFAULT_COVARIANCE_BATCH_ROWS = 256
BAD_REASONS = ("empty", "nonfinite", "d_model", "shape", "missing_layer", "forward_error")


def width_rule(n: int, d: int) -> dict:
    """The sample-size rule for judging the residual *width* from ``n`` positions of dimension ``d``.

    ``n`` centred vectors span at most ``n - 1`` directions, so ``r_p <= n - 1`` whatever the model
    does: a rank (or ``utilization_d_model = r_p / d``) from fewer than ``d + 1`` positions measures
    the sample, not the width. ``{"can_judge_width": n - 1 >= d, "positions_needed": d + 1,
    "positions_missing": max(0, d + 1 - n)}``. (``min_tokens_for_rank`` is a different, smaller bar: the
    per-request rank family describes that request's own tokens and never judges the width.)
    """
    return {"can_judge_width": n - 1 >= d, "positions_needed": d + 1, "positions_missing": max(0, d + 1 - n)}


def default_layers(n_layers: int, count: int = 3) -> list[int]:
    """The last block of each of ``count`` equal slices of the network: ``[9, 19, 29]`` of 30."""
    if n_layers < 1:
        raise BandwidthInputError(f"n_layers: expected >= 1, got {n_layers}")
    return sorted({max(0, round((i + 1) * n_layers / count) - 1) for i in range(count)})


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """What one request looked like at one layer (formulas: module docstring)."""
    layer: int
    n_tokens: int
    mean_norm: float
    median_norm: float
    max_norm: float
    max_norm_ratio: float
    massive_count: int
    massive_fraction: float
    massive_first: int
    massive_other_fraction: float
    rank_rows: int
    variance_rank: int | None = None
    participation_ratio: float | None = None
    stable_rank: float | None = None
    entropy_rank: float | None = None
    utilization_available: float | None = None
    utilization_d_model: float | None = None


#: per-layer metrics that can carry thresholds and appear in timeline records
LAYER_METRICS = tuple(f for f in LayerRecord.__dataclass_fields__ if f != "layer")


@dataclass
class RequestRecord:
    """One request (one call of the model, or one :meth:`BandwidthMonitor.observe`)."""
    request: int
    timestamp: float
    status: str                      # "ok" or "bad"
    n_tokens: int                    # real tokens (after the mask), 0 when unknown
    batch_size: int | None
    masked: bool                     # whether an attention mask removed padding
    processing_seconds: float        # time spent in the monitor after the forward pass
    thread: str
    problems: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)   # categories from BAD_REASONS
    layers: dict[int, LayerRecord] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(k): v for k, v in d["layers"].items()}
        return d

#: the keys of one entry of :meth:`BandwidthMonitor.timeline_records`
TIMELINE_KEYS = ("request", "timestamp", "layer", "metric", "value")


@dataclass
class LayerTraffic:
    """Everything one layer has seen, in constant memory."""
    layer: int
    moments: StreamingMoments        # rank rows of every good request
    requests: int = 0
    tokens: int = 0
    massive_tokens: int = 0
    massive_first_tokens: int = 0    # of which were the first token of their sequence
    norm_sum: float = 0.0            # sum of ||x_i|| over all real tokens (mean = norm_sum / tokens)
    typical_norm_sum: float = 0.0    # sum of ||x_i|| over non-massive tokens
    typical_tokens: int = 0

    @property
    def typical_norm(self) -> float | None:
        """Mean norm of the non-massive tokens seen so far (part of the "massive" reference)."""
        return self.typical_norm_sum / self.typical_tokens if self.typical_tokens else None
    max_norm_ratio: float = 0.0      # largest per-request max_norm_ratio seen


class _Request:
    """Thread-local buffer of one request in flight."""
    __slots__ = ("request", "mask", "batch_size", "acts", "first", "problems", "masked",
                 "_mask_cache")

    def __init__(self, request: int, mask=None, batch_size=None):
        self.request = request
        self.mask = mask
        self.batch_size = batch_size
        self.acts: dict[int, torch.Tensor] = {}
        self.first: dict[int, torch.Tensor] = {}    # layer -> bool [n]: first token of its sequence
        self.problems: list[tuple[str, int | None, str]] = []   # (reason, layer, detail)
        self.masked = False
        self._mask_cache: dict[tuple[int, int], tuple] = {}

    def add(self, layer: int, h: torch.Tensor) -> None:
        """Store the real-token rows ``[n, d]`` of a ``[batch, T, d]`` (or ``[n, d]``) tensor (a copy)
        and which of them are the first real token of their sequence."""
        h = h.detach()
        if h.ndim != 3:
            first = torch.zeros(h.shape[0] if h.ndim else 0, dtype=torch.bool)
            first[:1] = True
            self.acts[layer], self.first[layer] = h.clone(), first
            return
        b, t = h.shape[0], h.shape[1]
        cached = self._mask_cache.get((b, t))   # the same for every layer of this request
        if cached is None:
            m = self.mask
            if m is not None and m.ndim == 2 and m.shape[0] == b and m.shape[1] >= t:
                m = m.to(device=h.device) != 0
                first = m & (m.cumsum(dim=1) == 1)          # where the running sum reaches 1
                keep = m[:, m.shape[1] - t:]                # this call's tokens are the last T
                first = first[:, m.shape[1] - t:]
                masked = True
            else:  # no usable mask: every position is real, column 0 starts each sequence
                keep = None
                first = torch.zeros(b, t, dtype=torch.bool, device=h.device)
                first[:, :1] = True
                masked = False
            if keep is not None and bool(keep.all()):
                keep = None                                 # no padding: skip the boolean indexing
            cached = (keep, first.reshape(-1) if keep is None else first[keep], masked)
            self._mask_cache[(b, t)] = cached
        keep, first, self.masked = cached
        rows = h.reshape(b * t, h.shape[-1]).clone() if keep is None else h[keep]
        self.acts[layer], self.first[layer] = rows, first

# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------
class BandwidthMonitor(AlertsMixin, ExportMixin):
    """Residual-bandwidth monitor for a live Hugging Face causal LM (llama and gpt2 families).

    Parameters (all keyword except ``model``)
    ----------
    model: the model to watch (``attach()`` hooks it); may be ``None`` when you only call
        :meth:`observe` with activations you captured yourself.
    layers: block indices to watch, ``"all"``, or ``None`` for :func:`default_layers`.
    kind: which residual tensor (``"resid_post"`` default; see ``capture.KINDS``).
    thresholds: ``{metric: {"warning": w, "critical": c}}``; replaces :data:`DEFAULT_THRESHOLDS`
        (pass ``{}`` for no metric alerts). ``hysteresis``: relative clearing margin in [0, 1).
    history_size / alert_history_size: ring-buffer lengths of request and alert records.
    log: a path (appended to, JSON lines) or a writable text stream; ``log_requests=False`` writes
        only alerts and bad requests.
    variance_threshold: ``p`` of the variance-threshold rank (0.95).
    massive_ratio, exclude_massive, max_positions, min_tokens_for_rank, seed: see module docstring.
    covariance_batch_rows: rows buffered per layer before the d x d update runs (0 = every request).
    single_thread: run the per-request arithmetic on one intra-op thread (see ``_process``).
    d_model: expected width; taken from the model's config on attach, else from the first request.
    registry: a ``prometheus_client.CollectorRegistry`` (a private one is made by default);
        ``namespace`` prefixes every metric name.
    compression_curve: optional object for :meth:`recommendations` (``records()``, ``base_loss``,
        ``tolerance``, ``smallest_k``).
    """

    def __init__(self, model: torch.nn.Module | None = None, *, layers: Sequence[int] | str | None = None,
                 kind: str = "resid_post", thresholds: Mapping[str, Mapping[str, float | None]] | None = None,
                 hysteresis: float = 0.0, history_size: int = 1000, alert_history_size: int = 1000,
                 log=None, log_requests: bool = True, variance_threshold: float = 0.95,
                 massive_ratio: float = DEFAULT_MASSIVE_RATIO, exclude_massive: bool = True,
                 max_positions: int | None = DEFAULT_MAX_POSITIONS, min_tokens_for_rank: int = 8, seed: int = 0,
                 single_thread: bool = True,
                 covariance_batch_rows: int = DEFAULT_COVARIANCE_BATCH_ROWS,
                 d_model: int | None = None, registry=None, namespace: str = "residual_bandwidth",
                 model_name: str | None = None, compression_curve=None,
                 clock: Callable[[], float] = time.time):
        if kind not in KINDS:
            raise BandwidthInputError(f"kind: expected one of {KINDS}, got {kind!r}")
        if isinstance(covariance_batch_rows, bool) or not isinstance(covariance_batch_rows, int) \
                or covariance_batch_rows < 0:
            raise BandwidthInputError(f"covariance_batch_rows: expected an int >= 0, got {covariance_batch_rows!r}")
        for name, v in (("history_size", history_size), ("alert_history_size", alert_history_size),
                        ("min_tokens_for_rank", min_tokens_for_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BandwidthInputError(f"{name}: expected a positive int, got {v!r}")
        if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                          or max_positions < 2):
            raise BandwidthInputError(f"max_positions: expected None or an int >= 2, got {max_positions!r}")
        if not (isinstance(hysteresis, (int, float)) and 0 <= hysteresis < 1):
            raise BandwidthInputError(f"hysteresis: expected a number in [0, 1), got {hysteresis!r}")
        self.model = model
        self.kind = kind
        self._layers_arg = layers
        self.layers: list[int] | None = None if layers is None or layers == "all" else self._check_layers(layers)
        self.variance_threshold = check_fraction(variance_threshold, "variance_threshold")
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        self.exclude_massive = bool(exclude_massive)
        self.max_positions = max_positions
        self.min_tokens_for_rank = min_tokens_for_rank
        self.single_thread = bool(single_thread)
        self.covariance_batch_rows = covariance_batch_rows
        self.seed = int(seed)
        self.hysteresis = float(hysteresis)
        self.d_model = int(d_model) if d_model is not None else None
        self.model_name = model_name
        self.compression_curve = compression_curve
        self.clock = clock
        self._thresholds, self._directions = check_thresholds(
            DEFAULT_THRESHOLDS if thresholds is None else thresholds, LAYER_METRICS)

        self._lock = threading.RLock()
        self._tls = threading.local()
        self._ids = itertools.count(1)
        self._handles: list = []
        self._traffic: dict[int, LayerTraffic] = {}
        self._history: deque[RequestRecord] = deque(maxlen=history_size)
        self._alerts: deque[AlertRecord] = deque(maxlen=alert_history_size)
        self._alert_state: dict[tuple[str, int | None], int] = {}
        self._counts = Counter()          # requests_ok, requests_bad, internal_errors, unmasked
        self._bad_reasons = Counter()
        self._alert_counts = Counter()    # (metric, layer, level) -> n
        self._summary_cache: dict[int, tuple[int, dict]] = {}

        self._log_lock = threading.Lock()
        self._log_requests = bool(log_requests)
        self._log_owned = False
        self._log = None
        if log is not None:
            if isinstance(log, (str, Path)):
                self._log = open(log, "a", encoding="utf-8", buffering=1)
                self._log_owned = True
            elif hasattr(log, "write"):
                self._log = log
            else:
                raise BandwidthInputError(f"log: expected a path or a writable stream, got {type(log).__name__}")

        self._server = None
        self._server_thread = None
        self._init_prometheus(registry, namespace)

    # ---- configuration checks --------------------------------------------------------------
    @staticmethod
    def _check_layers(layers) -> list[int]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise BandwidthInputError(f"layers: expected a non-empty list of block indices, 'all' or None, got {layers!r}")
        out = []
        for v in layers:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise BandwidthInputError(f"layers: {v!r} is not a block index (int >= 0)")
            out.append(int(v))
        return sorted(set(out))

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
        n_layers = len(blocks)
        if self._layers_arg is None:
            layers = default_layers(n_layers)
        elif self._layers_arg == "all":
            layers = list(range(n_layers))
        else:
            layers = check_layers(model, self._layers_arg)
        dims = model_dims(model)
        with self._lock:
            if self.d_model is None:
                self.d_model = dims["d_model"]
            self.layers = layers
        self.model = model
        if self.model_name is None:
            self.model_name = str(getattr(model.config, "_name_or_path", "") or dims["model_type"])
        self._info.info({"model": self.model_name, "kind": self.kind, "d_model": str(dims["d_model"]),
                         "layers": ",".join(map(str, layers)),
                         "variance_threshold": str(self.variance_threshold),
                         "max_positions": str(self.max_positions)})
        handles = []
        try:
            handles.append(model.register_forward_pre_hook(self._begin_hook, with_kwargs=True))
            for L in layers:
                handles.append(self._register_layer_hook(arch, blocks[L], L))
            handles.append(model.register_forward_hook(self._end_hook, always_call=True))
        except Exception:
            for h in handles:
                h.remove()
            raise
        self._handles = handles
        return self

    def _register_layer_hook(self, arch, block, layer: int):
        module, where = hook_point(arch, block, self.kind)
        return add_hook(module, where, functools.partial(self._capture, layer))

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
        self.stop_server()
        if self._log_owned and self._log is not None:
            with self._log_lock:
                self._log.close()
            self._log = None

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
            self._tls.req = _Request(next(self._ids), mask=mask if isinstance(mask, torch.Tensor) else None,
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
        self._internal_errors.inc()
        logger.exception("bandwidth monitor internal error in %s: %s", where, exc)
        self._write_log({"event": "internal_error", "where": where, "error": repr(exc),
                         "timestamp": self.clock()})

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
        batch = None
        req = _Request(next(self._ids), mask=attention_mask)
        for layer, h in items.items():
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
                raise BandwidthInputError(f"states: key {layer!r} is not a block index (int >= 0)")
            if self.layers is not None and layer not in self.layers:
                continue
            if isinstance(h, np.ndarray):
                h = torch.from_numpy(h)
            if not isinstance(h, torch.Tensor) or h.ndim not in (2, 3) or not (h.is_floating_point() or h.numel() == 0):
                req.problems.append(("shape", int(layer), f"expected a float [n, d] or [batch, T, d] tensor, "
                                                          f"got {getattr(h, 'shape', type(h).__name__)}"))
                continue
            if h.ndim == 3:
                batch = int(h.shape[0])
            req.add(int(layer), h)
        req.batch_size = batch
        return self._process(req)

    # ---- the work --------------------------------------------------------------------------
    def _layer_list(self, req: _Request) -> list[int]:
        return list(self.layers) if self.layers is not None else sorted(req.acts)

    def _validate(self, req: _Request, d_model: int | None):
        """Problems of the request, and each good layer's rows in float64 with their norms.

        Non-finite values are found through the row norms (computed in float64, so a float32/16
        row's norm is finite exactly when all its entries are): one pass over the data instead of two.
        """
        problems = list(req.problems)
        prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = self._layer_list(req)
        if d_model is None:  # the first request fixes the width: its first layer's
            widths = [req.acts[L].shape[-1] for L in layers if L in req.acts and req.acts[L].ndim == 2]
            d_model = widths[0] if widths else None
        if not layers and not problems:
            problems.append(("empty", None, "no activations"))
        for L in layers:
            x = req.acts.get(L)
            if x is None:
                if not any(p[1] == L for p in problems) and not any(p[0] == "forward_error" for p in problems):
                    problems.append(("missing_layer", L, "no activations recorded"))
                continue
            if x.ndim != 2:
                problems.append(("shape", L, f"shape {tuple(x.shape)}"))
            elif x.shape[0] == 0:
                problems.append(("empty", L, "0 real tokens"))
            elif d_model is not None and x.shape[1] != d_model:
                problems.append(("d_model", L, f"width {x.shape[1]} but the monitor's d_model is {d_model}"))
            elif not x.is_floating_point():
                problems.append(("shape", L, f"dtype {x.dtype} is not a floating type"))
            else:
                x64 = x.to(device="cpu", dtype=torch.float64)
                norms = torch.linalg.vector_norm(x64, dim=1)
                if not bool(torch.isfinite(norms).all()):
                    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
                    problems.append(("nonfinite", L, f"{n_nan} NaN and {n_inf} Inf value(s)"))
                else:
                    prepared[L] = (x64, norms)
        return problems, prepared

    def _layer_stats(self, L: int, x: torch.Tensor, norms: torch.Tensor, first: torch.Tensor | None,
                     request: int, typical: float | None) -> tuple[LayerRecord, torch.Tensor, float]:
        """Per-request metrics of one layer and the float64 rank rows for the streaming update.

        ``x``: the request's real-token rows (float64, CPU); ``norms``: their norms.
        """
        n, d = x.shape
        median = float(norms.median())
        max_norm = float(norms.max())
        ref = min(median, typical) if typical else median
        massive = massive_mask(norms, self.massive_ratio, reference=ref)
        if ref > 0:
            max_ratio = max_norm / ref
        else:  # more than half the rows are zero vectors: every non-zero row is loud
            max_ratio = math.inf if max_norm > 0 else 1.0
        n_massive = int(massive.sum())
        n_first = int((massive & first.to(massive.device)).sum()) if (n_massive and first is not None
                                                                    and first.shape == massive.shape) else 0
        rows = x[~massive] if (self.exclude_massive and n_massive) else x
        if self.max_positions is not None and rows.shape[0] > self.max_positions:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + request * 1009 + L)
            idx = torch.randperm(rows.shape[0], generator=g)[: self.max_positions]
            rows = rows[idx.sort().values]
        rec = LayerRecord(layer=L, n_tokens=n, mean_norm=float(norms.mean()), median_norm=median,
                          max_norm=max_norm, max_norm_ratio=max_ratio, massive_count=n_massive,
                          massive_fraction=n_massive / n, massive_first=n_first,
                          massive_other_fraction=(n_massive - n_first) / n, rank_rows=int(rows.shape[0]))
        m = rows.shape[0]
        if m >= self.min_tokens_for_rank:
            try:
                spec = spectrum(rows, center=True, name="request rows", layer=L)
            except BandwidthInputError:  # zero variance (identical rows): no spectrum to report
                spec = None
            if spec is not None:
                for key, value in rank_family(spec, self.variance_threshold).items():
                    if hasattr(rec, key):
                        setattr(rec, key, value)
        typical_sum = float(norms[~massive].sum()) if n_massive else float(norms.sum())
        return rec, rows, typical_sum

    def _process(self, req: _Request) -> RequestRecord:
        """Process one finished request (see :meth:`_process_request`) on one intra-op thread.

        The monitor's arithmetic is small (matrices of a few hundred rows). On a CPU shared with
        other processes an OpenMP team of 2+ threads waits for a descheduled member (BENCHMARKS.md
        has the measurement), so it runs with ``torch.set_num_threads(1)``
        and restores the caller's setting afterwards (``single_thread=False`` to keep it). Caveat:
        torch's default for threads that have not used it yet is global, so a thread that starts
        torch work during this window (about a millisecond) starts with one thread.
        """
        n_threads = torch.get_num_threads() if self.single_thread else 1
        if n_threads > 1:
            torch.set_num_threads(1)
        try:
            return self._process_request(req)
        finally:
            if n_threads > 1:
                torch.set_num_threads(n_threads)

    def _process_request(self, req: _Request) -> RequestRecord:
        t0 = time.perf_counter()
        with self._lock:
            d_model = self.d_model
        problems, prepared = self._validate(req, d_model)
        layer_recs: dict[int, LayerRecord] = {}
        rank_rows: dict[int, torch.Tensor] = {}
        typical_sums: dict[int, float] = {}
        if not problems:
            with self._lock:
                typical = {L: t.typical_norm for L, t in self._traffic.items()}
            for L in self._layer_list(req):
                x64, norms = prepared[L]
                layer_recs[L], rank_rows[L], typical_sums[L] = self._layer_stats(
                    L, x64, norms, req.first.get(L), req.request, typical.get(L))
        n_tokens = 0
        if req.acts:
            n_tokens = max((int(x.shape[0]) for x in req.acts.values() if x.ndim >= 1), default=0)
        status = "bad" if problems else "ok"
        alerts: list[AlertRecord] = []
        with self._lock:
            now = self.clock()
            if status == "ok":
                if self.d_model is None:
                    self.d_model = next(iter(rank_rows.values())).shape[1]
                for L, rec in layer_recs.items():
                    tr = self._traffic.get(L)
                    if tr is None:
                        tr = self._traffic[L] = LayerTraffic(
                            L, StreamingMoments(self.d_model, buffer_rows=self.covariance_batch_rows))
                    if rank_rows[L].shape[0]:
                        tr.moments.update(rank_rows[L], check=False)
                    tr.requests += 1
                    tr.tokens += rec.n_tokens
                    tr.massive_tokens += rec.massive_count
                    tr.massive_first_tokens += rec.massive_first
                    tr.norm_sum += rec.mean_norm * rec.n_tokens
                    tr.typical_norm_sum += typical_sums[L]
                    tr.typical_tokens += rec.n_tokens - rec.massive_count
                    tr.max_norm_ratio = max(tr.max_norm_ratio, rec.max_norm_ratio)
                    for metric in self._thresholds:
                        alerts += self._update_alert(metric, L, getattr(rec, metric), req.request, now)
                self._counts["requests_ok"] += 1
                alerts += self._update_bad_alert(0.0, req.request, now)
            else:
                self._counts["requests_bad"] += 1
                for reason in sorted({p[0] for p in problems}):
                    self._bad_reasons[reason] += 1
                alerts += self._update_bad_alert(1.0, req.request, now)
            if not req.masked:
                self._counts["unmasked"] += 1
            record = RequestRecord(
                request=req.request, timestamp=now, status=status, n_tokens=n_tokens,
                batch_size=req.batch_size, masked=req.masked,
                processing_seconds=time.perf_counter() - t0,
                thread=threading.current_thread().name,
                problems=[f"layer {L}: {reason}: {detail}" if L is not None else f"{reason}: {detail}"
                          for reason, L, detail in problems],
                reasons=sorted({p[0] for p in problems}), layers=layer_recs)
            self._history.append(record)
            self._alerts.extend(alerts)
            for a in alerts:
                self._alert_counts[(a.metric, a.layer, a.level)] += 1
        self._export(record, alerts)
        if self._log is not None:
            if status == "bad" or self._log_requests:
                self._write_log({"event": "request", **record.to_dict()})
            for a in alerts:
                self._write_log({"event": "alert", **a.to_dict(), "message": a.message})
        for a in alerts:
            lvl = logging.INFO if a.level == "resolved" else (
                logging.CRITICAL if a.level == "critical" else logging.WARNING)
            logger.log(lvl, "bandwidth alert: %s", a.message)
        record.processing_seconds = time.perf_counter() - t0
        self._processing.observe(record.processing_seconds)
        return record
    # ---- read-outs -------------------------------------------------------------------------
    @property
    def history(self) -> list[RequestRecord]:
        """The last ``history_size`` request records, oldest first (a copy)."""
        with self._lock:
            return list(self._history)
    def timeline_records(self, metrics: Sequence[str] | None = None) -> list[dict]:
        """``[{request, timestamp, layer, metric, value}, ...]`` over the history ring buffer.

        One entry per request, layer and defined metric (``metrics`` restricts which); bad requests
        contribute ``{"metric": "bad_input", "value": 1.0, "layer": None}``.
        """
        wanted = set(metrics) if metrics is not None else None
        out = []
        for rec in self.history:
            if rec.status == "bad":
                if wanted is None or "bad_input" in wanted:
                    out.append({"request": rec.request, "timestamp": rec.timestamp, "layer": None,
                                "metric": "bad_input", "value": 1.0})
                continue
            for L, lr in rec.layers.items():
                for metric in LAYER_METRICS:
                    if wanted is not None and metric not in wanted:
                        continue
                    v = getattr(lr, metric)
                    if v is not None:
                        out.append({"request": rec.request, "timestamp": rec.timestamp, "layer": L,
                                    "metric": metric, "value": float(v)})
        return out

    def totals(self) -> dict:
        """Counters since construction: requests, bad requests by reason, alerts, tokens per layer."""
        with self._lock:
            return {
                "requests": self._counts["requests_ok"] + self._counts["requests_bad"],
                "requests_ok": self._counts["requests_ok"],
                "requests_bad": self._counts["requests_bad"],
                "bad_reasons": dict(self._bad_reasons),
                "internal_errors": self._counts["internal_errors"],
                "requests_without_mask": self._counts["unmasked"],
                "alerts": sum(self._alert_counts.values()),
                "tokens": {L: t.tokens for L, t in sorted(self._traffic.items())},
                "massive_tokens": {L: t.massive_tokens for L, t in sorted(self._traffic.items())},
                "covariance_rows": {L: t.moments.n for L, t in sorted(self._traffic.items())},
            }

    def traffic(self, layer: int) -> StreamingMoments:
        """A snapshot (copy) of ``layer``'s streaming mean and scatter over all good traffic."""
        with self._lock:
            if layer not in self._traffic:
                raise BandwidthInputError(f"layer {layer}: no traffic recorded (watched: {self.layers})")
            return self._traffic[layer].moments.copy()

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
                tr = self._traffic.get(L)
                if tr is None:
                    raise BandwidthInputError(f"layer {L}: no traffic recorded (watched: {self.layers})")
                version = tr.moments.version
                cached = self._summary_cache.get(L)
                snap = None if (cached and cached[0] == version) else tr.moments.copy()
                counts = {"layer": L, "requests": tr.requests, "tokens": tr.tokens,
                          "massive_tokens": tr.massive_tokens,
                          "massive_first_tokens": tr.massive_first_tokens,
                          "mean_norm": tr.norm_sum / tr.tokens if tr.tokens else None,
                          "max_norm_ratio": tr.max_norm_ratio}
            if snap is not None:  # the eigendecomposition runs outside the lock
                cached = (version, snap.summary(self.variance_threshold))
                with self._lock:
                    self._summary_cache[L] = cached
            out.append({**counts, **cached[1], **width_rule(cached[1]["n"], cached[1]["d_model"])})
        return out[0] if layer is not None else out
    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"BandwidthMonitor({state}, kind={self.kind!r}, layers={self.layers}, "
                f"requests={self.totals()['requests']})")
