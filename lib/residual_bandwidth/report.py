"""The lesson's main job: capture a model's residual stream on a few prompts and report its bandwidth.

``run_bandwidth_job`` is what ``make lesson`` and ``python -m residual_bandwidth analyze`` run. It
writes ``report.json`` (every number), ``table.txt`` (the per-layer table), and figures with their
alt texts into an output folder, and returns the report dict.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from .analyzer import ResidualBandwidthAnalyzer
from .capture import capture_residuals, model_dims
from .models import load_model

# The seed lesson's sentence first; the others add code, numbers and a question so the spectrum is
# not estimated from one register of English only.
DEFAULT_PROMPTS = [
    "The transformer architecture revolutionized natural language processing by introducing "
    "attention mechanisms.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC on July 21.",
    "Why does ice float on water? Because solid water is less dense than liquid water.",
    "She opened the old wooden door slowly, and the smell of rain and pine filled the room.",
]


def bottleneck_ratios(dims: dict) -> dict:
    """How many dimensions write into / read from the residual stream, relative to d_model.

    Per block, the MLP has ``d_mlp`` neurons that each read and write one direction of the
    ``d_model``-dimensional stream, and attention has ``n_heads * d_head`` value dimensions. Over
    the whole model every component of every layer shares the same stream.
    """
    d, L = dims["d_model"], dims["n_layers"]
    attn = dims["n_heads"] * dims["d_head"]
    per_block = dims["d_mlp"] + attn
    return {
        "mlp_neurons_per_d_model": dims["d_mlp"] / d,
        "attention_value_dims_per_d_model": attn / d,
        "block_writer_dims_per_d_model": per_block / d,
        "model_writer_dims": L * per_block,
        "model_writer_dims_per_d_model": L * per_block / d,
        "formula": "per block: (d_mlp + n_heads*d_head) / d_model; whole model: n_layers * that",
    }


def run_bandwidth_job(model: str = "embedded", prompts: Sequence[str] | None = None,
                      out_dir: str | Path = "out", kind: str = "resid_post",
                      variance_threshold: float = 0.95, massive_ratio: float = 4.0,
                      exclude_massive: bool = True, figures: bool = True, progress: bool = True,
                      loaded=None) -> dict:
    """Capture, analyse, print the table and write report.json / table.txt / figures to ``out_dir``."""
    t0 = time.perf_counter()
    prompts = list(prompts or DEFAULT_PROMPTS)
    lm = loaded or load_model(model)
    cap = capture_residuals(lm.model, lm.tokenizer, prompts, progress=progress)
    analyzer = ResidualBandwidthAnalyzer(variance_threshold, massive_ratio=massive_ratio,
                                         exclude_massive=exclude_massive)
    rep = analyzer.analyze_layers(cap, kind=kind)
    dims = model_dims(lm.model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"name": lm.name, "source": lm.source, "load_seconds": round(lm.load_seconds, 2), **dims},
        "bottleneck_ratios": bottleneck_ratios(dims),
        "prompts": prompts,
        "n_tokens": cap.n_rows,
        "bandwidth": rep.to_dict(),
    }
    table = rep.table()
    (out / "table.txt").write_text(table + "\n")
    if figures:
        from .viz import write_figures
        report["figures"] = write_figures(rep, cap, out)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def summary_lines(report: dict) -> list[str]:
    """A short human summary of a report (printed by the CLI under the table)."""
    m, b, r = report["model"], report["bandwidth"], report["bottleneck_ratios"]
    lines = [f"model: {m['name']} ({m['source']}), {m['n_layers']} layers, d_model {m['d_model']}, "
             f"d_mlp {m['d_mlp']}, {m['n_heads']} heads x {m['d_head']}",
             f"bottleneck: each block has {r['block_writer_dims_per_d_model']:.1f}x d_model writer "
             f"dimensions; the whole model {r['model_writer_dims']} = {r['model_writer_dims_per_d_model']:.0f}x d_model",
             f"{report['n_tokens']} tokens from {len(report['prompts'])} prompts"]
    pos = b["massive_positions"]
    if pos:
        worst = max(b["massive_activations"], key=lambda a: a["ratio"])
        where = ", ".join(f"prompt {p['prompt']} pos {p['position']} {p['token']!r}" for p in pos[:4])
        lines.append(
            f"massive activations at {len(pos)} position(s) ({where}{', ...' if len(pos) > 4 else ''}); "
            f"largest: layer {worst['layer']}, "
            f"{worst['ratio']:.0f}x the median norm, dimension {worst['top_dims'][0][0]} holds "
            f"{worst['top_dims'][0][2]:.0%} of its energy")
    else:
        lines.append("no massive activations at this threshold")
    return lines
