"""Every figure of a report at once: build them, or write them (PNG, CSV table, figures.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..validation import BandwidthInputError
from .analytics import (plot_bottleneck_heatmap, plot_composition_scores, plot_compression_curve,
                        plot_memory_ranking, plot_wov_spectra)
from .bandwidth import (plot_cumulative_variance, plot_massive_norms, plot_norm_heatmap, plot_rank_by_layer,
                        plot_singular_spectra, plot_utilization_by_layer)
from .core import AccessibleFigure
from .monitor import plot_monitor_timeline


# =============================================================================================
# Writing every figure
# =============================================================================================
def _md_alt(text: str) -> str:
    """Alt text safe inside ``![...](...)``."""
    return text.replace("\n", " ").replace("[", "(").replace("]", ")")


#: (key of ``analytics``, file stem, figure function) of the analytics figures drawn from one record list
_ANALYTICS_FIGURES = (("bottlenecks", "bottleneck_heatmap", lambda r: plot_bottleneck_heatmap(r, prompt=None)),
                      ("wov_heads", "wov_spectra", plot_wov_spectra),
                      ("memory_ranking", "memory_ranking", plot_memory_ranking))


def build_figures(report=None, capture=None, *, analytics: Mapping | None = None,
                  monitor: Mapping | None = None, prompt: int = 0) -> list[tuple[str, AccessibleFigure]]:
    """Every figure the inputs allow, as ``(file stem, AccessibleFigure)`` pairs.

    ``analytics`` may hold any of: ``"bottlenecks"`` (records), ``"wov_heads"`` (head records),
    ``"memory_ranking"`` (ranking records), ``"composition"`` (one composition dict or a list of
    them), ``"compression"`` (``{"records": [...], "base_loss": x, "tolerance": t, "d_model": d}``).
    ``monitor`` may hold ``{"records": [...], "alerts": [...], "thresholds": {...}, "directions": {...}}``
    (from ``BandwidthMonitor``: ``timeline_records()``, ``alert_records()``, ``thresholds``,
    ``threshold_directions``).
    """
    made: list[tuple[str, AccessibleFigure]] = []
    if report is not None:
        made += [("rank_by_layer", plot_rank_by_layer(report)),
                 ("utilization_by_layer", plot_utilization_by_layer(report)),
                 ("singular_spectra", plot_singular_spectra(report)),
                 ("cumulative_variance", plot_cumulative_variance(report))]
        if capture is not None:
            made += [("norm_by_layer", plot_massive_norms(report, capture)),
                     ("norm_heatmap", plot_norm_heatmap(capture, report, prompt=prompt))]
    analytics = analytics or {}
    if not isinstance(analytics, Mapping):
        raise BandwidthInputError(f"analytics: expected a dict, got {type(analytics).__name__}")
    made += [(stem, plot(analytics[key])) for key, stem, plot in _ANALYTICS_FIGURES if analytics.get(key) is not None]
    comp = analytics.get("composition")
    comps = [] if comp is None else [comp] if isinstance(comp, Mapping) else list(comp)
    # plotted first: the plot checks that each is a composition dict before its kind names the file
    made += [(f"composition_{str(c['kind']).lower()}", af) for c, af in zip(comps, map(plot_composition_scores, comps))]
    cc = analytics.get("compression")
    if cc is not None:
        if not isinstance(cc, Mapping):
            raise BandwidthInputError("analytics['compression']: expected {'records': [...], 'base_loss': ..., "
                                      "'tolerance': ...}")
        made.append(("compression_curve", plot_compression_curve(
            cc.get("records"), base_loss=cc.get("base_loss"), tolerance=cc.get("tolerance"),
            d_model=cc.get("d_model"))))
    if monitor is not None:
        if not isinstance(monitor, Mapping):
            raise BandwidthInputError(f"monitor: expected a dict, got {type(monitor).__name__}")
        made.append(("monitor_timeline", plot_monitor_timeline(
            monitor.get("records"), monitor.get("alerts"), monitor.get("thresholds"),
            directions=monitor.get("directions"))))
    return made


def write_figures(report, capture, out_dir, *, analytics: Mapping | None = None,
                  monitor: Mapping | None = None, prompt: int = 0, dpi: int = 120) -> list[dict]:
    """Write every figure as PNG, its full table as CSV, and ``figures.md`` (alt texts and tables).

    Returns the index: one dict per figure with ``file``, ``csv``, ``title``, ``alt_text``.
    Each figure is closed after saving. See :func:`build_figures` for ``analytics`` / ``monitor``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, md = [], ["# Figures", "",
                     "Every figure with its alt text (also the image's alt attribute) and its data table.", ""]
    for stem, af in build_figures(report, capture, analytics=analytics, monitor=monitor, prompt=prompt):
        name, table_name = f"{stem}.png", f"{stem}.csv"
        try:
            af.save(out / name, dpi=dpi)
            af.write_csv(out / table_name)
        finally:
            af.close()
        index.append({"file": name, "csv": table_name, "title": af.title, "alt_text": af.alt_text})
        md += [f"## {af.title}", "", f"![{_md_alt(af.alt_text)}]({name})", "", af.alt_text, "",
               af.table_markdown(), "", f"Full table: [{table_name}]({table_name})", ""]
    (out / "figures.md").write_text("\n".join(md))
    return index


