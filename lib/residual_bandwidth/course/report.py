"""The lesson's main job: capture a model's residual stream on a few prompts and report its bandwidth.

``run_bandwidth_job`` is what ``make lesson`` and ``python -m residual_bandwidth analyze`` run. It
writes ``report.json`` (every number), ``table.txt`` (the per-layer table), and figures with their
alt texts into an output folder, and returns the report dict. Its ``"analytics"`` section (bottlenecks,
memory management, composition, measured compression curve) comes from
:func:`run_analytics`; the full analytics records go to ``analytics.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from ..capture import KINDS, model_dims, torch_threads
from ..composition import pair_significance
from ..compression import CALIBRATION_PROMPTS
from ..run import ResidualRun
from ..validation import check_prompts
from .models import load_model

# The first six calibration prompts: the seed lesson's sentence first; the others add code, numbers
# and a question so the spectrum is not estimated from one register of English only.
DEFAULT_PROMPTS = CALIBRATION_PROMPTS[:6]


def bottleneck_ratios(dims: dict) -> dict:
    """How many dimensions write into / read from the residual stream, relative to d_model.

    Per block, the MLP has ``d_mlp`` neurons that each read and write one direction of the
    ``d_model``-dimensional stream, and attention has ``n_heads * d_head`` value dimensions. Over
    the whole model every component of every layer shares the same stream.
    """
    d, L = dims["d_model"], dims["n_layers"]
    attn = dims["n_heads"] * dims["d_head"]
    per_block = dims["d_mlp"] + attn
    return {"mlp_neurons_per_d_model": dims["d_mlp"] / d, "attention_value_dims_per_d_model": attn / d,
            "block_writer_dims_per_d_model": per_block / d, "model_writer_dims": L * per_block,
            "model_writer_dims_per_d_model": L * per_block / d,
            "formula": "per block: (d_mlp + n_heads*d_head) / d_model; whole model: n_layers * that"}


def _spread_layers(n_layers: int, count: int) -> list[int]:
    """``count`` block indices spread over the depth, avoiding the first and last block."""
    if n_layers <= count:
        return list(range(n_layers))
    step = n_layers / count
    return sorted({min(n_layers - 1, int(step * (i + 0.5))) for i in range(count)})


def analytics_plan(dims: dict, fast: bool) -> dict:
    """Which layers / subspace sizes the analytics section measures (``fast``: fewer).

    The costs: every compression point is one forward pass on the held-out prompts (plus one per
    random draw); composition costs grow with the square of the number of heads, so the job scores
    every other layer (every third when ``fast``) and draws the heatmaps for a window of six
    consecutive layers. ``composition_scores(model, kind)`` scores all layers when you need them.
    """
    d, n = dims["d_model"], dims["n_layers"]
    fractions = (2 / 9, 2 / 3, 1.0) if fast else (1 / 9, 1 / 3, 5 / 9, 7 / 9, 1.0)
    ks = sorted({max(1, round(f * d)) for f in fractions})
    window = list(range(max(0, n // 2 - 3), min(n, n // 2 + 3)))
    return {"compression_layers": _spread_layers(n, 2 if fast else 3), "compression_ks": ks,
            "compression_n_random": 1, "composition_layers": list(range(0, n, 3 if fast else 2)),
            "composition_figure_layers": window, "composition_kinds": ["Q", "K", "V"]}


def run_analytics(run, fast: bool = False, progress: bool = True, threads: int | None = None) -> tuple[dict, dict]:
    """The bandwidth analytics of a :class:`~residual_bandwidth.run.ResidualRun` (all kinds, all
    layers): bottlenecks, memory-management candidates, composition scores vs baseline, compression curve.

    Forward passes: the memory module reads the run's one pass (capture and write-vs-read
    projections); when the run's prompts are the compression curve's calibration prompts, the fit
    reads the run's capture too. What remains are the compression curve's held-out evaluations.
    Weights are extracted once, by the run.

    Returns ``(summary, figure_inputs)``: ``summary`` is the ``"analytics"`` section of report.json;
    ``figure_inputs`` holds the full records in the shape :func:`viz.build_figures` takes
    (``bottlenecks``, ``wov_heads``, ``memory_ranking``, ``composition``, ``compression``) and is
    written to ``analytics.json``.

    ``threads``: torch intra-op threads while it runs (restored afterwards). Default ``None`` keeps
    torch's setting: on an idle 2-core machine two threads took 13.7-14.2 s against 22.2-23.0 s
    with one. ``threads=1`` helps where the cores are busy with other jobs: there two OpenMP threads
    cost several times the CPU time of one (BENCHMARKS.md).
    """
    with torch_threads(threads):
        return _run_analytics(run, fast, progress)


def _run_analytics(run, fast, progress):
    plan = analytics_plan(model_dims(run.model), fast)
    seconds, out = {}, {"fast": fast, "plan": plan}
    t = time.perf_counter()
    bn = run.bottlenecks()
    out["bottlenecks"] = {**{k: v for k, v in bn.to_dict().items() if k not in ("grid", "out_of_sample")},
                          "flagged": bn.flagged()[:20], "out_of_sample": bn.out_of_sample[:20]}
    seconds["bottlenecks"] = time.perf_counter() - t

    t = time.perf_counter()
    mem = run.memory()
    heads_by_neg = sorted(mem.heads, key=lambda r: -r["neg_share"])[:10]
    head_keys = ("layer", "head", "kv_head", "neg_share", "current_token_attention")
    out["memory"] = {
        "ranking": mem.ranking, "heads_top_neg_share": [{k: r[k] for k in head_keys} for r in heads_by_neg],
        "neurons": mem.neuron_records(per_layer=1),
        "erasure": [r for r in mem.erasure.records() if r["component"] in ("attn", "mlp")],
        "energy_loss": [r for r in mem.energy_loss if r["rank"] == 1], "notes": mem.notes}
    seconds["memory"] = time.perf_counter() - t

    t = time.perf_counter()
    comps = [run.composition(k, plan["composition_layers"]) for k in plan["composition_kinds"]]
    out["composition"] = {c.kind: c.summary() for c in comps}
    window = plan["composition_figure_layers"]     # the figures' pairs, against their own family-wise threshold
    sigs = {k: pair_significance(run.composition(k, window), run.weights_of(window)) for k in plan["composition_kinds"]}
    out["composition_window"] = {"layers": window, **{k: {n: v for n, v in g.to_dict().items() if n != "null_max"}
                                                      for k, g in sigs.items()}}
    seconds["composition"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration = run if run.prompts == CALIBRATION_PROMPTS and "resid_post" in run.kinds else ResidualRun(
        run.model, run.tokenizer, CALIBRATION_PROMPTS, kinds=["resid_post"], layers=plan["compression_layers"],
        erasure=False, massive_ratio=run.massive_ratio)
    curve = calibration.compression(plan["compression_layers"], plan["compression_ks"],
                                    n_random=plan["compression_n_random"], progress=progress)
    out["compression"] = curve.to_dict()
    seconds["compression"] = time.perf_counter() - t
    out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}

    def rounded(c):  # composition matrices: 6 significant digits keep analytics.json small
        return {**c.to_dict(), "scores": [[float(f"{v:.6g}") for v in row] for row in c.scores.tolist()]}

    figure_inputs = {"bottlenecks": bn.grid_records(), "wov_heads": mem.heads, "memory_ranking": mem.ranking,
                     "composition": [{**rounded(run.composition(k, window)), "threshold": sigs[k].threshold,
                                      "threshold_label": f"family-wise threshold ({sigs[k].false_alarm_rate:.0%})"}
                                     for k in plan["composition_kinds"]],
                     "compression": {"records": curve.records(), "base_loss": curve.base_loss,
                                     "tolerance": curve.tolerance, "d_model": curve.d_model}}
    return out, figure_inputs


def run_bandwidth_job(model: str = "embedded", prompts: Sequence[str] | None = None,
                      out_dir: str | Path = "out", kind: str = "resid_post",
                      variance_threshold: float = 0.95, massive_ratio: float = 4.0,
                      exclude_massive: bool = True, figures: bool = True, progress: bool = True,
                      loaded=None, fast: bool = False, analytics: bool = True,
                      threads: int | None = None) -> dict:
    """Capture, analyse, print the table and write report.json / table.txt / figures to ``out_dir``.

    ``analytics`` adds the ``"analytics"`` section (:func:`run_analytics`), ``analytics.json`` (the full
    records, the input of ``python -m residual_bandwidth figures --analytics-json``) and the analytics
    figures; ``fast`` measures fewer layers and subspace sizes there; ``threads``: see
    :func:`run_analytics`.
    """
    t0 = time.perf_counter()
    prompts = check_prompts(list(prompts or DEFAULT_PROMPTS))
    lm = loaded or load_model(model)
    # store only what is read: the report's kind, and resid_pre / resid_post for the analytics; one
    # forward pass gives the capture and (for the analytics) the memory module's write-vs-read meter
    kinds = sorted({kind, "resid_pre", "resid_post"} if analytics else {kind}, key=KINDS.index)
    run = ResidualRun(lm.model, lm.tokenizer, prompts, kinds=kinds, erasure=analytics,
                      massive_ratio=massive_ratio, progress=progress)
    cap = run.capture
    rep = run.report(variance_threshold, kind=kind, exclude_massive=exclude_massive)
    dims = model_dims(lm.model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure_inputs = None
    if analytics:
        summary, figure_inputs = run_analytics(run, fast=fast, progress=progress, threads=threads)
        (out / "analytics.json").write_text(json.dumps(figure_inputs))
    report = {"model": {"name": lm.name, "source": lm.source, "load_seconds": round(lm.load_seconds, 2), **dims},
              "bottleneck_ratios": bottleneck_ratios(dims), "prompts": prompts, "n_tokens": cap.n_rows,
              "bandwidth": rep.to_dict()}
    table = rep.table()
    (out / "table.txt").write_text(table + "\n")
    if figures:
        from ..viz import write_figures
        report["figures"] = write_figures(rep, cap, out, analytics=figure_inputs)
    if analytics:
        report["analytics"] = summary
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
            f"massive rows at {len(pos)} position(s) ({where}{', ...' if len(pos) > 4 else ''}); "
            f"largest: layer {worst['layer']}, {worst['ratio']:.0f}x the median norm, "
            f"dimension {worst['top_dims'][0][0]} holds {worst['top_dims'][0][2]:.0%} of its energy")
    else:
        lines.append("no massive rows at this threshold")
    if "analytics" in report:
        lines += analytics_lines(report["analytics"])
    return lines


def analytics_lines(a: dict) -> list[str]:
    """Short summary of the analytics section (bottlenecks, memory, composition, compression)."""
    bn, mem, comp, cc = a["bottlenecks"], a["memory"], a["composition"], a["compression"]
    c, slope = bn["counts"], bn["utilization_slope"]
    lines = [f"bottlenecks (layer x position): {c['critical']} critical, {c['warning']} warning "
             f"(out of sample: {bn['n_confirmed']} confirmed, {bn['n_massive_elsewhere']} massive at another layer), "
             f"{c['massive']} massive (layer, position) cells (not bottlenecks); utilization/d "
             + (f"grows {slope:+.4f} per layer" if slope is not None else
                f"per layer not judgeable (fewer than d_model + 1 = {bn['d_model'] + 1} non-massive rows)")]
    best = {}
    for r in mem["ranking"]:
        best.setdefault(r["kind"], r)
    parts = []
    if "head" in best:
        r, ev = best["head"], best["head"]["evidence"]
        cta = ev.get("current_token_attention")
        parts.append(f"head {r['component']} ({r['score']:.2f}: W_OV negative share {ev['neg_share']:.2f}"
                     + (f", attends to its own token {cta:.0%}" if cta is not None else "") + ")")
    if "neuron" in best:
        r = best["neuron"]
        parts.append(f"neuron {r['component']} ({r['score']:.2f}: cos(in, out) {r['evidence']['cos_in_out']:.2f})")
    if "activation" in best:
        r = best["activation"]
        parts.append(f"measured {r['component']} ({r['score']:.2f}: its write removes "
                     f"{-r['evidence']['projection']:.0%} of the residual it read)")
    lines.append("memory-management candidates, best of each kind (score = fraction of an ideal eraser): " + "; ".join(parts))
    w, every = a["composition_window"], ",".join(map(str, a["plan"]["composition_layers"]))
    for kind, s in ((k, s) for k, s in comp.items() if s["max"] is not None):
        best, g = s["top_pairs"][0], w[kind]
        lines.append(f"{kind}-composition over layers {every}: max {s['max']:.3f} ({best['src']} -> {best['dst']}), mean "
                     f"{s['mean']:.3f}; random baseline {s['baseline_mean']:.3f} +- {s['baseline_std']:.4f}, "
                     f"rotated {s['rotated_baseline_mean']:.3f} +- {s['rotated_baseline_std']:.4f}; in layers "
                     f"{w['layers'][0]}-{w['layers'][-1]} {g['n_significant']} of {g['n_pairs']} pairs exceed the "
                     f"family-wise threshold {g['threshold']:.4f} of randomly oriented writers (overlap beyond chance, "
                     f"not {g['n_significant']} circuits; false-alarm rate {g['false_alarm_rate']:.0%}; "
                     f"mean + 3 std would flag {g['above_3std']}, {g['null_above_3std']:.0f} of them by chance under "
                     f"the rotated null)")
    ks, ks_kl, ks_rnd = (", ".join(f"L{L}: {k}" for L, k in cc[key].items()) for key in ("smallest_k", "smallest_k_kl", "smallest_k_random"))
    lines.append(f"compression (residual after block L projected onto its top-k principal directions): base "
                 f"loss {cc['base_loss']:.3f} nats; smallest k of d_model {cc['d_model']} with loss increase "
                 f"<= {cc['tolerance']} nats - {ks}; with KL <= {cc['tolerance']} - {ks_kl}; random "
                 f"k-dim subspace instead - {ks_rnd}")
    lines.append("analytics seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in a["seconds"].items()))
    return lines
