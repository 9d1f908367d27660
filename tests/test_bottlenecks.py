"""Bottleneck detection: a planted crowded position is found, loud-but-one-dimensional is not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from residual_bandwidth import BandwidthInputError, massive_rows
from residual_bandwidth.bottlenecks import (SEVERITIES, find_bottlenecks, layer_scores,
                                            seed_abs_participation_ratio, severity)
from conftest import random_orthogonal

CROWDED, ONE_DIM, MASSIVE = 10, 20, 30
GRID_KEYS = {"layer", "prompt", "position", "token", "norm_ratio", "spread", "score", "severity", "massive"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_stack(rng, n=60, d=64, ranks=(8, 16, 24), noise=0.05):
    """One [n, d] matrix per layer: rank-r signal with decreasing scales plus small noise. In layer 1,
    row CROWDED is 3x the median norm and isotropic, row ONE_DIM is 3x the median norm along the
    layer's first principal direction, and row MASSIVE is 20x along one direction."""
    layers = []
    for i, r in enumerate(ranks):
        basis = np.linalg.qr(rng.normal(size=(d, r)))[0]
        x = (rng.normal(size=(n, r)) * np.linspace(2, 0.5, r)) @ basis.T + noise * rng.normal(size=(n, d))
        if i == 1:
            med = np.median(np.linalg.norm(x, axis=1))
            typical = np.ones(n, bool)
            typical[[CROWDED, ONE_DIM, MASSIVE]] = False
            xc = x[typical] - x[typical].mean(0)
            pc1 = np.linalg.svd(xc, full_matrices=False)[2][0]
            g = rng.normal(size=d)
            x[CROWDED] = 3 * med * g / np.linalg.norm(g)
            x[ONE_DIM] = x[typical].mean(0) + 3 * med * pc1
            x[MASSIVE] = 20 * med * pc1
        layers.append(torch.tensor(x, dtype=torch.float32))
    return layers


def test_planted_crowded_position_found_and_one_dimensional_not(rng):
    rep = find_bottlenecks(make_stack(rng))
    recs = {(r["layer"], r["position"]): r for r in rep.grid_records()}
    crowded, one_dim, massive = recs[(1, CROWDED)], recs[(1, ONE_DIM)], recs[(1, MASSIVE)]
    assert crowded["severity"] == "critical" and crowded["spread"] > 1.5
    assert crowded["norm_ratio"] == pytest.approx(3, rel=0.05)
    assert one_dim["norm_ratio"] > 2.9 and one_dim["spread"] < 0.5 and one_dim["severity"] == "none"
    assert massive["severity"] == "massive" and massive["massive"]
    assert [(r["layer"], r["position"]) for r in rep.flagged(["critical"])] == [(1, CROWDED)]
    assert [(r["layer"], r["position"]) for r in rep.flagged() if r["layer"] == 1] == [(1, CROWDED)]
    counts = rep.counts()
    assert counts["critical"] == 1 and counts["massive"] == 1 and counts["warning"] <= 2   # Gaussian tails


def test_no_bottleneck_invented_in_isotropic_data(rng):
    x = [torch.tensor(rng.normal(size=(300, 32)), dtype=torch.float32) for _ in range(3)]
    assert find_bottlenecks(x).flagged() == []


