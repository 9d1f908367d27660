"""Accessible figures: every plot runs headless, its alt text states the data's key numbers, its table
holds the plotted data, degenerate input gives a note (not an exception) and bad arguments a
BandwidthInputError. Analytics and monitor plots are tested on synthetic records in their contracts."""
from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from residual_bandwidth import BandwidthInputError, ResidualBandwidthAnalyzer, ResidualCapture
from residual_bandwidth import viz
from residual_bandwidth.bottlenecks import SEVERITIES
from residual_bandwidth.compat import BandwidthVisualizer
from residual_bandwidth.viz import (AccessibleFigure, format_number, format_percent, format_ranges,
                                    plot_bottleneck_heatmap, plot_composition_scores,
                                    plot_compression_curve, plot_cumulative_variance,
                                    plot_massive_norms, plot_memory_ranking, plot_monitor_timeline,
                                    plot_norm_heatmap, plot_rank_by_layer, plot_singular_spectra,
                                    plot_utilization_by_layer, plot_wov_spectra, write_figures)


# ---------------------------------------------------------------------------------------------
# Synthetic data in the contracts of the analytics and monitor modules
# ---------------------------------------------------------------------------------------------
TOKENS = ("The", " cat", " sat", " on", " the", " mat")


def bottleneck_records(rng, n_layers=6, prompts=2):
    """Position 0 is a massive activation from layer 2 on; severity follows the score."""
    recs = []
    for p in range(prompts):
        for L in range(n_layers):
            for q, t in enumerate(TOKENS):
                massive = q == 0 and L >= 2
                nr = 50.0 if massive else float(rng.uniform(0.5, 2.0))
                spread = 0.01 if massive else float(rng.uniform(0.1, 0.9))
                score = nr * spread
                sev = ("massive" if massive else "critical" if score > 1.2 else
                       "warning" if score > 0.8 else "none")
                recs.append(dict(layer=L, prompt=p, position=q, token=t, norm_ratio=nr, spread=spread,
                                 score=score, severity=sev, massive=massive))
    return recs


def head_records(rng, n_layers=4, n_heads=3, d=8):
    """Random W_OV spectra with one planted eraser head, L2H1 (all real parts negative)."""
    recs = []
    for L in range(n_layers):
        for h in range(n_heads):
            ev = rng.normal(size=d) + 0.3j * rng.normal(size=d)
            if (L, h) == (2, 1):
                ev = -3 * np.abs(ev.real) + 1j * ev.imag
            mag = np.abs(ev)
            recs.append(dict(layer=L, head=h, kv_head=h // 3, eig_real=ev.real.tolist(),
                             eig_imag=ev.imag.tolist(), neg_share=float(mag[ev.real < 0].sum() / mag.sum()),
                             current_token_attention=float(rng.uniform(0, 1))))
    return recs


def ranking_records(n=20):
    out = []
    for i in range(n):
        kind = "neuron" if i % 3 == 0 else "head"
        out.append(dict(rank=i + 1, component=f"L{i % 5}{'N' if kind == 'neuron' else 'H'}{i}", kind=kind,
                        layer=i % 5, index=i, score=1.0 - 0.04 * i, evidence=f"neg share {1 - 0.04 * i:.2f}"))
    return out


def composition(rng, n=6):
    s = rng.uniform(0.01, 0.05, size=(n, n))
    s[np.tril_indices(n)] = np.nan  # a later layer cannot feed an earlier one
    s[0, 3] = 0.3                   # one planted pair far above the baseline
    return dict(kind="K", src_labels=[f"L{i}H0" for i in range(n)], dst_labels=[f"L{i}H1" for i in range(n)],
                scores=s.tolist(), baseline_mean=0.03, baseline_std=0.01)


def compression_records(layers=(3, 15), ks=(4, 16, 64, 256, 576), base=3.0):
    recs = []
    for L in layers:
        for k in ks:
            dl = 2.0 / k * (1 + L / 10)
            recs.append(dict(layer=L, k=k, subspace="pca", loss=base + dl, kl=0.9 * dl, delta_loss=dl))
            dr = 4.0 * (1 - k / 576)
            recs.append(dict(layer=L, k=k, subspace="random", loss=base + dr, kl=0.9 * dr, delta_loss=dr))
    return recs


THRESHOLDS = {"massive_count": {"warning": 2, "critical": 3}, "rank95": {"warning": 12, "critical": 8}}


