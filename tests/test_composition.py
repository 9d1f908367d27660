"""Subspace communication: composition scores against dense products and a planted pair."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from residual_bandwidth import BandwidthInputError
from residual_bandwidth.composition import (component_subspaces, composition_scores, principal_angles,
                                            random_baseline)
from residual_bandwidth.weights import all_layer_weights, layer_weights
from conftest import random_orthogonal

D, DH = 64, 16
SRC = (0, 1)                                   # writes into the planted subspace S
DST = {"Q": (2, 3), "K": (1, 1), "V": (2, 0)}  # read S with their queries / keys / values


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _subspace(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.cat([torch.ones(D, 1), torch.randn(D, DH, generator=g)], dim=1))
    return q[:, 1:]                            # orthogonal to the all-ones direction LayerNorm removes


@pytest.fixture(scope="module")
def planted(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2[0])
    S = _subspace()
    with torch.no_grad():
        L, h = SRC
        model.transformer.h[L].attn.c_proj.weight[h * DH:(h + 1) * DH] = 0.05 * S.T
        for part, kind in enumerate("QKV"):
            L, h = DST[kind]
            model.transformer.h[L].attn.c_attn.weight[:, part * D + h * DH:part * D + (h + 1) * DH] = 0.3 * S
    return model, S


def _label(lh):
    return f"L{lh[0]}.H{lh[1]}"


def test_scores_equal_dense_products(tiny_gpt2):
    lws = all_layer_weights(tiny_gpt2[0])
    for kind in "QKV":
        cs = composition_scores(lws, kind, n_baseline=5)
        for (la, ha), (lb, hb) in (((0, 0), (1, 3)), ((0, 2), (2, 1)), ((1, 3), (2, 2))):
            wa = lws[la].W_OV[ha].double()
            wb = {"Q": lws[lb].W_QK[hb], "K": lws[lb].W_QK[hb].T, "V": lws[lb].W_OV[hb]}[kind].double()
            want = (wa @ wb).norm() / (wa.norm() * wb.norm())
            got = cs.scores[cs.src_labels.index(f"L{la}.H{ha}"), cs.dst_labels.index(f"L{lb}.H{hb}")]
            assert float(got) == pytest.approx(float(want), rel=1e-4), (kind, la, ha, lb, hb)


def test_nan_unless_destination_is_later_and_dict_keys(tiny_gpt2):
    cs = composition_scores(tiny_gpt2[0], "V", n_baseline=5)
    layer = [int(s[1]) for s in cs.src_labels]
    for i, la in enumerate(layer):
        for j, lb in enumerate(layer):
            assert bool(torch.isfinite(cs.scores[i, j])) == (lb > la)
    d = cs.to_dict()
    assert set(d) == {"kind", "src_labels", "dst_labels", "scores", "baseline_mean", "baseline_std"}
    assert len(d["scores"]) == 12 and len(d["scores"][0]) == 12 and np.isnan(d["scores"][5][0])


def test_planted_pair_above_baseline_random_pairs_at_baseline(planted):
    model, _ = planted
    for kind in "QKV":
        cs = composition_scores(model, kind, n_baseline=100)
        i, j = cs.src_labels.index(_label(SRC)), cs.dst_labels.index(_label(DST[kind]))
        planted_score = float(cs.scores[i, j])
        assert planted_score > cs.baseline_mean + 8 * cs.baseline_std, kind
        assert cs.top_pairs(1)[0] == {"src": _label(SRC), "dst": _label(DST[kind]), "score": planted_score,
                                      "z": pytest.approx((planted_score - cs.baseline_mean) / cs.baseline_std)}
        rest = cs.scores.clone()
        rest[i, j] = float("nan")
        rest[i] = float("nan")                      # the planted source writes into S for everyone
        others = rest[torch.isfinite(rest)]
        assert abs(float(others.mean()) - cs.baseline_mean) < 1.0 * cs.baseline_std, kind
        assert float((others > cs.baseline_mean + 4 * cs.baseline_std).float().mean()) < 0.02, kind


def test_random_baseline_is_about_one_over_sqrt_d(tiny_gpt2):
    for d, dh in ((64, 16), (256, 32)):
        mean, std = random_baseline(d, dh, n=40)
        assert mean == pytest.approx(d**-0.5, rel=0.1) and 0 < std < 0.2 * mean
    # Gaussian random heads: the spectrum-preserving rotated baseline agrees with the Gaussian one
    cs = composition_scores(tiny_gpt2[0], "V", n_baseline=100)
    assert cs.rotated_mean == pytest.approx(cs.baseline_mean, rel=0.1)


def test_principal_angles_closed_form(rng):
    a1, a2 = 0.3, 1.1
    e = np.eye(6)
    A = np.stack([e[0], e[1]], 1)
    B = np.stack([np.cos(a1) * e[0] + np.sin(a1) * e[2], np.cos(a2) * e[1] + np.sin(a2) * e[3]], 1)
    Q = random_orthogonal(6, rng)
    mix = np.array([[2.0, 1.0], [0.0, 3.0]])        # non-orthonormal bases of the same spaces
    got = principal_angles(torch.tensor(Q @ A @ mix), torch.tensor(Q @ B))
    np.testing.assert_allclose(got.numpy(), [a1, a2], atol=1e-10)
    from scipy.linalg import subspace_angles
    X, Y = rng.normal(size=(20, 3)), rng.normal(size=(20, 5))
    np.testing.assert_allclose(principal_angles(torch.tensor(X), torch.tensor(Y)).numpy(),
                               np.sort(subspace_angles(X, Y)), atol=1e-8)
    assert float(principal_angles(torch.tensor(X), torch.tensor(X @ mix[:2, :2].repeat(2, 0)[:3, :2])).max()) < 1e-6


def test_read_write_subspaces_of_a_head(planted):
    model, S = planted
    src = component_subspaces(layer_weights(model, SRC[0]), SRC[1])
    dst = component_subspaces(layer_weights(model, DST["Q"][0]), DST["Q"][1])
    # the planted source writes exactly S, the planted destination's queries read exactly S
    assert float(principal_angles(src["ov_write"], S.double()).max()) < 1e-5
    assert float(principal_angles(src["ov_write"], dst["qk_query"]).max()) < 1e-5
    # anything orthogonal to the OV read subspace is ignored by the head
    lw = layer_weights(model, 1).to(torch.float64)
    sub = component_subspaces(lw, 2)
    x = torch.randn(5, D, dtype=torch.float64)
    x_perp = x - (x @ sub["ov_read"]) @ sub["ov_read"].T
    assert float((x_perp @ lw.W_OV[2]).norm()) < 1e-8 * float((x @ lw.W_OV[2]).norm())
    assert torch.allclose(sub["ov_singular"], torch.linalg.svdvals(lw.W_OV[2])[:DH], rtol=1e-6)


def test_embedded_model_scores_are_reported_beside_baseline(embedded):
    cs = composition_scores(embedded.model, "K", layers=[0, 1, 2])
    s = cs.summary()
    assert s["n_pairs"] == 9 * 9 * 3 and 0 < s["baseline_mean"] < s["max"] <= 1
    assert s["baseline_mean"] == pytest.approx(576**-0.5, rel=0.1)
    assert s["rotated_baseline_std"] > 0 and len(s["top_pairs"]) == 5


def test_bad_input_is_named(tiny_gpt2):
    lw = layer_weights(tiny_gpt2[0], 0)
    with pytest.raises(BandwidthInputError, match="kind"):
        composition_scores(tiny_gpt2[0], "O")
    with pytest.raises(BandwidthInputError, match="model_or_weights"):
        composition_scores("gpt2")
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100))
    with pytest.raises(BandwidthInputError, match="not supported.*Supported"):
        composition_scores(bert)
    with pytest.raises(BandwidthInputError, match="layer 9 is out of range"):
        composition_scores(tiny_gpt2[0], layers=[0, 9])
    with pytest.raises(BandwidthInputError, match="head"):
        component_subspaces(lw, 4)
    with pytest.raises(BandwidthInputError, match=r"k \(layer \d+\): expected a positive int <= 16, got 17"):
        component_subspaces(lw, 0, k=17)
    with pytest.raises(BandwidthInputError, match="different spaces"):
        principal_angles(torch.zeros(5, 2), torch.zeros(6, 2))


def test_pair_significance_finds_the_planted_pair_and_controls_chance(planted, tiny_gpt2):
    """The family-wise threshold (max over all pairs under random writer rotations) keeps the planted pair
    and, on the unmodified random model, flags about nothing; "mean + 3 std" is counted beside it."""
    from residual_bandwidth.composition import max_statistic_null, pair_significance
    model, _ = planted
    weights = all_layer_weights(model)
    cs = composition_scores(weights, "K")
    sig = pair_significance(cs, weights, alpha=0.05, n_draws=20, seed=1)
    assert sig.false_alarm_rate == pytest.approx(1 / 21) and sig.threshold == max(sig.null_max)
    i, j = cs.src_labels.index(_label(SRC)), cs.dst_labels.index(_label(DST["K"]))
    assert float(cs.scores[i, j]) > sig.threshold and sig.n_significant >= 1
    assert sig.n_pairs == int(torch.isfinite(cs.scores).sum()) and len(sig.null_max) == 20
    assert sig.expected_by_chance_3std == pytest.approx(sig.n_pairs * 0.0013499, rel=1e-3)
    random_weights = all_layer_weights(tiny_gpt2[0])
    rs = composition_scores(random_weights, "K")
    rsig = pair_significance(rs, random_weights, alpha=0.05, n_draws=20, seed=2)
    assert rsig.n_significant <= 1, rsig.n_significant        # no structure: (almost) nothing survives
    maxima, null = max_statistic_null(random_weights, "K", n_draws=20, seed=2)   # the draws rsig used
    assert maxima == rsig.null_max == null.max(1).values.tolist() and null.shape == (20, rsig.n_pairs)
    level = rs.baseline_mean + 3 * rs.baseline_std
    per_draw = [sum(float(x) > level for x in row) for row in null.tolist()]
    assert rsig.null_above_3std == pytest.approx(sum(per_draw) / 20)
    assert (rsig.null_mean, rsig.null_std) == pytest.approx((float(null.mean()), float(null.std())))
    with pytest.raises(BandwidthInputError, match="alpha"):
        pair_significance(cs, weights, alpha=1.5)
    with pytest.raises(BandwidthInputError, match="n_draws"):
        max_statistic_null(weights, "K", n_draws=0)


def test_order_statistic_threshold_has_the_stated_error_rate():
    """The family-wise threshold's false-alarm rate is exact: simulate the real maximum and m null maxima
    from one continuous law and count how often the real one exceeds the threshold."""
    from residual_bandwidth.composition import draws_needed, order_statistic_threshold
    assert draws_needed(0.05) == 19 and draws_needed(0.1) == 9 and draws_needed(0.01) == 99
    g = torch.Generator().manual_seed(0)
    for m, alpha in ((19, 0.05), (39, 0.05), (60, 0.1)):
        hits, trials = 0, 20000
        sims = torch.randn(trials, m + 1, generator=g, dtype=torch.float64)
        thr0, j, rate = order_statistic_threshold(sims[0, 1:].tolist(), alpha)
        assert rate <= alpha and j <= m
        for row in sims:
            thr, _, _ = order_statistic_threshold(row[1:].tolist(), alpha)
            hits += bool(row[0] > thr)
        se = (rate * (1 - rate) / trials) ** 0.5
        assert abs(hits / trials - rate) < 4 * se, (m, alpha, hits / trials, rate)
    # the interpolated 95 % quantile of 10 maxima (the old rule) is exceeded far more often than 5 %
    sims = torch.randn(20000, 11, generator=g, dtype=torch.float64)
    old = torch.quantile(sims[:, 1:], 0.95, dim=1)
    assert float((sims[:, 0] > old).double().mean()) > 0.1
    with pytest.raises(BandwidthInputError, match="at least 19 draws"):
        order_statistic_threshold([0.1] * 10, 0.05)


def test_circuit_svds_are_computed_once_per_extracted_layer(tiny_gpt2, monkeypatch):
    """Every head's subspaces and every kind of composition score read one SVD per layer; a copy made
    with .to() (or a fresh extraction after changing the model) gets its own."""
    import residual_bandwidth.composition as comp
    model = tiny_gpt2[0]
    calls = []
    real = comp.factored_svd
    monkeypatch.setattr(comp, "factored_svd", lambda a, b: calls.append(1) or real(a, b))
    weights = all_layer_weights(model)
    expected = [component_subspaces(lw, h)["ov_write"] for lw in weights for h in range(lw.n_heads)]
    for kind in ("Q", "K", "V"):
        composition_scores(weights, kind)
    assert len(calls) == 2 * len(weights), "one OV and one QK factored SVD per layer"
    again = [component_subspaces(lw, h)["ov_write"] for lw in weights for h in range(lw.n_heads)]
    assert all(torch.equal(a, b) for a, b in zip(expected, again))
    copy64 = weights[0].to(torch.float64)
    assert "_circuit_svd" not in copy64.__dict__          # the copy is not a cached view of the original
    component_subspaces(copy64, 0)
    assert len(calls) == 2 * len(weights) + 2
