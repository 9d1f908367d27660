"""Alerts of the bandwidth monitor: thresholds, their direction, and one record per change of state.

Alerts and de-duplication
=========================
``thresholds = {metric: {"warning": w, "critical": c}}`` on any per-layer metric above (either level
may be ``None``). If ``c >= w`` larger values are worse (alert when ``value >= threshold``), if
``c < w`` smaller values are worse (alert when ``value <= threshold``). Thresholds are reached
*inclusively*: a value exactly at the threshold alerts.

Each ``(metric, layer)`` has a state ``ok < warning < critical``. After every request the state
becomes the highest level whose threshold the value reaches, except that it stays at a level until
the value has cleared that level's threshold by the hysteresis margin ``hysteresis * |threshold|``
(default 0: no band). **An alert record is written only when the state changes**: once when a
condition starts (``warning`` or ``critical``), once when it escalates or de-escalates, and once
(``resolved``) when it clears. A sustained condition therefore alerts once, however many requests
it lasts. Requests where the metric is undefined (e.g. a rank for a too-short request) leave the
state unchanged. ``bad_input`` follows the same rule with value 1 (bad) / 0 (good) and a critical
threshold of 1.

"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Mapping

from ..validation import BandwidthInputError, check_int
from .measure import LAYER_METRICS

#: Default alert thresholds. These are conventions to start from, not measured consequences:
#: set your own from your traffic (``traffic_summary()`` shows what is normal for your model).
#: ``massive_other_fraction``: share of a request's tokens, other than the first token of each
#: sequence (the attention sink), whose norm is >= 4x the reference norm (module docstring).
#: ``participation_ratio`` (lower is worse): the request's variance, with massive rows left out,
#: sits in about one direction (e.g. a repeated token, or a new loud direction under the 4x bar).
DEFAULT_THRESHOLDS: dict[str, dict[str, float | None]] = {"massive_other_fraction": {"warning": 0.1, "critical": 0.25},
                                                           "participation_ratio": {"warning": 1.5, "critical": 1.1}}
LEVELS = ("ok", "warning", "critical")


def threshold_direction(warning: float | None, critical: float | None) -> str:
    """``"below"`` when smaller values are worse (``critical < warning``), else ``"above"``."""
    return "below" if (warning is not None and critical is not None and critical < warning) else "above"

@dataclass
class AlertRecord:
    """A change of alert state (see the de-duplication rule in the module docstring)."""
    request: int
    timestamp: float
    layer: int | None                # None for the request-level ``bad_input``
    metric: str
    level: str                       # "warning", "critical" or "resolved"
    value: float
    threshold: float

    @property
    def message(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "request"
        what = "cleared its threshold" if self.level == "resolved" else f"reached the {self.level} threshold"
        return f"{where}: {self.metric} = {self.value:.4g} {what} {self.threshold:.4g} (request {self.request})"

    def to_dict(self) -> dict:
        return asdict(self)


#: the keys of one entry of :meth:`BandwidthMonitor.alert_records`
ALERT_KEYS = tuple(AlertRecord.__dataclass_fields__)

def check_thresholds(thresholds, allowed) -> tuple[dict, dict]:
    """``({metric: {"warning": w, "critical": c}}, {metric: "above" | "below"})`` from the caller's
    thresholds; every metric must be one of ``allowed``."""
    if not isinstance(thresholds, Mapping):
        raise BandwidthInputError("thresholds: expected {metric: {'warning': w, 'critical': c}}")
    out, directions = {}, {}
    for metric, levels in thresholds.items():
        if metric not in allowed:
            raise BandwidthInputError(f"thresholds: unknown metric {metric!r}; choose from {allowed}")
        if not isinstance(levels, Mapping) or set(levels) - {"warning", "critical"}:
            raise BandwidthInputError(f"thresholds[{metric!r}]: expected {{'warning': w, 'critical': c}}")
        w, c = levels.get("warning"), levels.get("critical")
        for name, v in (("warning", w), ("critical", c)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise BandwidthInputError(f"thresholds[{metric!r}][{name!r}]: expected a finite number or None, got {v!r}")
        if w is None and c is None:
            raise BandwidthInputError(f"thresholds[{metric!r}]: set at least one of warning/critical")
        out[metric] = {"warning": None if w is None else float(w), "critical": None if c is None else float(c)}
        directions[metric] = threshold_direction(w, c)
    return out, directions


class AlertPolicy:
    """Thresholds and the alert state machine (module docstring): feed it each request's values,
    it returns the :class:`AlertRecord` of every change of state and keeps the last ``history_size``.

    ``thresholds``: ``{metric: {"warning": w, "critical": c}}`` (``None`` = :data:`DEFAULT_THRESHOLDS`,
    ``{}`` = no metric alerts); ``hysteresis``: relative clearing margin in [0, 1). Not thread-safe by
    itself: the monitor calls it under its lock.
    """

    def __init__(self, thresholds: Mapping[str, Mapping[str, float | None]] | None = None,
                 hysteresis: float = 0.0, history_size: int = 1000):
        if not (isinstance(hysteresis, (int, float)) and not isinstance(hysteresis, bool) and 0 <= hysteresis < 1):
            raise BandwidthInputError(f"hysteresis: expected a number in [0, 1), got {hysteresis!r}")
        self.hysteresis = float(hysteresis)
        self._thresholds, self._directions = check_thresholds(
            DEFAULT_THRESHOLDS if thresholds is None else thresholds, LAYER_METRICS)
        self.state: dict[tuple[str, int | None], int] = {}
        self.records: deque[AlertRecord] = deque(maxlen=check_int(history_size, "alert history_size", low=1))
        self.counts = Counter()    # (metric, layer, level) -> n

    @property
    def thresholds(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {"warning": w, "critical": c}}`` (a copy). Direction: :attr:`directions`."""
        return {m: dict(v) for m, v in self._thresholds.items()}

    @property
    def directions(self) -> dict[str, str]:
        """``{metric: "above" | "below"}``: whether large or small values are bad."""
        return dict(self._directions)

    def _reached(self, metric: str, value: float, thr: float | None) -> bool:
        return thr is not None and (value >= thr if self._directions[metric] == "above" else value <= thr)

    def _cleared(self, metric: str, value: float, thr: float) -> bool:
        margin = self.hysteresis * abs(thr)
        return value < thr - margin if self._directions[metric] == "above" else value > thr + margin

    def _new_level(self, metric: str, value: float, current: int) -> int:
        thr = self._thresholds[metric]
        raw = 2 if self._reached(metric, value, thr["critical"]) else (
            1 if self._reached(metric, value, thr["warning"]) else 0)
        if raw >= current:
            return raw
        # dropping: stay at the highest level (<= current) whose threshold is not yet cleared
        for level in range(current, raw, -1):
            t = thr[LEVELS[level]]
            if t is not None and not self._cleared(metric, value, t):
                return level
        return raw

    def _change(self, metric: str, layer: int | None, new: int, value: float, request: int, now: float):
        """Record a move of ``(metric, layer)`` to state ``new``; ``None`` when nothing changed."""
        current = self.state.get((metric, layer), 0)
        if new == current:
            return None
        self.state[(metric, layer)] = new
        thr = self._thresholds.get(metric, {"critical": 1.0})
        level = LEVELS[new] if new else "resolved"
        rec = AlertRecord(request, now, layer, metric, level, float(value), float(thr[LEVELS[new or current]]))
        self.records.append(rec)
        self.counts[(metric, layer, level)] += 1
        return rec

    def update(self, layer_records: Mapping, bad: bool, request: int, now: float) -> list[AlertRecord]:
        """The alert records of one request: ``layer_records`` ``{layer: record}`` (empty for a bad
        request) are checked against every threshold, then ``bad_input`` (1 bad, 0 good; critical at 1)."""
        out = []
        for L, rec in layer_records.items():
            for metric in self._thresholds:
                value = getattr(rec, metric)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue  # undefined (e.g. a rank of a too-short request): state unchanged
                new = self._new_level(metric, float(value), self.state.get((metric, L), 0))
                out.append(self._change(metric, L, new, value, request, now))
        out.append(self._change("bad_input", None, 2 if bad else 0, 1.0 if bad else 0.0, request, now))
        return [a for a in out if a is not None]