def monitor_data(rng, n=40, layers=(5, 15)):
    """Two metrics: massive_count (higher is worse) and rank95 (lower is worse), alerts at thresholds."""
    recs, alerts = [], []
    for r in range(n):
        for L in layers:
            mc = int(rng.integers(0, 2)) + (3 if (r, L) == (30, 15) else 0)
            rk = float(rng.uniform(10.5, 30)) - (20 if (r, L) == (35, 5) else 0)
            recs.append(dict(request=r, timestamp=1000.0 + r, layer=L, metric="massive_count", value=mc))
            recs.append(dict(request=r, timestamp=1000.0 + r, layer=L, metric="rank95", value=rk))
    for x in recs:
        t = THRESHOLDS[x["metric"]]
        worse = (lambda v, th: v >= th) if t["critical"] >= t["warning"] else (lambda v, th: v <= th)
        level = "critical" if worse(x["value"], t["critical"]) else "warning" if worse(x["value"], t["warning"]) else None
        if level:
            alerts.append(dict(request=x["request"], timestamp=x["timestamp"], layer=x["layer"],
                               metric=x["metric"], level=level, value=x["value"], threshold=t[level]))
    return recs, alerts


def synthetic_capture(rng, n_layers=4, n=24, d=16, massive_row=0):
    """A capture with two prompts; ``massive_row`` is ~50x louder from layer 1 on."""
    acts = {}
    for L in range(n_layers):
        x = torch.tensor(rng.normal(size=(n, d)))
        if L >= 1 and massive_row is not None:
            x[massive_row] = 0.0
            x[massive_row, 3] = 200.0
        acts[f"blocks.{L}.hook_resid_post"] = x
    half = n // 2
    return ResidualCapture(acts=acts, prompt_index=torch.tensor([0] * half + [1] * (n - half)),
                           position=torch.tensor(list(range(half)) + list(range(n - half))),
                           tokens=[f"t{i}" for i in range(n)])


@pytest.fixture
def synth(rng):
    cap = synthetic_capture(rng)
    return ResidualBandwidthAnalyzer().analyze_layers(cap), cap


@pytest.fixture(scope="module")
def embedded_report(embedded_capture):
    return ResidualBandwidthAnalyzer().analyze_layers(embedded_capture)


@pytest.fixture(autouse=True)
def _no_pyplot_leak():
    """Figures are built outside pyplot: nothing may pile up in pyplot's figure manager."""
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def _data(request, which):
    if which == "synthetic":
        return request.getfixturevalue("synth")
    return request.getfixturevalue("embedded_report"), request.getfixturevalue("embedded_capture")


# ---------------------------------------------------------------------------------------------
# Formatting helpers and the container
# ---------------------------------------------------------------------------------------------
def test_number_formats():
    assert format_number(22712) == "22,712" and format_number(22712.4) == "22,712"
    assert format_number(14.73) == "14.7" and format_number(5.3456) == "5.35"
    assert format_number(0.031234) == "0.0312" and format_number(0.0) == "0" and format_number(10.0) == "10"
    assert format_percent(0.6842) == "68.4%"
    assert format_ranges([1, 2, 3, 5, 8, 9]) == "1-3, 5, 8-9" and format_ranges([]) == "none"


def test_accessible_figure_html_csv_markdown(synth, tmp_path):
    report, _ = synth
    af = plot_rank_by_layer(report)
    page = af._repr_html_()
    # described once: the image's alt text names the figure, the caption holds the description
    assert f'alt="Figure: {af.title} (described in the caption)"' in page
    assert "<figcaption>" + af.alt_text.replace("'", "&#x27;")[:60] in page
    assert page.count(af.alt_text.replace("'", "&#x27;")[:60]) == 1
    assert "<figcaption>" in page and '<th scope="col">layer</th>' in page
    assert page.count("<tr>") == len(af.table) + 1
    rows = (tmp_path / "t.csv")
    af.write_csv(rows)
    assert len(rows.read_text().strip().splitlines()) == len(af.table) + 1
    assert af.table_markdown().count("\n| ") == len(af.table)
    assert repr(af).endswith(af.alt_text)
    af.close()


