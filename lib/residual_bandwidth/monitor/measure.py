"""The monitor's measurement: what one request looked like at each watched layer, and the streaming
statistics of all traffic (formulas: :mod:`residual_bandwidth.monitor.core`). No hooks, no alerts,
no output: :class:`Measurement` turns a request's rows into records and :class:`Traffic` accumulates
them; the monitor calls both under its lock.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..metrics import rank_family, spectrum
from ..outliers import DEFAULT_MASSIVE_RATIO, massive_mask
from ..streaming import StreamingMoments
from ..validation import BandwidthInputError, check_fraction, check_int, check_positive

#: rows per request and layer that enter the rank measures and the streaming covariance (a random
#: sample when the request has more): the d x d update costs 2 d^2 rows flops, the one cost that grows
DEFAULT_MAX_POSITIONS = 32
#: rows collected per layer before the d x d update runs (StreamingMoments.buffer_rows); every
#: read-out merges what is pending first, so results always cover all traffic
DEFAULT_COVARIANCE_BATCH_ROWS = 256
BAD_REASONS = ("empty", "nonfinite", "d_model", "shape", "missing_layer", "forward_error")


def default_layers(n_layers: int, count: int = 3) -> list[int]:
    """The last block of each of ``count`` equal slices of the network: ``[9, 19, 29]`` of 30."""
    check_int(n_layers, "n_layers", low=1)
    return sorted({max(0, round((i + 1) * n_layers / count) - 1) for i in range(count)})


@dataclass(frozen=True)
class MonitorConfig:
    """How the monitor measures (formulas: :mod:`residual_bandwidth.monitor.core`).

    variance_threshold: ``p`` of the variance-threshold rank. massive_ratio, exclude_massive,
    max_positions (``None`` = every row), min_tokens_for_rank, seed: the per-request measures.
    min_tokens_for_share: the shortest request whose ``massive_other_fraction`` is a rate (one loud
    token of a 2-token request is a count of one, not 50 %).
    covariance_batch_rows: rows buffered per layer before the d x d update (0 = every request).
    single_thread: run the per-request arithmetic on one intra-op thread.
    history_size: length of the request-record ring buffer.
    d_model: expected width; taken from the model's config on attach, else from the first request.
    """
    variance_threshold: float = 0.95
    massive_ratio: float = DEFAULT_MASSIVE_RATIO
    exclude_massive: bool = True
    max_positions: int | None = DEFAULT_MAX_POSITIONS
    min_tokens_for_rank: int = 8
    min_tokens_for_share: int = 8
    seed: int = 0
    covariance_batch_rows: int = DEFAULT_COVARIANCE_BATCH_ROWS
    single_thread: bool = True
    history_size: int = 1000
    d_model: int | None = None

    def __post_init__(self):
        check_fraction(self.variance_threshold, "variance_threshold")
        check_positive(self.massive_ratio, "massive_ratio")
        check_int(self.covariance_batch_rows, "covariance_batch_rows", low=0)
        check_int(self.history_size, "history_size", low=1)
        check_int(self.min_tokens_for_rank, "min_tokens_for_rank", low=1)
        check_int(self.min_tokens_for_share, "min_tokens_for_share", low=1)
        check_int(self.seed, "seed")
        if self.max_positions is not None:
            check_int(self.max_positions, "max_positions", low=2)
        if self.d_model is not None:
            check_int(self.d_model, "d_model", low=1)


@dataclass
class LayerRecord:
    """What one request looked like at one layer (formulas: :mod:`residual_bandwidth.monitor.core`)."""
    layer: int
    n_tokens: int
    mean_norm: float
    median_norm: float
    max_norm: float
    max_norm_ratio: float
    massive_count: int
    massive_fraction: float
    massive_first: int
    massive_other_fraction: float | None   # None below min_tokens_for_share tokens: not a rate
    rank_rows: int
    variance_rank: int | None = None
    participation_ratio: float | None = None
    stable_rank: float | None = None
    entropy_rank: float | None = None
    utilization_available: float | None = None
    utilization_d_model: float | None = None


#: per-layer metrics that can carry thresholds and appear in timeline records
LAYER_METRICS = tuple(f for f in LayerRecord.__dataclass_fields__ if f != "layer")
#: the keys of one entry of :meth:`BandwidthMonitor.timeline_records`
TIMELINE_KEYS = ("request", "timestamp", "layer", "metric", "value")


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


class Request:
    """Buffer of one request in flight: each watched layer's real-token rows and problems seen."""

    def __init__(self, request: int, mask=None, batch_size=None):
        self.request, self.mask, self.batch_size = request, mask, batch_size
        self.acts: dict[int, torch.Tensor] = {}
        self.first: dict[int, torch.Tensor] = {}    # layer -> bool [n]: first token of its sequence
        self.problems: list[tuple[str, int | None, str]] = []   # (reason, layer, detail)
        self.masked = False
        self._mask_cache: dict[tuple[int, int], tuple] = {}

    def _keep_and_first(self, b: int, t: int, device) -> tuple:
        """``(keep [b, T] or None, first [n], masked)`` from the attention mask: with a 2-D mask
        ``[b, S]`` the call's tokens are its last ``T`` columns and a sequence starts where the
        mask's running sum reaches 1; without one every position is real and column 0 starts."""
        m = self.mask
        if m is not None and m.ndim == 2 and m.shape[0] == b and m.shape[1] >= t:
            m = m.to(device=device) != 0
            keep = m[:, m.shape[1] - t:]
            first = (m & (m.cumsum(dim=1) == 1))[:, m.shape[1] - t:]
            masked = True
        else:
            keep, masked = None, False
            first = torch.zeros(b, t, dtype=torch.bool, device=device)
            first[:, :1] = True
        if keep is not None and bool(keep.all()):
            keep = None                                     # no padding: skip the boolean indexing
        return keep, (first.reshape(-1) if keep is None else first[keep]), masked

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
        if (b, t) not in self._mask_cache:   # the same for every layer of this request
            self._mask_cache[(b, t)] = self._keep_and_first(b, t, h.device)
        keep, first, self.masked = self._mask_cache[(b, t)]
        self.acts[layer] = h.reshape(b * t, h.shape[-1]).clone() if keep is None else h[keep]
        self.first[layer] = first


