"""The bandwidth monitor for live inference: :mod:`.core` (hooks, per-request measurements,
streaming statistics over all traffic), :mod:`.alerts` (thresholds and de-duplicated alert records)
and :mod:`.export` (JSON-lines log, Prometheus metrics, recommendations)."""
from .alerts import ALERT_KEYS, DEFAULT_THRESHOLDS, LEVELS, AlertRecord, threshold_direction
from .core import (BAD_REASONS, DEFAULT_COVARIANCE_BATCH_ROWS, DEFAULT_MAX_POSITIONS, LAYER_METRICS,
                   TIMELINE_KEYS, BandwidthMonitor, LayerRecord, LayerTraffic, RequestRecord,
                   default_layers, width_rule)

__all__ = ["ALERT_KEYS", "BAD_REASONS", "DEFAULT_COVARIANCE_BATCH_ROWS", "DEFAULT_MAX_POSITIONS",
           "DEFAULT_THRESHOLDS", "LAYER_METRICS", "LEVELS", "TIMELINE_KEYS", "AlertRecord",
           "BandwidthMonitor", "LayerRecord", "LayerTraffic", "RequestRecord", "default_layers",
           "threshold_direction", "width_rule"]