# ---------------------------------------------------------------------------------------------
# Foundation plots, on synthetic data and on the embedded model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["synthetic", "embedded"])
def test_singular_spectra(request, which):
    report, _ = _data(request, which)
    af = plot_singular_spectra(report)
    chosen = sorted({r["layer"] for r in af.table})
    assert chosen[0] == report.layers[0] and chosen[-1] == report.layers[-1] and len(chosen) <= 5
    for L in chosen:
        m = report.without_massive[report.layers.index(L)]
        sig = np.sqrt(m.eigenvalues)
        got = [r["singular_value"] for r in af.table if r["layer"] == L]
        np.testing.assert_allclose(got, sig)
        assert f"Layer {L}: sigma falls from {format_number(sig[0])}" in af.alt_text
        assert f"r95 = {m.variance_rank}, participation ratio {format_number(m.participation_ratio)}" in af.alt_text
        assert f"stable rank {format_number(m.stable_rank)}" in af.alt_text
        assert f"entropy rank {format_number(m.entropy_rank)}" in af.alt_text
    # the rank markers are drawn: one scatter per (layer, marker type)
    assert len(af.figure.axes[0].collections) == 4 * len(chosen)
    af.close()


@pytest.mark.parametrize("which", ["synthetic", "embedded"])
def test_cumulative_variance(request, which):
    report, _ = _data(request, which)
    af = plot_cumulative_variance(report)
    for L in sorted({r["layer"] for r in af.table}):
        j = report.layers.index(L)
        clean, full = report.without_massive[j], report.all_positions[j]
        cum = np.cumsum(full.eigenvalues) / full.eigenvalues.sum()
        got = [r["cumulative_share"] for r in af.table if r["layer"] == L and r["positions"] == "all_positions"]
        np.testing.assert_allclose(got, cum)
        assert f"Layer {L}: 95% of the variance needs {clean.variance_rank} components" in af.alt_text
        if clean.n_positions != full.n_positions:
            assert f"but {full.variance_rank} with them" in af.alt_text
            assert format_percent(full.eigenvalues[0] / full.eigenvalues.sum()) in af.alt_text
    af.close()


def test_embedded_spectrum_collapses_with_the_massive_position(embedded_report):
    """The lesson's point, read off the figure's alt text: a middle layer needs 1 direction with
    position 0 included and tens without it."""
    L = 14
    af = plot_cumulative_variance(embedded_report, layers=[L])
    full = embedded_report.all_positions[L]
    clean = embedded_report.without_massive[L]
    assert full.variance_rank == 1 and clean.variance_rank > 20
    assert f"needs {clean.variance_rank} components without the 4 massive position(s) but 1 with them" in af.alt_text
    af.close()


@pytest.mark.parametrize("which", ["synthetic", "embedded"])
def test_utilization_and_rank_by_layer(request, which):
    report, _ = _data(request, which)
    af = plot_utilization_by_layer(report)
    util = [m.utilization_available for m in report.without_massive]
    util_d = [m.utilization_d_model for m in report.without_massive]
    assert f"{format_percent(min(util))}-{format_percent(max(util))}" in af.alt_text
    assert f"{format_percent(min(util_d))}-{format_percent(max(util_d))} of d_model = {report.d_model}" in af.alt_text
    assert [r["util_available_without_massive"] for r in af.table] == util
    af.close()
    af = plot_rank_by_layer(report)
    r = [m.variance_rank for m in report.without_massive]
    assert f"ranges from {min(r)} (layer {report.layers[int(np.argmin(r))]})" in af.alt_text
    n = report.all_positions[0].n_positions   # the title says when the sample cannot judge the width
    kept = report.without_massive[0].n_positions
    assert (f"(capped by the sample: {n} positions" in af.title) == (n - 1 < report.d_model)
    if n - 1 < report.d_model and kept < n:
        assert af.title.endswith(f", {kept} without massive rows)")
    af.close()


@pytest.mark.parametrize("which", ["synthetic", "embedded"])
def test_norm_heatmap_and_norm_by_layer(request, which):
    report, cap = _data(request, which)
    af = plot_norm_heatmap(cap, report, prompt=0)
    rows0 = [i for i in range(cap.n_rows) if int(cap.prompt_index[i]) == 0]
    assert len(af.table) == len(rows0) * len(cap.layers)
    norms = {L: cap.get("resid_post", L).double().norm(dim=1) for L in cap.layers}
    for r in af.table:
        assert r["norm"] == pytest.approx(float(norms[r["layer"]][rows0[r["position"]]]))
    flagged = {(m.layer, m.position) for m in report.massive if m.prompt == 0}
    assert {(r["layer"], r["position"]) for r in af.table if r["massive"]} == flagged
    top = max(af.table, key=lambda r: r["norm"])
    assert f"The largest norm is {format_number(top['norm'])} at layer {top['layer']}" in af.alt_text
    layers0 = sorted(L for L, q in flagged if q == 0)
    if layers0:
        assert f"Position 0 {cap.tokens[rows0[0]]!r} is massive at layers {format_ranges(layers0)}" in af.alt_text
    # massive cells carry a glyph (a star scatter), not only a colour
    stars = [c for c in af.figure.axes[0].collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in stars) == len(flagged)
    af.close()
    af = plot_massive_norms(report, cap)
    assert f"{len({m.layer for m in report.massive})} layer(s) have a massive row" in af.alt_text
    af.close()