def check_rows(x: torch.Tensor, layer: int, d_model: int | None):
    """``(problem or None, (rows in float64, their norms) or None)`` for one layer's rows.

    Non-finite values are found through the row norms (computed in float64, so a float32/16 row's
    norm is finite exactly when all its entries are): one pass over the data instead of two.
    """
    if x.ndim != 2:
        return ("shape", layer, f"shape {tuple(x.shape)}"), None
    if x.shape[0] == 0:
        return ("empty", layer, "0 real tokens"), None
    if d_model is not None and x.shape[1] != d_model:
        return ("d_model", layer, f"width {x.shape[1]} but the monitor's d_model is {d_model}"), None
    if not x.is_floating_point():
        return ("shape", layer, f"dtype {x.dtype} is not a floating type"), None
    x64 = x.to(device="cpu", dtype=torch.float64)
    norms = torch.linalg.vector_norm(x64, dim=1)
    if not bool(torch.isfinite(norms).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        return ("nonfinite", layer, f"{n_nan} NaN and {n_inf} Inf value(s)"), None
    return None, (x64, norms)


class Measurement:
    """Per-request measures of one layer's rows (no state besides the configuration)."""

    def __init__(self, config: MonitorConfig):
        self.config = config

    def validate(self, req: Request, layers: list[int], d_model: int | None):
        """Problems of the request, and each good layer's rows in float64 with their norms."""
        problems = list(req.problems)
        prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if d_model is None:  # the first request fixes the width: its first layer's
            widths = [req.acts[L].shape[-1] for L in layers if L in req.acts and req.acts[L].ndim == 2]
            d_model = widths[0] if widths else None
        if not layers and not problems:
            problems.append(("empty", None, "no activations"))
        for L in layers:
            if L not in req.acts:
                if not any(p[1] == L or p[0] == "forward_error" for p in problems):
                    problems.append(("missing_layer", L, "no activations recorded"))
                continue
            problem, rows = check_rows(req.acts[L], L, d_model)
            if problem:
                problems.append(problem)
            else:
                prepared[L] = rows
        return problems, prepared

    def sample(self, rows: torch.Tensor, request: int, layer: int) -> torch.Tensor:
        """At most ``max_positions`` rows, drawn at random (seeded by seed, request and layer)."""
        cap = self.config.max_positions
        if cap is None or rows.shape[0] <= cap:
            return rows
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + request * 1009 + layer)
        return rows[torch.randperm(rows.shape[0], generator=g)[:cap].sort().values]

    def layer_stats(self, L: int, x: torch.Tensor, norms: torch.Tensor, first: torch.Tensor | None,
                    request: int, typical: float | None) -> tuple[LayerRecord, torch.Tensor, float]:
        """Per-request metrics of one layer, the float64 rank rows for the streaming update and the
        norm sum of the non-massive rows. ``x``: the real-token rows (float64, CPU); ``norms``: theirs."""
        cfg = self.config
        n = x.shape[0]
        median, max_norm = float(norms.median()), float(norms.max())
        ref = min(median, typical) if typical else median
        massive = massive_mask(norms, cfg.massive_ratio, reference=ref)
        # ref = 0: more than half the rows are zero vectors, so every non-zero row is loud
        max_ratio = max_norm / ref if ref > 0 else (math.inf if max_norm > 0 else 1.0)
        n_massive = int(massive.sum())
        n_first = int((massive & first.to(massive.device)).sum()) if (
            n_massive and first is not None and first.shape == massive.shape) else 0
        rows = self.sample(x[~massive] if (cfg.exclude_massive and n_massive) else x, request, L)
        rec = LayerRecord(layer=L, n_tokens=n, mean_norm=float(norms.mean()), median_norm=median, max_norm=max_norm,
                          max_norm_ratio=max_ratio, massive_count=n_massive, massive_fraction=n_massive / n,
                          massive_first=n_first, rank_rows=int(rows.shape[0]),
                          massive_other_fraction=(n_massive - n_first) / n if n >= cfg.min_tokens_for_share else None)
        if rows.shape[0] >= cfg.min_tokens_for_rank:
            try:
                family = rank_family(spectrum(rows, center=True, name="request rows", layer=L), cfg.variance_threshold)
            except BandwidthInputError:  # zero variance (identical rows): no spectrum to report
                family = {}
            for key, value in family.items():
                if hasattr(rec, key):
                    setattr(rec, key, value)
        typical_sum = float(norms[~massive].sum()) if n_massive else float(norms.sum())
        return rec, rows, typical_sum


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
    max_norm_ratio: float = 0.0      # largest per-request max_norm_ratio seen

    @property
    def typical_norm(self) -> float | None:
        """Mean norm of the non-massive tokens seen so far (part of the "massive" reference)."""
        return self.typical_norm_sum / self.typical_tokens if self.typical_tokens else None

    def add(self, rec: LayerRecord, rows: torch.Tensor, typical_sum: float) -> None:
        """Count one good request's record; its rank rows enter the streaming moments."""
        if rows.shape[0]:
            self.moments.update(rows, check=False)
        self.requests += 1
        self.tokens += rec.n_tokens
        self.massive_tokens += rec.massive_count
        self.massive_first_tokens += rec.massive_first
        self.norm_sum += rec.mean_norm * rec.n_tokens
        self.typical_norm_sum += typical_sum
        self.typical_tokens += rec.n_tokens - rec.massive_count
        self.max_norm_ratio = max(self.max_norm_ratio, rec.max_norm_ratio)

    def counts(self) -> dict:
        """The counters of :meth:`BandwidthMonitor.traffic_summary`."""
        return {"layer": self.layer, "requests": self.requests, "tokens": self.tokens,
                "massive_tokens": self.massive_tokens, "massive_first_tokens": self.massive_first_tokens,
                "mean_norm": self.norm_sum / self.tokens if self.tokens else None, "max_norm_ratio": self.max_norm_ratio}


def check_block_indices(layers) -> list[int]:
    """Sorted unique block indices from a non-empty sequence of ints >= 0."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise BandwidthInputError(f"layers: expected a non-empty list of block indices, 'all' or None, got {layers!r}")
    return sorted({check_int(v, "layers: block index", low=0) for v in layers})