def test_flags_are_checked_out_of_sample(rng):
    """The planted crowded row is confirmed out of sample; ordinary rows made loud (drawn from the
    layer's own distribution, scaled 2.6x about its mean) are flagged in sample, because a basis
    describes the rows it was fitted on better than new ones, and none of them is confirmed; a loud
    row that is massive at another layer is recorded as such and not confirmed."""
    stack = make_stack(rng, n=120)                              # 60 rows: the halves are too small to confirm reliably
    med0 = float(stack[0].norm(dim=1).median())
    g = torch.tensor(rng.normal(size=64), dtype=torch.float32)
    stack[0][MASSIVE] = 3 * med0 * g / g.norm()                 # loud and spread at layer 0, massive at layer 1
    rep = find_bottlenecks(stack)
    oos = {(r["layer"], r["position"]): r for r in rep.out_of_sample}
    assert set(oos) == {(r["layer"], r["position"]) for r in rep.flagged()}
    crowded, tail = oos[(1, CROWDED)], oos[(0, MASSIVE)]
    assert crowded["percentile_heldout"] >= 0.95 and not crowded["massive_elsewhere"]
    assert tail["massive_elsewhere"] and not oos.get((1, ONE_DIM))
    assert (1, CROWDED) in {(r["layer"], r["position"]) for r in rep.confirmed()}
    assert (0, MASSIVE) not in {(r["layer"], r["position"]) for r in rep.confirmed()}
    assert rep.to_dict()["n_confirmed"] == len(rep.confirmed())

    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 30, generator=gen, dtype=torch.float64))[0]
    draw = lambda m: ((torch.randn(m, 30, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.5, 30,
                      dtype=torch.float64)) @ basis.T + 0.3 * torch.randn(m, 40, generator=gen, dtype=torch.float64))
    x = draw(200)
    mu = x.mean(0)
    x[:10] = mu + 2.6 * (draw(10) - mu)
    rep = find_bottlenecks([x])
    assert len(rep.flagged()) >= 4 and rep.out_of_sample[0]["bias"] > 1.1
    assert rep.confirmed() == [] and max(r["percentile_heldout"] for r in rep.out_of_sample) < 0.9

    gen = torch.Generator().manual_seed(0)
    small = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(8, generator=gen, dtype=torch.float64)
    small[5] = 3 * small.norm(dim=1).median() * v / v.norm()   # flagged, but 5 typical rows cannot be halved
    rep = find_bottlenecks([small])
    assert [r["position"] for r in rep.flagged()] == [5] and rep.out_of_sample[0]["percentile_heldout"] is None
    assert rep.confirmed() == [] and any("not checked out of sample" in n and "5 typical rows" in n for n in rep.notes)


def test_records_keys_and_per_layer_growth(rng):
    rep = find_bottlenecks(make_stack(rng, ranks=(6, 14, 30)))
    assert len(rep.grid_records()) == 3 * 60
    for r in rep.grid_records():
        assert set(r) == GRID_KEYS and r["severity"] in SEVERITIES
    per = rep.per_layer_records()
    assert [set(p) for p in per] == [{"layer", "utilization_available", "utilization_d_model",
                                      "variance_rank", "n_flagged"}] * 3
    ranks = [p["variance_rank"] for p in per]
    assert ranks[0] < ranks[1] < ranks[2] and rep.utilization_slope is None   # 57 rows < d + 1: not judgeable
    wide = find_bottlenecks(make_stack(rng, n=200, ranks=(6, 14, 30)))
    wide_per = wide.per_layer_records()
    slope = np.polyfit([0, 1, 2], [p["utilization_d_model"] for p in wide_per], 1)[0]
    assert wide.utilization_slope == pytest.approx(slope) and slope > 0
    assert per[1]["n_flagged"] == 1 and per[0]["n_flagged"] == 0
    assert per[1]["utilization_d_model"] == pytest.approx(per[1]["variance_rank"] / 64)
    d = rep.to_dict()
    assert d["counts"]["critical"] == 1 and len(d["grid"]) == 180


def test_rotating_the_residual_basis_changes_nothing(rng):
    stack = make_stack(rng)
    Q = torch.tensor(random_orthogonal(64, rng), dtype=torch.float32)
    a = find_bottlenecks(stack).grid_records()
    b = find_bottlenecks([x @ Q for x in stack]).grid_records()
    assert [r["severity"] for r in a] == [r["severity"] for r in b]
    for key in ("norm_ratio", "spread", "score"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-3)


def test_seed_metric_cannot_see_loudness(rng):
    """The seed's PR of |x| is ~ (2/pi) d for every Gaussian row, loud or quiet, so its 0.8 d
    threshold never fires (its checkpoint 2 data: one row 20x louder)."""
    d = 32
    x = torch.tensor(rng.normal(size=(200, d)) * 0.1)
    x[5] = torch.tensor(rng.normal(size=d) * 2.0)
    pr = seed_abs_participation_ratio(x)
    assert float(pr.mean()) == pytest.approx(2 / np.pi * d, rel=0.05)
    assert abs(float(pr[5]) - float(pr.median())) < 0.2 * d    # the loud row is not special
    assert int((pr > 0.8 * d).sum()) <= 2                       # seed threshold: (almost) never
    assert torch.allclose(seed_abs_participation_ratio(100 * x), pr)
    rep = find_bottlenecks([x.float(), x.float()])              # ours sees the loud row
    row5 = [r for r in rep.grid_records() if r["position"] == 5][0]
    assert row5["norm_ratio"] > 10 and row5["severity"] == "massive"


