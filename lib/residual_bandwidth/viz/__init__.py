"""Accessible figures: :mod:`.core` (the :class:`AccessibleFigure` container, palettes, formatting,
``rc_context`` styling), then the figure families :mod:`.bandwidth` (LO1 report), :mod:`.analytics`
(bottlenecks, memory, composition, compression), :mod:`.monitor` (timeline) and :mod:`.files`
(every figure of a report, written to a folder)."""
from .core import (AccessibleFigure, HEATMAP_CMAP, LINESTYLES, MARKERS, MIN_FONT, OKABE_ITO, STYLE,
                   format_number, format_percent, format_ranges, styled, token_label)
from .bandwidth import (plot_cumulative_variance, plot_layer_explorer, plot_massive_norms, plot_norm_heatmap,
                        plot_rank_by_layer, plot_singular_spectra, plot_utilization_by_layer, report_rows)
from .monitor import (ALERT_GLYPHS, plot_monitor_timeline)
from .analytics import (COMPOSITION_KEYS, COMPRESSION_KEYS, SEVERITY_GLYPHS, plot_bottleneck_heatmap,
                        plot_composition_scores, plot_compression_curve, plot_memory_ranking,
                        plot_wov_spectra)
from .files import (build_figures, write_figures)

__all__ = ["AccessibleFigure", "HEATMAP_CMAP", "LINESTYLES", "MARKERS", "MIN_FONT", "OKABE_ITO", "STYLE",
           "format_number", "format_percent", "format_ranges", "styled", "token_label",
           "plot_cumulative_variance", "plot_layer_explorer", "plot_massive_norms", "plot_norm_heatmap",
           "plot_rank_by_layer", "plot_singular_spectra", "plot_utilization_by_layer", "report_rows",
           "ALERT_GLYPHS", "plot_monitor_timeline", "COMPOSITION_KEYS", "COMPRESSION_KEYS", "SEVERITY_GLYPHS",
           "plot_bottleneck_heatmap", "plot_composition_scores", "plot_compression_curve", "plot_memory_ranking",
           "plot_wov_spectra", "build_figures", "write_figures"]
