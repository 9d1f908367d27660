"""residual_bandwidth: measure how a transformer uses its residual stream (lesson 03.2).

One module per idea:
  validation  strict input checks with messages that name the problem
  models      load the embedded offline model, a hub id or a local path
  capture     resid_pre / resid_mid / resid_post / attn_out / mlp_out per layer
  metrics     the effective-rank family (formulas in the docstrings)
  outliers    massive activations and outlier dimensions
  analyzer    per-layer bandwidth reports (ResidualBandwidthAnalyzer)
  viz         accessible figures (alt text + data table with every plot)
  report      the lesson's main job (make lesson)
"""
from .analyzer import BandwidthReport, ResidualBandwidthAnalyzer
from .capture import KINDS, ResidualCapture, capture_residuals, hook_name, model_dims
from .metrics import (BandwidthMetrics, Spectrum, anisotropy, compute_metrics, entropy_effective_rank,
                      participation_ratio, spectral_entropy, spectrum, stable_rank,
                      variance_threshold_rank)
from .models import EMBEDDED, LoadedModel, ModelUnavailableError, load_model
from .outliers import MassiveActivation, OutlierDimension, massive_rows, outlier_dimensions
from .validation import BandwidthInputError

__version__ = "0.1.0"
