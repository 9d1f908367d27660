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
from dataclasses import asdict, dataclass
from typing import Mapping

from ..validation import BandwidthInputError

#: Default alert thresholds. These are conventions to start from, not measured consequences:
#: set your own from your traffic (``traffic_summary()`` shows what is normal for your model).
#: ``massive_other_fraction``: share of a request's tokens, other than the first token of each
#: sequence (the attention sink), whose norm is >= 4x the reference norm (module docstring).
#: ``participation_ratio`` (lower is worse): the request's variance, with massive rows left out,
#: sits in about one direction (e.g. a repeated token, or a new loud direction under the 4x bar).
DEFAULT_THRESHOLDS: dict[str, dict[str, float | None]] = {
    "massive_other_fraction": {"warning": 0.1, "critical": 0.25},
    "participation_ratio": {"warning": 1.5, "critical": 1.1},
}
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
        if self.level == "resolved":
            return (f"{where}: {self.metric} = {self.value:.4g} cleared its threshold "
                    f"{self.threshold:.4g} (request {self.request})")
        return (f"{where}: {self.metric} = {self.value:.4g} reached the {self.level} threshold "
                f"{self.threshold:.4g} (request {self.request})")

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


class AlertsMixin:
    """The alert state machine of :class:`~residual_bandwidth.monitor.BandwidthMonitor` (module
    docstring). Uses the monitor's ``_thresholds``, ``_directions``, ``hysteresis``, ``_alert_state``
    and ``_alerts``."""

    @property
    def thresholds(self) -> dict[str, dict[str, float | None]]:
        """``{metric: {"warning": w, "critical": c}}`` (a copy). Direction: :attr:`threshold_directions`."""
        return {m: dict(v) for m, v in self._thresholds.items()}

    @property
    def threshold_directions(self) -> dict[str, str]:
        """``{metric: "above" | "below"}``: whether large or small values are bad."""
        return dict(self._directions)

    # ---- alerts ----------------------------------------------------------------------------
    def _reached(self, metric: str, value: float, thr: float | None) -> bool:
        if thr is None:
            return False
        return value >= thr if self._directions[metric] == "above" else value <= thr

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

    def _update_alert(self, metric: str, layer: int | None, value, request: int, now: float) -> list[AlertRecord]:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return []
        key = (metric, layer)
        current = self._alert_state.get(key, 0)
        new = self._new_level(metric, float(value), current)
        if new == current:
            return []
        self._alert_state[key] = new
        thr = self._thresholds[metric]
        if new == 0:
            threshold = thr[LEVELS[current]]
            level = "resolved"
        else:
            threshold, level = thr[LEVELS[new]], LEVELS[new]
        return [AlertRecord(request, now, layer, metric, level, float(value), float(threshold))]

    def _update_bad_alert(self, value: float, request: int, now: float) -> list[AlertRecord]:
        key = ("bad_input", None)
        current = self._alert_state.get(key, 0)
        new = 2 if value >= 1 else 0
        if new == current:
            return []
        self._alert_state[key] = new
        return [AlertRecord(request, now, None, "bad_input", "critical" if new else "resolved", value, 1.0)]

    def alert_records(self) -> list[dict]:
        """``[{request, timestamp, layer, metric, level, value, threshold}, ...]`` (ring buffer)."""
        with self._lock:
            return [a.to_dict() for a in self._alerts]
