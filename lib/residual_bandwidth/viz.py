"""Figures that are accessible by construction.

Every plotting function returns an :class:`AccessibleFigure`: the matplotlib Figure, an alt text
that states what the figure shows *in numbers*, and a table (list of dicts) with the same data, so a
screen-reader user or a text-only terminal gets the same information. Colours come from the
Okabe-Ito palette (colour-blind safe) and every series also differs by marker and line style.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

# Okabe & Ito (2008) palette: distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), "-", "--"]
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                     "legend.fontsize": 9, "figure.dpi": 100})


@dataclass
class AccessibleFigure:
    """A figure with its alt text and a table of the plotted data."""
    figure: plt.Figure
    alt_text: str
    table: list[dict] = field(default_factory=list)
    title: str = ""

    def save(self, path: str | Path, dpi: int = 120) -> Path:
        path = Path(path)
        self.figure.savefig(path, dpi=dpi, bbox_inches="tight")
        return path

    def table_text(self, max_rows: int = 40) -> str:
        """The table as fixed-width text."""
        if not self.table:
            return "(no data)"
        cols = list(self.table[0])
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        rows = [[fmt(r.get(c, "")) for c in cols] for r in self.table[:max_rows]]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        if len(self.table) > max_rows:
            lines.append(f"... {len(self.table) - max_rows} more rows")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        img = base64.b64encode(buf.getvalue()).decode()
        alt = html.escape(self.alt_text, quote=True)
        return (f'<figure><img src="data:image/png;base64,{img}" alt="{alt}"/>'
                f"<figcaption>{html.escape(self.alt_text)}</figcaption></figure>"
                f"<details><summary>Data table for: {html.escape(self.title)}</summary>"
                f"<pre>{html.escape(self.table_text())}</pre></details>")


def _style(i: int) -> dict:
    return dict(color=OKABE_ITO[i % len(OKABE_ITO)], marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)])


def plot_rank_by_layer(report) -> AccessibleFigure:
    """Effective-rank family by layer (positions with massive activations left out), plus r_p with them."""
    layers = report.layers
    p = round(100 * report.variance_threshold)
    series = {
        f"r{p} (variance rank), all positions": [m.variance_rank for m in report.all_positions],
        f"r{p}, without massive positions": [m.variance_rank for m in report.without_massive],
        "entropy effective rank": [m.entropy_rank for m in report.without_massive],
        "participation ratio": [m.participation_ratio for m in report.without_massive],
        "stable rank": [m.stable_rank for m in report.without_massive],
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(layers, ys, label=label, markersize=4, **_style(i))
    ax.set_yscale("log")
    ax.set_xlabel("layer (block index, resid_post)")
    ax.set_ylabel("dimensions (log scale)")
    title = f"How many of {report.d_model} residual dimensions are used, by layer"
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    clean = series[f"r{p}, without massive positions"]
    allp = series[f"r{p} (variance rank), all positions"]
    lo, hi = int(np.argmin(clean)), int(np.argmax(clean))
    alt = (f"Line chart over {len(layers)} layers. Without massive-activation positions, the "
           f"{p}%-variance rank ranges from {clean[lo]} (layer {layers[lo]}) to {clean[hi]} "
           f"(layer {layers[hi]}) of {report.d_model} dimensions; with them it ranges from "
           f"{min(allp)} to {max(allp)}. Participation ratio ranges "
           f"{min(series['participation ratio']):.1f}-{max(series['participation ratio']):.1f}, "
           f"stable rank {min(series['stable rank']):.2f}-{max(series['stable rank']):.2f}.")
    table = [{"layer": layers[i], **{k: (float(v[i]) if isinstance(v[i], float) else v[i])
                                     for k, v in series.items()}} for i in range(len(layers))]
    return AccessibleFigure(fig, alt, table, title)


def plot_massive_norms(report, capture) -> AccessibleFigure:
    """Median residual norm and the largest norm per layer (log scale); massive layers marked."""
    layers = report.layers
    med, top, who = [], [], []
    for layer in layers:
        norms = capture.get(report.kind, layer).norm(dim=1)
        i = int(norms.argmax())
        med.append(float(norms.median()))
        top.append(float(norms[i]))
        who.append(capture.row_label(i))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(layers, med, label="median position", **_style(0))
    ax.plot(layers, top, label="loudest position", **_style(3))
    flagged = sorted({m.layer for m in report.massive})
    if flagged:
        ax.scatter(flagged, [top[layers.index(L)] for L in flagged], s=90, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="massive activation (ring)", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("layer (block index, resid_post)")
    ax.set_ylabel("residual norm ||x|| (log scale)")
    title = "Residual norm by layer: typical vs loudest position"
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    k = int(np.argmax(np.array(top) / np.array(med)))
    alt = (f"Two lines over {len(layers)} layers, log scale. The median position's norm grows from "
           f"{med[0]:.0f} to {med[-1]:.0f}. The loudest position peaks at {top[k]:.0f} at layer "
           f"{layers[k]}, {top[k] / med[k]:.0f} times the median ({who[k]}). "
           f"{len(flagged)} layer(s) have a massive activation (ringed).")
    table = [{"layer": L, "median_norm": med[i], "max_norm": top[i], "max_over_median": top[i] / med[i],
              "loudest": who[i], "massive": L in flagged} for i, L in enumerate(layers)]
    return AccessibleFigure(fig, alt, table, title)


def write_figures(report, capture, out_dir) -> list[dict]:
    """Write every figure as PNG plus ``figures.md`` (alt texts and tables); return their index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [("rank_by_layer.png", plot_rank_by_layer(report)),
            ("norm_by_layer.png", plot_massive_norms(report, capture))]
    index, md = [], ["# Figures", ""]
    for name, af in made:
        af.save(out / name)
        plt.close(af.figure)
        index.append({"file": name, "title": af.title, "alt_text": af.alt_text})
        md += [f"## {af.title}", "", f"![{af.alt_text}]({name})", "", af.alt_text, "",
               "```", af.table_text(), "```", ""]
    (out / "figures.md").write_text("\n".join(md))
    return index