def test_embedded_norm_heatmap_shows_position_zero(embedded_report, embedded_capture):
    af = plot_norm_heatmap(embedded_capture, embedded_report, prompt=1)
    assert "Position 0 'The' is massive at layers" in af.alt_text
    top = max(af.table, key=lambda r: r["norm"])
    assert top["position"] == 0 and top["ratio_to_layer_median"] > 50
    af.close()


# ---------------------------------------------------------------------------------------------
# Analytics and monitor plots on synthetic records
# ---------------------------------------------------------------------------------------------
def test_bottleneck_heatmap(rng):
    recs = bottleneck_records(rng)
    af = plot_bottleneck_heatmap(recs, prompt=0)
    mine = [r for r in recs if r["prompt"] == 0]
    assert af.table == sorted(mine, key=lambda r: (r["layer"], r["position"]))
    counts = {s: sum(r["severity"] == s for r in mine) for s in SEVERITIES}
    assert counts["critical"] and counts["warning"] and counts["massive"]
    assert (f"{counts['none']} none, {counts['warning']} warning, {counts['critical']} critical, "
            f"{counts['massive']} massive") in af.alt_text
    top = max((r for r in mine if not r["massive"]), key=lambda r: r["score"])
    assert f"{format_number(top['score'])} at layer {top['layer']}, position {top['position']}" in af.alt_text
    assert "Position 0 'The' is a massive row at layers 2-5" in af.alt_text
    assert "(1 of 2 prompts)" in af.alt_text
    # each severity has its own glyph: one scatter per present severity, with distinct markers
    ax = af.figure.axes[0]
    glyphs = {c.get_label(): len(c.get_offsets()) for c in ax.collections if c.get_label() in
              {lab for _, lab in viz.SEVERITY_GLYPHS.values()}}
    assert glyphs == {viz.SEVERITY_GLYPHS[s][1]: counts[s] for s in ("warning", "critical", "massive")}
    # tokens are the tick labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0 The", "1 cat", "2 sat", "3 on", "4 the", "5 mat"]
    af.close()
    af = plot_bottleneck_heatmap(recs, prompt=1, value="norm_ratio")
    assert {r["prompt"] for r in af.table} == {1}
    af.close()
    # without a prompt: the one with the most warning and critical cells, the lowest number on a tie
    flag = ("warning", "critical")
    quiet0 = [dict(r, severity="none") if r["prompt"] == 0 and r["severity"] in flag else r for r in recs]
    one_flag1 = [dict(r, severity="none") if r["severity"] in flag and (r["prompt"], r["layer"], r["position"]) != (1, 1, 1)
                 else dict(r, severity="warning") if (r["prompt"], r["layer"], r["position"]) == (1, 1, 1) else r for r in recs]
    no_flags = [dict(r, severity="none") if r["severity"] in flag else r for r in recs]
    for data, shown in ((quiet0, 1), (one_flag1, 1), (no_flags, 0)):
        af = plot_bottleneck_heatmap(data)
        assert {r["prompt"] for r in af.table} == {shown} and f"(prompt {shown})" in af.figure.axes[0].get_title()
        af.close()


def test_monitor_timeline(rng):
    recs, alerts = monitor_data(rng)
    af = plot_monitor_timeline(recs, alerts, THRESHOLDS)
    assert len(af.table) == len(recs)
    n_w = sum(a["level"] == "warning" for a in alerts)
    n_c = sum(a["level"] == "critical" for a in alerts)
    assert n_c == 2 and n_w > 0
    assert f"{len(alerts)} alert(s): {n_w} warning, {n_c} critical, 0 resolved" in af.alt_text
    planted = next(r["value"] for r in recs if (r["request"], r["layer"], r["metric"]) == (30, 15, "massive_count"))
    assert (f"the first critical alert is at request 30 (layer 15, massive_count = {planted}, "
            "threshold 3)") in af.alt_text
    assert "critical 8 (lower is worse)" in af.alt_text and "critical 3 (higher is worse)" in af.alt_text
    worst = min((r for r in recs if r["metric"] == "rank95"), key=lambda r: r["value"])
    assert f"worst {format_number(worst['value'])} at request {worst['request']} (layer {worst['layer']})" in af.alt_text
    assert {r["alert"] for r in af.table if (r["request"], r["layer"], r["metric"]) == (30, 15, "massive_count")} == {"critical"}
    # warning and critical lines are drawn at their values with different line styles
    ax = af.figure.axes[0]
    hlines = {(float(l.get_ydata()[0]), l.get_linestyle()) for l in ax.lines if len(set(l.get_ydata())) == 1
              and len(l.get_ydata()) == 2}
    assert (2.0, "--") in hlines and (3.0, "-.") in hlines
    af.close()


