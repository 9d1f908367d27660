"""residual_bandwidth: measure how a transformer uses its residual stream (lesson 03.2).

The lesson's ideas, one module each:
  capture      resid_pre / resid_mid / resid_post / attn_out / mlp_out per layer (the one hook table);
               run_listeners: one forward pass feeds every analysis of the same prompts
  metrics      the effective-rank family, spectra, principal directions, the noise floor
  outliers     massive activations (the one massive rule) and outlier dimensions
  analyzer     per-layer bandwidth reports (ResidualBandwidthAnalyzer)
  weights      per-head / per-neuron weights in the residual basis (W_OV, W_QK; norms folded)
  bottlenecks  crowded (layer, position) cells: energy x spread, basis-free
  memory       memory management: eraser heads and neurons, write-vs-read erasure
  composition  Q/K/V composition scores with a random baseline, principal angles
  compression  the measured compression curve (loss and KL vs k)
  run          ResidualRun: one model run over prompts, read by every analysis (an ActivationCache)
  streaming    running mean and covariance (Welford / Chan) in constant memory
  validation   strict input checks with messages that name the problem
Plumbing, in subpackages:
  monitor/     BandwidthMonitor on live inference, from parts: measure, alerts, export (JSON lines, Prometheus)
  viz/         accessible figures: core (container, palette, styling), then the figure families
  course/      lesson metadata, model loading, the report job (make lesson), the CLI, the explorer,
               the lesson's checked claims
  compat       the seed lesson's names (ProductionBandwidthMonitor, BandwidthVisualizer, effective_rank)
"""
from .analyzer import BandwidthReport, ResidualBandwidthAnalyzer
from .bottlenecks import BottleneckReport, find_bottlenecks, heldout_spread, layer_scores, severity
from .capture import (KINDS, Listener, ResidualCapture, ResidualRecorder, architecture_of, capture_residuals,
                      hook_name, model_dims, run_listeners)
from .composition import (CompositionScores, component_subspaces, composition_scores, pair_significance,
                          principal_angles)
from .compression import (CALIBRATION_PROMPTS, HELDOUT_PROMPTS, CompressionCurve, compression_curve,
                          project_residual)
from .memory import (ErasureMeter, MemoryReport, combined_ranking, direction_erasure,
                     head_records, memory_management, neg_share, neuron_cosines)
from .metrics import (BandwidthMetrics, Spectrum, anisotropy, compute_metrics, entropy_effective_rank,
                      participation_ratio, principal_directions, rank_family, spectral_entropy, spectrum,
                      stable_rank, variance_threshold_rank)
from .compat import ProductionBandwidthMonitor
from .convergence import plot_rank_against_n, rank_against_n
from .course.models import EMBEDDED, LoadedModel, ModelUnavailableError, load_model
from .monitor import AlertPolicy, BandwidthMonitor, JsonLinesLog, MonitorConfig, PrometheusExporter
from .outliers import (MassiveActivation, OutlierDimension, coordinate_massive_mask, massive_mask, massive_rows,
                       outlier_dimensions)
from .run import ResidualRun
from .superposition import plot_superposition, sparsity_sweep
from .streaming import LayerStreamer, StreamedLayers, StreamingMoments, stream_layer_statistics
from .validation import BandwidthInputError
from .weights import LayerWeights, all_layer_weights, layer_weights

__version__ = "0.1.0"

# Plotting and the widget explorer import matplotlib / ipywidgets: load them on first use only.
_LAZY = {
    "AccessibleFigure": "viz", "BandwidthVisualizer": "compat",
    "explore": "course.explorer", "explorer_update": "course.explorer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # capture and the one shared forward pass
    "KINDS", "Listener", "ResidualCapture", "ResidualRecorder", "architecture_of", "capture_residuals",
    "hook_name", "model_dims", "run_listeners",
    # metrics, massive activations, reports
    "BandwidthMetrics", "Spectrum", "anisotropy", "compute_metrics", "entropy_effective_rank",
    "participation_ratio", "principal_directions", "rank_family", "spectral_entropy", "spectrum",
    "stable_rank", "variance_threshold_rank", "MassiveActivation", "OutlierDimension", "coordinate_massive_mask", "massive_mask",
    "massive_rows", "outlier_dimensions", "BandwidthReport", "ResidualBandwidthAnalyzer",
    # one run, read by the analyses
    "ResidualRun", "LayerWeights", "all_layer_weights", "layer_weights", "BottleneckReport", "find_bottlenecks",
    "heldout_spread", "layer_scores", "severity", "direction_erasure", "ErasureMeter", "MemoryReport", "combined_ranking",
    "head_records", "memory_management", "neg_share", "neuron_cosines", "CompositionScores",
    "component_subspaces", "composition_scores", "pair_significance", "principal_angles",
    "CALIBRATION_PROMPTS", "HELDOUT_PROMPTS", "CompressionCurve", "compression_curve", "project_residual",
    # how r95 grows with the sample; a toy model of superposition
    "rank_against_n", "plot_rank_against_n", "sparsity_sweep", "plot_superposition",
    # streaming and the live monitor
    "LayerStreamer", "StreamedLayers", "StreamingMoments", "stream_layer_statistics", "AlertPolicy",
    "BandwidthMonitor", "JsonLinesLog", "MonitorConfig", "PrometheusExporter", "ProductionBandwidthMonitor",
    # models, errors, lazily loaded names
    "EMBEDDED", "LoadedModel", "ModelUnavailableError", "load_model", "BandwidthInputError",
    *_LAZY,
]