def test_severity_rule():
    assert severity(1.0, 5.0) == "none"                   # typical loudness, even if spread
    assert severity(2.5, 0.3) == "none"                   # loud but one-dimensional
    assert severity(2.5, 1.2) == "warning"
    assert severity(3.0, 2.0) == "critical"
    assert severity(50.0, 0.2) == "massive" and severity(50.0, 3.0) == "massive"


def test_embedded_model_massive_rows_are_not_bottlenecks(embedded_capture):
    cap = embedded_capture
    rep = find_bottlenecks(cap)
    assert len(rep.grid_records()) == cap.n_layers * cap.n_rows
    for L in (5, 15, 25):
        x = cap.get("resid_post", L)
        rows = {m.row for m in massive_rows(x, layer=L)}
        got = {i for i, r in enumerate(r for r in rep.grid_records() if r["layer"] == L) if r["severity"] == "massive"}
        assert got == rows and rows                              # position 0 of every prompt, at least
    for r in rep.grid_records():
        assert r["massive"] == (r["severity"] == "massive")
    assert all(not r["massive"] for r in rep.flagged())
    assert all(0 < p["utilization_available"] <= 1 for p in rep.per_layer_records())


def test_layer_scores_spread_is_one_for_a_typical_row(rng):
    x = torch.tensor(rng.normal(size=(80, 16)), dtype=torch.float32)
    s = layer_scores(x)
    assert float(s["spread"][s["typical"]].median()) == pytest.approx(1.0)
    assert bool(s["typical"].all())


def test_bad_input_is_named(rng):
    stack = make_stack(rng)
    with pytest.raises(BandwidthInputError, match="massive_ratio"):
        find_bottlenecks(stack, loud_ratio=5, massive_ratio=4)
    with pytest.raises(BandwidthInputError, match="loud_ratio"):
        find_bottlenecks(stack, loud_ratio=-1)
    with pytest.raises(BandwidthInputError, match=r"blocks\.7\.hook_resid_post was not captured"):
        find_bottlenecks(stack, layers=[7])
    bad = [s.clone() for s in stack]
    bad[2][3, 4] = float("nan")
    with pytest.raises(BandwidthInputError, match=r"layer 2.*NaN"):
        find_bottlenecks(bad)
    with pytest.raises(BandwidthInputError, match="identical"):
        find_bottlenecks([torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [9.0, 0.0]])])
    with pytest.raises(BandwidthInputError, match="single array"):
        find_bottlenecks(torch.zeros(5, 4))


def test_spread_matches_an_svd_reference(rng):
    """The PCA of the typical rows is metrics.principal_directions (eigh of the covariance, one noise
    floor) instead of bottlenecks' own SVD: the spread agrees with an SVD computed here to round-off."""
    x = make_stack(rng)[1]
    s = layer_scores(x, loud_ratio=2.0)
    x64 = torch.as_tensor(x, dtype=torch.float64)
    t = x64[s["typical"]]
    mu = t.mean(0)
    _, sv, vh = torch.linalg.svd(t - mu, full_matrices=False)
    c2 = ((x64 - mu) @ vh[sv > sv[0] * 1e-6].T) ** 2
    pr = c2.sum(1) ** 2 / (c2 ** 2).sum(1)
    assert torch.allclose(s["spread"], pr / pr[s["typical"]].median(), rtol=1e-8)


def test_massive_rule_when_most_rows_are_zero():
    """One massive rule (outliers.massive_mask): with a median norm of 0 every non-zero row is massive
    and a zero row is not (the old massive_rows flagged the zero rows too, as inf >= ratio)."""
    x = torch.zeros(5, 4, dtype=torch.float64)
    x[3, 0], x[4, 1] = 1.0, 2.0
    assert [m.row for m in massive_rows(x)] == [3, 4]