def test_monitor_timeline_request_level_and_resolved_alerts():
    recs = [dict(request=i, timestamp=float(i), layer=None, metric="bad_input", value=1.0) for i in (2, 3)]
    recs += [dict(request=i, timestamp=float(i), layer=4, metric="rank95", value=v)
             for i, v in enumerate([20.0, 5.0, 6.0, 30.0, None])]
    alerts = [dict(request=1, timestamp=1.0, layer=4, metric="rank95", level="warning", value=5.0, threshold=10.0),
              dict(request=3, timestamp=3.0, layer=4, metric="rank95", level="resolved", value=30.0, threshold=10.0),
              dict(request=2, timestamp=2.0, layer=None, metric="bad_input", level="critical", value=1.0, threshold=1.0)]
    af = plot_monitor_timeline(recs, alerts, {"rank95": {"warning": 10.0, "critical": None}},
                               directions={"rank95": "below"})
    assert "3 alert(s): 1 warning, 1 critical, 1 resolved" in af.alt_text
    assert "worst 5 at request 1 (layer 4); thresholds warning 10, critical none (lower is worse)" in af.alt_text
    assert "(request-level, bad_input = 1, threshold 1)" in af.alt_text
    assert len(af.table) == 7
    assert math.isnan(next(r["value"] for r in af.table if (r["metric"], r["request"]) == ("rank95", 4)))
    assert af.table[0]["metric"] == "rank95"  # metrics with thresholds are shown first
    af.close()


def test_wov_spectra_highlights_the_planted_eraser(rng):
    heads = head_records(rng)
    af = plot_wov_spectra(heads, highlight=3)
    assert af.table[0]["name"] == "L2H1" and af.table[0]["neg_share"] == pytest.approx(1.0)
    planted = next(h for h in heads if (h["layer"], h["head"]) == (2, 1))
    assert (f"L2H1 has share 1, current-token attention {format_number(planted['current_token_attention'])}, "
            f"8 of 8 eigenvalues with negative real part, most negative "
            f"{format_number(min(planted['eig_real']))}") in af.alt_text
    shares = [h["neg_share"] for h in heads]
    assert f"ranges {format_number(min(shares))} to {format_number(max(shares))}" in af.alt_text
    assert sum(r["highlighted"] for r in af.table) == 3
    af.close()


def test_memory_ranking():
    recs = ranking_records(20)
    af = plot_memory_ranking(list(reversed(recs)), top=10)
    assert [r["rank"] for r in af.table] == list(range(1, 11))
    assert "#1 L0N0 (neuron, layer 0) score 1" in af.alt_text and "#2 L1H1 (head, layer 1) score 0.96" in af.alt_text
    assert "top 10 of 20" in af.alt_text and "(4 neuron, 6 head)" in af.alt_text
    hatches = {p.get_hatch() for p in af.figure.axes[0].patches}
    assert len(hatches) == 2  # kinds differ by hatch, not only colour
    af.close()


def test_composition_scores(rng):
    comp = composition(rng)
    af = plot_composition_scores(comp)
    s = np.array(comp["scores"])
    thr = comp["baseline_mean"] + 3 * comp["baseline_std"]
    assert len(af.table) == int(np.isfinite(s).sum()) == 15
    n_above = int((np.nan_to_num(s, nan=-1) > thr).sum())
    assert f"{n_above} pair(s) exceed mean + 3 std = {format_number(thr)}" in af.alt_text
    z = (0.3 - comp["baseline_mean"]) / comp["baseline_std"]
    assert f"Strongest: L0H0 -> L3H1 = 0.3 ({format_number(z)} std above the mean)" in af.alt_text
    assert [r for r in af.table if r["above_baseline"]] == [
        {"kind": "K", "src": "L0H0", "dst": "L3H1", "score": 0.3, "z_vs_baseline": pytest.approx(27.0),
         "above_baseline": True}]
    diamonds = [c for c in af.figure.axes[0].collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in diamonds) == n_above
    af.close()
    # with a family-wise threshold the caption does not grade pairs in baseline std (the per-pair rule)
    fw = plot_composition_scores(comp, threshold=0.25)
    assert "pair(s) exceed family-wise threshold = 0.25" in fw.alt_text and "std above" not in fw.alt_text
    assert "Strongest: L0H0 -> L3H1 = 0.3;" in fw.alt_text
    fw.close()


