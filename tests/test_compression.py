"""The measured compression curve: identity at k = d_model, monotone in k, hooks always removed."""
from __future__ import annotations

import pytest
import torch

from residual_bandwidth import BandwidthInputError, ResidualRun
from residual_bandwidth.compression import (CALIBRATION_PROMPTS, HELDOUT_PROMPTS, _smallest_k,
                                            compression_curve, project_residual,
                                            random_subspace)
from residual_bandwidth.metrics import principal_directions
from conftest import PROMPTS

RECORD_KEYS = {"layer", "k", "subspace", "loss", "kl", "delta_loss"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hook_counts(model):
    """Hooks on every submodule (transformers installs its own output-capturing hooks the first time
    hidden states are requested, so "no hooks at all" is not the test; "none left behind" is)."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_full_dimension_is_the_unmodified_model_gpt2(tiny_gpt2):
    model, tok = tiny_gpt2
    hooks = hook_counts(model)
    curve = compression_curve(ResidualRun(model, tok, PROMPTS * 3, erasure=False), layers=[0, 2],
                              ks=[4, 32, 64], heldout_prompts=HELDOUT_PROMPTS[:3], n_random=2, progress=False)
    recs = curve.records()
    assert all(set(r) == RECORD_KEYS for r in recs)
    assert len(recs) == 2 * 3 * 2 and {r["subspace"] for r in recs} == {"pca", "random"}
    for r in recs:
        if r["k"] == 64:
            assert abs(r["delta_loss"]) < 1e-4 and abs(r["kl"]) < 1e-6
            assert r["loss"] == pytest.approx(curve.base_loss, abs=1e-4)
        else:
            assert r["kl"] > 1e-6                     # a real projection changes the model
    assert hook_counts(model) == hooks
    assert set(curve.smallest_k) == set(curve.smallest_k_kl) == {0, 2} and curve.to_dict()["tolerance"] == 0.05


def test_curve_on_embedded_model_is_monotone_and_beats_random(embedded):
    model, tok = embedded.model, embedded.tokenizer
    hooks = hook_counts(model)
    ks = [16, 128, 384, 576]
    curve = compression_curve(ResidualRun(model, tok, CALIBRATION_PROMPTS[:16], kinds=["resid_post"], layers=[10]),
                              layers=[10], ks=ks, heldout_prompts=HELDOUT_PROMPTS[:3], n_random=1, progress=False)
    pca = {r["k"]: r for r in curve.records() if r["subspace"] == "pca"}
    rnd = {r["k"]: r for r in curve.records() if r["subspace"] == "random"}
    kls = [pca[k]["kl"] for k in ks]
    for a, b in zip(kls, kls[1:]):                    # monotone within noise
        assert b <= a * 1.1 + 1e-3
    assert kls[0] > 10 * (kls[2] + 1e-3)                # and the range is real
    assert abs(pca[576]["delta_loss"]) < 1e-3 and pca[576]["kl"] < 1e-4
    assert pca[16]["kl"] < rnd[16]["kl"] and pca[128]["kl"] < rnd[128]["kl"]
    assert curve.base_loss > 0 and curve.n_heldout_tokens > 20
    k = curve.smallest_k[10]
    assert k is None or all(pca[kk]["delta_loss"] <= curve.tolerance for kk in ks if kk >= k)
    assert all(rnd[kk]["kl"] >= rnd[kk2]["kl"] * 0.9 - 1e-3 for kk, kk2 in zip(ks, ks[1:]))   # random: monotone too
    ev = curve.explained_variance[10]
    assert all(0 <= a <= b + 1e-12 <= 1 + 1e-9 for a, b in zip(ev, ev[1:])) and ev[-1] == pytest.approx(1.0)
    assert hook_counts(model) == hooks


def test_hook_removed_when_forward_raises(tiny_gpt2):
    model, tok = tiny_gpt2
    mu, basis = torch.zeros(64), torch.eye(64)[:, :8]
    hooks = hook_counts(model)
    before = len(model.transformer.h[1]._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with project_residual(model, 1, mu, basis):
            assert len(model.transformer.h[1]._forward_hooks) == before + 1
            raise RuntimeError("boom")
    assert hook_counts(model) == hooks


def test_projection_hook_does_what_it_says(tiny_gpt2):
    """Inside the context, block L's output is mu + (x - mu) B B^T; later blocks see that."""
    model, tok = tiny_gpt2
    enc = tok(["The cat sat on the mat."], return_tensors="pt")
    seen = {}
    h = model.transformer.h[2].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**enc)
            x = seen["x"][0]
            mu = torch.randn(64)
            basis = torch.linalg.qr(torch.randn(64, 5))[0]
            with project_residual(model, 1, mu, basis):
                model(**enc)
    finally:
        h.remove()
    want = mu + (x - mu) @ basis @ basis.T
    assert torch.allclose(seen["x"][0], want, atol=1e-5)


def test_massive_rows_pass_the_projection_unchanged(tiny_gpt2):
    """With massive_ratio, rows at least that many times the sequence's median norm are kept as they
    are (here ratio 1: the louder half of the rows), the others are projected."""
    model, tok = tiny_gpt2
    enc = tok(["The cat sat on the mat and looked at the dog."], return_tensors="pt")
    seen = {}
    h = model.transformer.h[1].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    mu, basis = torch.zeros(64), torch.linalg.qr(torch.randn(64, 3))[0]
    try:
        with torch.no_grad():
            model(**enc)
            x = seen["x"][0]
            with project_residual(model, 0, mu, basis, massive_ratio=1.0):
                model(**enc)
    finally:
        h.remove()
    y = seen["x"][0]
    loud = x.norm(dim=-1) >= x.norm(dim=-1).median()
    assert 0 < int(loud.sum()) < len(x)
    assert torch.equal(y[loud], x[loud])
    assert torch.allclose(y[~loud], (x[~loud] @ basis) @ basis.T, atol=1e-6)


