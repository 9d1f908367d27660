"""The seed lesson's names, kept so its code still runs: every compatibility alias lives here.

* ``ProductionBandwidthMonitor`` is :class:`~residual_bandwidth.monitor.BandwidthMonitor`.
* ``BandwidthVisualizer`` is a thin namespace over the :mod:`residual_bandwidth.viz` functions.
* ``BandwidthMetrics.effective_rank`` is *deprecated*: the seed used it for the variance-threshold
  rank ``r_p`` (:attr:`~residual_bandwidth.metrics.BandwidthMetrics.variance_rank`), while the field
  (Roy & Vetterli 2007) calls ``exp(entropy)`` the effective rank
  (:attr:`~residual_bandwidth.metrics.BandwidthMetrics.entropy_rank`). Reading it warns and returns
  ``variance_rank``; say which one you mean.
"""
from __future__ import annotations

import functools
import warnings

from .metrics import BandwidthMetrics
from .monitor import BandwidthMonitor

ProductionBandwidthMonitor = BandwidthMonitor


def _effective_rank(self: BandwidthMetrics) -> int:
    warnings.warn("BandwidthMetrics.effective_rank is deprecated: it is the seed's name for "
                  "variance_rank (the variance-threshold rank r_p), not the entropy effective rank "
                  "(entropy_rank); use one of those two names", DeprecationWarning, stacklevel=2)
    return self.variance_rank


BandwidthMetrics.effective_rank = property(_effective_rank, doc=_effective_rank.__doc__)


def __getattr__(name):
    if name == "BandwidthVisualizer":  # matplotlib is imported on first use only
        return _visualizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _visualizer():
    from . import viz
    methods = {n: staticmethod(getattr(viz, n)) for n in dir(viz) if n.startswith("plot_")}
    methods["write_figures"] = staticmethod(viz.write_figures)
    #: the seed's name for the monitor timeline
    methods["plot_bandwidth_utilization_timeline"] = staticmethod(viz.plot_monitor_timeline)
    methods["__doc__"] = ("The seed lesson's name, a thin namespace over residual_bandwidth.viz. Its "
                          "plot_subspace_specialization (bars over coordinate slices) has no replacement "
                          "on purpose: the residual stream has no privileged basis.")
    return type("BandwidthVisualizer", (), methods)