def test_compression_curve():
    recs = compression_records()
    af = plot_compression_curve(recs, base_loss=3.0, tolerance=0.05, d_model=576)
    for L in (3, 15):
        pca = sorted((r["k"], r["delta_loss"]) for r in recs if r["layer"] == L and r["subspace"] == "pca")
        kmin, dl = next((k, d) for k, d in pca if d <= 0.05)
        rnd = next(r["delta_loss"] for r in recs if r["layer"] == L and r["subspace"] == "random" and r["k"] == kmin)
        assert (f"Layer {L}: the top {kmin} principal directions keep the average loss increase within 0.05 nats "
                f"(+{format_number(dl)}, a point estimate); a random {kmin}-dimensional subspace costs +{format_number(rnd)}") in af.alt_text
    assert sum(r["within_tolerance"] for r in af.table) == sum(r["delta_loss"] <= 0.05 for r in recs)
    af.close()
    af = plot_compression_curve(recs, tolerance=1e-6)
    assert "Layer 3: no tested k (up to 576) keeps the loss increase within" in af.alt_text
    af.close()


# ---------------------------------------------------------------------------------------------
# Degenerate input: a figure with a note, never an exception
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: plot_bottleneck_heatmap([]),
    lambda: plot_monitor_timeline([], [], {}),
    lambda: plot_wov_spectra([]),
    lambda: plot_memory_ranking([]),
    lambda: plot_compression_curve([]),
    lambda: plot_composition_scores(dict(kind="Q", src_labels=[], dst_labels=[], scores=[],
                                         baseline_mean=0.0, baseline_std=0.0)),
    lambda: plot_composition_scores(dict(kind="Q", src_labels=["a"], dst_labels=["b"], scores=[[float("nan")]],
                                         baseline_mean=0.0, baseline_std=0.1)),
])
def test_empty_records_give_a_note(make):
    af = make()
    assert isinstance(af, AccessibleFigure) and af.notes and af.table == []
    assert af.notes[0] in af.alt_text
    assert any(af.notes[0] in t.get_text() for t in af.figure.axes[0].texts)  # drawn in the figure
    af.close()


def _drawn(af, note):
    return any(note[:30] in t.get_text() for t in af.figure.texts + af.figure.axes[0].texts)


def test_single_layer_and_single_position(rng):
    x = torch.tensor(rng.normal(size=(10, 8)))
    report = ResidualBandwidthAnalyzer().analyze_layers([x])
    cap = ResidualCapture.from_list([x])
    for af in (plot_singular_spectra(report), plot_cumulative_variance(report), plot_rank_by_layer(report),
               plot_utilization_by_layer(report), plot_norm_heatmap(cap, report), plot_massive_norms(report, cap)):
        if af.title.startswith(("Residual norm by layer:",)):
            assert "1 layers" in af.alt_text
        else:
            assert any("one layer" in n for n in af.notes), af.title
            assert _drawn(af, af.notes[0]) and af.notes[0] in af.alt_text
        af.close()
    one = ResidualCapture.from_list([torch.tensor(rng.normal(size=(1, 8)))])
    af = plot_norm_heatmap(one)
    assert any("single position" in n for n in af.notes) and len(af.table) == 1
    af.close()
    rec = bottleneck_records(rng, n_layers=1, prompts=1)[:1]
    af = plot_bottleneck_heatmap(rec)
    assert any("one layer" in n for n in af.notes) and any("single position" in n for n in af.notes)
    af.close()


