"""The measurements the lesson's findings rest on, on data whose answer is known (no model needed):
erasure per direction, held-out crowding spread, r_p against n, the bootstrap interval of the
compression curve and the toy model of superposition."""
from __future__ import annotations

import pytest
import torch

from residual_bandwidth.bottlenecks import heldout_spread, layer_scores
from residual_bandwidth.compression import bootstrap_delta
from residual_bandwidth.convergence import plot_rank_against_n, rank_against_n
from residual_bandwidth.memory import direction_erasure
from residual_bandwidth.superposition import plot_superposition, sparsity_sweep, train_toy_model
from residual_bandwidth.validation import BandwidthInputError


def _low_rank(n, d, r, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.5, r, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    return (torch.randn(n, r, generator=g, dtype=torch.float64) * scales) @ basis.T \
        + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_direction_erasure_finds_the_one_direction_a_component_cancels():
    read = _low_rank(400, 32, 12) + 5.0                       # a mean, as residual streams have
    mu = read.mean(0)
    v = torch.linalg.svd(read - mu, full_matrices=False).Vh[2]  # the third principal direction
    write = -((read - mu) @ v)[:, None] * v[None, :]           # cancels exactly the variation along v
    de = direction_erasure(write, read)
    i, beta = de.most_negative
    assert i == 2 and beta == pytest.approx(-1.0, abs=1e-9)
    others = torch.cat([de.beta[:2], de.beta[3:]])
    assert float(others.abs().max()) < 1e-9
    assert de.null_min > -0.5                                  # shuffled tokens do not look like erasure
    assert -0.5 < de.per_vector < 0                            # the per-vector average hides it
    assert de.weighted_mean() == pytest.approx(-float(de.variance_share[2] / de.variance_share.sum()), rel=1e-6)
    with pytest.raises(BandwidthInputError, match="shape"):
        direction_erasure(write[:, :5], read)


def test_direction_erasure_leaves_out_rows_whose_write_is_massive():
    read = _low_rank(200, 16, 6, seed=1)
    write = torch.zeros_like(read)
    write[0] = 1e4 * torch.ones(16, dtype=torch.float64)      # one token where the component writes a massive vector
    de = direction_erasure(write, read)
    assert de.n_tokens == 199 and float(de.beta.abs().max()) < 1e-9


def test_heldout_spread_measures_the_in_sample_bias_and_keeps_a_crowded_row():
    x = _low_rank(301, 40, 30, seed=2, noise=0.3)
    sc = layer_scores(x)
    hs = heldout_spread(x, n_splits=6, seed=0)
    assert hs["bias"] > 1.0                                     # held-out typical rows look more spread in sample
    typical = sc["typical"]
    assert 0.8 < float(hs["spread"][typical].nanmedian()) < 1.25  # out of sample a typical row reads about 1
    even = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:30].sum(0)
    x[7] = x.mean(0) + 3 * float(x.norm(dim=1).median()) * even / even.norm()
    hs = heldout_spread(x, seed=0)
    assert float(hs["spread"][7]) > 1.0 and float(hs["percentile"][7]) > 0.9
    with pytest.raises(BandwidthInputError, match="typical rows"):
        heldout_spread(torch.randn(5, 4, dtype=torch.float64))


def test_rank_against_n_is_capped_by_the_sample_and_rises_with_n():
    x = _low_rank(2000, 64, 60, seed=3, noise=0.2)
    recs = rank_against_n(x, [16, 65, 400, 2000, 5000], repeats=3, seed=0, layer=4)
    assert [r["n"] for r in recs] == [16, 65, 400, 2000]          # n above the rows is skipped
    assert recs[0]["max"] <= 15 and not recs[0]["judgeable"] and recs[1]["judgeable"]
    assert recs[-1]["repeats"] == 1 and recs[-1]["mean"] > recs[1]["mean"]
    fig = plot_rank_against_n(recs, 64)
    assert len(fig.table) == 4 and "n = 65" in fig.alt_text
    fig.close()


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_texts():
    g = torch.Generator().manual_seed(4)

    def texts(m):
        n = torch.randint(10, 30, (m,), generator=g).double()
        base = torch.stack([2.5 * n, torch.zeros(m), n], 1)
        mod = torch.stack([base[:, 0] + n * (0.1 + 0.05 * torch.randn(m, generator=g, dtype=torch.float64)),
                           torch.zeros(m), n], 1)
        return mod, base

    mod, base = texts(8)
    est = float((mod[:, 0].sum() - base[:, 0].sum()) / mod[:, 2].sum())
    lo, hi = bootstrap_delta(mod, base, seed=0)
    assert lo <= est <= hi
    mod2, base2 = texts(200)
    lo2, hi2 = bootstrap_delta(mod2, base2, seed=0)
    assert hi2 - lo2 < hi - lo and lo2 < 0.1 < hi2


def test_toy_model_stores_more_features_than_dimensions_only_when_features_are_sparse():
    torch.set_num_threads(1)
    dense, sparse = sparsity_sweep((0.0, 0.99), n_features=12, n_dims=4, steps=600, seed=0)
    assert dense.represented <= 5 and dense.features_per_dim <= 1.25
    assert sparse.represented > dense.represented and sparse.features_per_dim > 1.5
    assert sparse.max_interference > dense.max_interference
    fig = plot_superposition([dense, sparse])
    assert [r["sparsity"] for r in fig.table] == [0.0, 0.99] and "features" in fig.alt_text
    fig.close()
    with pytest.raises(BandwidthInputError, match="n_dims"):
        train_toy_model(n_features=4, n_dims=4)


def test_composition_figure_marks_the_family_wise_threshold_when_given():
    from residual_bandwidth.viz import plot_composition_scores
    comp = {"kind": "K", "src_labels": ["L0H0", "L0H1"], "dst_labels": ["L1H0", "L1H1"],
            "scores": [[0.30, 0.05], [0.12, 0.08]], "baseline_mean": 0.05, "baseline_std": 0.01}
    by_std = plot_composition_scores(comp)
    assert sum(r["above_baseline"] for r in by_std.table) == 2          # above mean + 3 std = 0.08: two
    fam = plot_composition_scores(comp, threshold=0.2, threshold_label="family-wise threshold")
    assert sum(r["above_threshold"] for r in fam.table) == 1
    assert "family-wise threshold = 0.2" in fam.alt_text and "3 std" not in fam.alt_text.split("Strongest")[0]
    by_std.close()
    fam.close()