def test_fit_and_random_subspace_are_orthonormal(rng):
    x = torch.tensor(rng.normal(size=(50, 10)) * [5, 4, 3, 2, 1, 1, 1, 1, 1, 1])
    mu, V, lam = principal_directions(x)
    assert torch.allclose(V.T @ V, torch.eye(10, dtype=V.dtype), atol=1e-10)
    assert bool((lam[:-1] >= lam[1:]).all())
    from sklearn.decomposition import PCA
    pca = PCA().fit(x.numpy())
    assert torch.allclose(lam * 50 / 49, torch.tensor(pca.explained_variance_), rtol=1e-8)
    R = random_subspace(10, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(R.T @ R, torch.eye(3, dtype=R.dtype), atol=1e-10)


def test_smallest_k_needs_every_larger_k_within_tolerance():
    rows = [{"layer": 0, "k": k, "subspace": "pca", "delta_loss": dl}
            for k, dl in ((8, 0.01), (16, 0.3), (32, 0.04), (64, 0.0))]
    assert _smallest_k(rows, 0, "pca", 0.05) == 32       # k = 8 is below tolerance only by noise
    assert _smallest_k(rows, 0, "pca", 0.5) == 8
    rows[-1]["delta_loss"] = 0.2
    assert _smallest_k(rows, 0, "pca", 0.05) is None


def test_bad_input_is_named(tiny_gpt2):
    model, tok = tiny_gpt2
    run = ResidualRun(model, tok, PROMPTS, kinds=["resid_post"], erasure=False)
    with pytest.raises(BandwidthInputError, match="ks"):
        compression_curve(run, [0], [0, 8])
    with pytest.raises(BandwidthInputError, match="ks"):
        compression_curve(run, [0], [65])
    with pytest.raises(BandwidthInputError, match="layer 3 is out of range"):
        compression_curve(run, [3], [8])
    with pytest.raises(BandwidthInputError, match="tolerance"):
        compression_curve(run, [0], [8], tolerance=0)
    with pytest.raises(BandwidthInputError, match="n_random"):
        compression_curve(run, [0], [8], n_random=-1)
    with pytest.raises(BandwidthInputError, match="prompts"):
        compression_curve(run, [0], [8], heldout_prompts=[])
    with pytest.raises(BandwidthInputError, match="basis"):
        with project_residual(model, 0, torch.zeros(64), torch.eye(32)):
            pass
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100))
    with pytest.raises(BandwidthInputError, match="not supported"):
        ResidualRun(bert, tok, PROMPTS)
    with pytest.raises(BandwidthInputError, match="expected a ResidualRun"):
        compression_curve(model, [0], [8])


def test_lesson_job_reports_the_analytics(embedded, tmp_path):
    """``make lesson``'s job (fast plan) writes the analytics section and the figure inputs."""
    import json
    from residual_bandwidth.course.report import analytics_lines, run_bandwidth_job
    rep = run_bandwidth_job(loaded=embedded, out_dir=tmp_path, progress=False, figures=False, fast=True)
    a = json.loads((tmp_path / "report.json").read_text())["analytics"]
    assert set(a) >= {"bottlenecks", "memory", "composition", "compression", "seconds", "plan"}
    assert a["compression"]["layers"] == a["plan"]["compression_layers"]
    assert {r["k"] for r in a["compression"]["records"]} == set(a["plan"]["compression_ks"])
    assert set(a["compression"]["smallest_k"]) == {str(L) for L in a["plan"]["compression_layers"]}
    assert a["memory"]["ranking"][0]["rank"] == 1 and {"head", "neuron", "activation"} <= {
        r["kind"] for r in a["memory"]["ranking"]}
    assert set(a["composition"]) == {"Q", "K", "V"}
    for s in a["composition"].values():
        assert s["max"] >= s["mean"] > 0 and s["baseline_std"] > 0
    assert a["bottlenecks"]["counts"]["massive"] > 0
    inputs = json.loads((tmp_path / "analytics.json").read_text())
    assert set(inputs) == {"bottlenecks", "wov_heads", "memory_ranking", "composition", "compression"}
    assert len(inputs["wov_heads"]) == 30 * 9 and len(inputs["composition"]) == 3
    lines = "\n".join(analytics_lines(rep["analytics"]))
    assert "memory-management candidates" in lines and "smallest k" in lines and "K-composition" in lines
    # the composition figures mark the family-wise threshold of their own pairs, not "mean + 3 std"
    import numpy as np
    from residual_bandwidth.viz import build_figures
    w = a["composition_window"]
    assert w["layers"] == a["plan"]["composition_figure_layers"]
    figures = dict(build_figures(analytics={"composition": inputs["composition"]}))
    for c in inputs["composition"]:
        g, s = w[c["kind"]], np.array(c["scores"], dtype=float)
        assert g["false_alarm_rate"] == pytest.approx(0.05) and g["n_draws"] == 19 and c["threshold"] == g["threshold"]
        assert int((s[np.isfinite(s)] > c["threshold"]).sum()) == g["n_significant"] <= g["above_3std"]
        alt = figures[f"composition_{c['kind'].lower()}"].alt_text
        assert f"{g['n_significant']} pair(s) exceed family-wise threshold (5%)" in alt and "3 std" not in alt
        assert (f"in layers {w['layers'][0]}-{w['layers'][-1]} {g['n_significant']} of {g['n_pairs']} pairs exceed "
                "the family-wise threshold") in lines