def test_constant_data_gives_a_note(rng):
    recs = [dict(r, score=0.5, severity="none", massive=False) for r in bottleneck_records(rng, prompts=1)]
    af = plot_bottleneck_heatmap(recs)
    assert any("same score (0.5)" in n for n in af.notes) and _drawn(af, af.notes[0])
    af.close()
    flat = [dict(request=i, timestamp=float(i), layer=0, metric="m", value=1.0) for i in range(5)]
    af = plot_monitor_timeline(flat, [], {"m": {"warning": 2, "critical": 3}})
    assert any("m is constant (1)" in n for n in af.notes)
    af.close()
    af = plot_monitor_timeline(flat[:1])
    assert any("Only one request" in n for n in af.notes)
    af.close()
    x = torch.ones(6, 4, dtype=torch.float64)
    cap = ResidualCapture.from_list([x, x])
    af = plot_norm_heatmap(cap)  # every norm is 2: a log colour scale with vmin == vmax
    assert any("same norm (2)" in n for n in af.notes)
    af.close()
    comp = dict(kind="V", src_labels=["a", "b"], dst_labels=["c", "d"], scores=[[0.1, 0.1], [0.1, 0.1]],
                baseline_mean=0.1, baseline_std=0.0)
    af = plot_composition_scores(comp)
    assert any("zero spread" in n for n in af.notes) and "0 pair(s) exceed" in af.alt_text
    af.close()
    af = plot_compression_curve([dict(layer=1, k=8, subspace="pca", loss=3.0, kl=0.0, delta_loss=0.0)])
    assert any("Only one k" in n for n in af.notes) and any("No random-subspace" in n for n in af.notes)
    af.close()
    heads = [dict(layer=0, head=0, kv_head=0, eig_real=[1.0], eig_imag=[0.0], neg_share=0.0,
                  current_token_attention=None)]
    af = plot_wov_spectra(heads)
    assert any("current-token attention" in n for n in af.notes) and any("one head" in n for n in af.notes)
    af.close()
    same = [dict(r, score=0.5) for r in ranking_records(3)]
    af = plot_memory_ranking(same)
    assert any("same score" in n for n in af.notes)
    af.close()


# ---------------------------------------------------------------------------------------------
# Invalid arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda r: plot_bottleneck_heatmap({"layer": 0}), "expected a list of dicts"),
    (lambda r: viz.build_figures(analytics={"composition": [1]}), "composition: expected a dict"),
    (lambda r: plot_bottleneck_heatmap([{"layer": 0}]), "missing key(s)"),
    (lambda r: plot_bottleneck_heatmap([dict(bottleneck_records(r)[0], severity="high")]), "severity 'high'"),
    (lambda r: plot_bottleneck_heatmap(bottleneck_records(r), prompt=7), "prompt: 7 has no records"),
    (lambda r: plot_bottleneck_heatmap(bottleneck_records(r), value="utilization"), "value:"),
    (lambda r: plot_bottleneck_heatmap([dict(bottleneck_records(r)[0], score="big")]), "expected a number"),
    (lambda r: plot_monitor_timeline(monitor_data(r)[0], thresholds=[1, 2]), "thresholds"),
    (lambda r: plot_monitor_timeline(monitor_data(r)[0], metrics=["latency"]), "not in the records"),
    (lambda r: plot_monitor_timeline(monitor_data(r)[0], [dict(monitor_data(r)[1][0], level="info")]), "level"),
    (lambda r: plot_monitor_timeline(monitor_data(r)[0], directions={"rank95": "down"}), "directions"),
    (lambda r: plot_memory_ranking(ranking_records(), top=0), "top: expected a positive integer"),
    (lambda r: plot_wov_spectra([dict(head_records(r)[0], eig_imag=[0.0])]), "equal length"),
    (lambda r: plot_composition_scores([1, 2]), "expected a dict"),
    (lambda r: plot_composition_scores(dict(composition(r), scores=[[1.0]])), "must be a 6 x 6"),
    (lambda r: plot_composition_scores(dict(composition(r), baseline_std=-1)), "baseline_std"),
    (lambda r: plot_compression_curve(compression_records(), tolerance=-0.1), "tolerance"),
    (lambda r: plot_compression_curve([dict(compression_records()[0], subspace="svd")]), "subspace 'svd'"),
    (lambda r: plot_compression_curve([dict(compression_records()[0], k=0)]), "positive integer"),
])
def test_invalid_records_raise(rng, call, message):
    with pytest.raises(BandwidthInputError, match=None) as err:
        call(rng)
    assert message in str(err.value)


def test_invalid_report_arguments(synth):
    report, cap = synth
    with pytest.raises(BandwidthInputError, match="which"):
        plot_singular_spectra(report, which="both")
    with pytest.raises(BandwidthInputError, match=r"layers: \[99\] not in the report"):
        plot_singular_spectra(report, layers=[99])
    with pytest.raises(BandwidthInputError, match="BandwidthReport"):
        plot_rank_by_layer({"layers": [0]})
    with pytest.raises(BandwidthInputError, match="prompt: 5 not captured"):
        plot_norm_heatmap(cap, report, prompt=5)
    with pytest.raises(BandwidthInputError, match="ResidualCapture"):
        plot_norm_heatmap([torch.zeros(3, 4)])


