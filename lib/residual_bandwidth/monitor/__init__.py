"""The bandwidth monitor for live inference, from parts: :mod:`.measure` (per-request records and
streaming statistics over all traffic, :class:`MonitorConfig`), :mod:`.alerts` (:class:`AlertPolicy`:
thresholds and de-duplicated alert records), :mod:`.export` (:class:`JsonLinesLog`,
:class:`PrometheusExporter`, recommendations) and :mod:`.core` (:class:`BandwidthMonitor`: hooks,
one lock and the history, composing the three)."""
from .alerts import ALERT_KEYS, DEFAULT_THRESHOLDS, LEVELS, AlertPolicy, AlertRecord, threshold_direction
from .core import BandwidthMonitor
from .export import JsonLinesLog, PrometheusExporter
from .measure import (BAD_REASONS, DEFAULT_COVARIANCE_BATCH_ROWS, DEFAULT_MAX_POSITIONS, LAYER_METRICS,
                      TIMELINE_KEYS, LayerRecord, LayerTraffic, MonitorConfig, RequestRecord, default_layers)
from ..convergence import width_rule

__all__ = ["ALERT_KEYS", "BAD_REASONS", "DEFAULT_COVARIANCE_BATCH_ROWS", "DEFAULT_MAX_POSITIONS",
           "DEFAULT_THRESHOLDS", "LAYER_METRICS", "LEVELS", "TIMELINE_KEYS", "AlertPolicy", "AlertRecord",
           "BandwidthMonitor", "JsonLinesLog", "LayerRecord", "LayerTraffic", "MonitorConfig",
           "PrometheusExporter", "RequestRecord", "default_layers", "threshold_direction", "width_rule"]