# ---------------------------------------------------------------------------------------------
# Writing every figure
# ---------------------------------------------------------------------------------------------
def _analytics(rng):
    return {"bottlenecks": bottleneck_records(rng), "wov_heads": head_records(rng),
            "memory_ranking": ranking_records(), "composition": [composition(rng)],
            "compression": {"records": compression_records(), "base_loss": 3.0, "tolerance": 0.05}}


def test_write_figures_with_analytics_and_monitor(synth, rng, tmp_path):
    report, cap = synth
    recs, alerts = monitor_data(rng)
    index = write_figures(report, cap, tmp_path, analytics=_analytics(rng),
                          monitor={"records": recs, "alerts": alerts, "thresholds": THRESHOLDS}, dpi=60)
    names = {f["file"] for f in index}
    assert names == {f"{n}.png" for n in ("rank_by_layer", "utilization_by_layer", "singular_spectra",
                                          "cumulative_variance", "norm_by_layer", "norm_heatmap",
                                          "bottleneck_heatmap", "wov_spectra", "memory_ranking",
                                          "composition_k", "compression_curve", "monitor_timeline")}
    md = (tmp_path / "figures.md").read_text()
    for f in index:
        png = (tmp_path / f["file"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        assert f["alt_text"] in md and f"![{f['alt_text'][:40]}" in md
        assert (tmp_path / f["csv"]).is_file()
    monitor_csv = (tmp_path / "monitor_timeline.csv").read_text().strip().splitlines()
    assert len(monitor_csv) == len(recs) + 1


def test_cli_figures_writes_pngs_and_markdown(embedded, monkeypatch, rng, tmp_path, capsys):
    from residual_bandwidth.course import models
    from residual_bandwidth.course.cli import main
    monkeypatch.setattr(models, "load_model", lambda name: embedded)  # the session's copy: no reload
    analytics = tmp_path / "analytics.json"
    analytics.write_text(json.dumps({"memory_ranking": ranking_records(5)}))
    out = tmp_path / "figs"
    code = main(["figures", "--model", "embedded", "--text", "The capital of France is Paris.",
                 "--out", str(out), "--quiet",
                 "--analytics-json", str(analytics), "--dpi", "40"])
    assert code == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "norm_heatmap.png" in pngs and "memory_ranking.png" in pngs and len(pngs) == 7
    md = (out / "figures.md").read_text()
    assert md.count("![") == 7 and "#1 L0N0 (neuron, layer 0) score 1" in md
    assert "wrote 7 PNG figures" in capsys.readouterr().out
    assert main(["figures", "--analytics-json", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setattr(models, "load_model", lambda name: pytest.fail("a bad option must stop before the model loads"))
    assert main(["figures", "--dpi", "5", "--out", str(out)]) == 2
    assert main(["figures", "--text", "one prompt", "--prompt-index", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--dpi: expected at least 10, got 5" in err and "--prompt-index: 1 is not in 0..0" in err


def test_seed_name_is_a_thin_namespace(synth):
    report, _ = synth
    af = BandwidthVisualizer.plot_rank_by_layer(report)
    assert isinstance(af, AccessibleFigure)
    assert BandwidthVisualizer.plot_bandwidth_utilization_timeline is plot_monitor_timeline
    af.close()


def test_alt_texts_state_numbers_not_just_names(synth, rng):
    """No alt text is a bare "a plot of X": each carries several numbers from the data."""
    report, cap = synth
    recs, alerts = monitor_data(rng)
    made = viz.build_figures(report, cap, analytics=_analytics(rng),
                             monitor={"records": recs, "alerts": alerts, "thresholds": THRESHOLDS})
    for name, af in made:
        numbers = [t for t in af.alt_text.replace(",", " ").split() if any(ch.isdigit() for ch in t)]
        assert len(numbers) >= 5, (name, af.alt_text)
        assert not af.alt_text.lower().startswith(("a plot", "plot of", "figure of"))
        assert math.isfinite(len(af.table)) and af.table, name
        af.close()


def test_importing_viz_leaves_rcparams_unchanged():
    """Styling goes through matplotlib.rc_context while a figure is made, never a global change."""
    import subprocess
    import sys
    code = ("import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; "
            "before = dict(plt.rcParams); import residual_bandwidth.viz as v; "
            "assert dict(plt.rcParams) == before, 'import changed rcParams'; "
            "af = v.plot_compression_curve([]); af.close(); "
            "assert dict(plt.rcParams) == before, 'a figure changed rcParams'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_figures_are_drawn_with_the_package_style():
    fig = plot_compression_curve([]).figure
    assert fig.dpi == viz.STYLE["figure.dpi"]
    assert fig.axes[0].title.get_fontsize() == viz.STYLE["axes.titlesize"]
