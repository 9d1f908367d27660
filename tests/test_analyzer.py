"""The analyzer on planted structure and on the embedded model (massive activation at position 0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from residual_bandwidth import (BandwidthInputError, ResidualBandwidthAnalyzer, ResidualCapture,
                                compute_metrics, massive_rows, outlier_dimensions)
from conftest import random_orthogonal


def test_planted_massive_row_is_found_and_excluded(rng):
    layers = [torch.tensor(rng.normal(size=(40, 32))) for _ in range(3)]
    for L in (1, 2):
        layers[L][7] = 0.0
        layers[L][7, 5] = 300.0  # one row, one dimension, ~50x the typical norm
    an = ResidualBandwidthAnalyzer()
    rep = an.analyze_layers(layers)
    assert {(m.layer, m.row) for m in rep.massive} == {(1, 7), (2, 7)}
    m = rep.massive[0]
    assert m.top_dims[0][0] == 5 and m.top_dims[0][2] == pytest.approx(1.0)
    assert m.ratio == pytest.approx(300 / float(layers[1].norm(dim=1).median()), rel=1e-6)
    assert rep.excluded_rows == [7]
    # with the row: one direction dominates; without it: the isotropic rest
    assert rep.all_positions[1].variance_rank < 5 < rep.without_massive[1].variance_rank
    clean = compute_metrics(torch.cat([layers[1][:7], layers[1][8:]]), layer=1)
    assert rep.without_massive[1].variance_rank == clean.variance_rank
    assert rep.without_massive[1].participation_ratio == pytest.approx(clean.participation_ratio)


def test_no_massive_rows_invented_in_gaussian_data(rng):
    x = torch.tensor(rng.normal(size=(500, 64)))
    assert massive_rows(x) == []
    assert outlier_dimensions(x) == []


def test_keep_massive_option(rng):
    layers = [torch.tensor(rng.normal(size=(30, 16))) for _ in range(2)]
    layers[0][0, 0] = 500.0
    rep = ResidualBandwidthAnalyzer(exclude_massive=False).analyze_layers(layers)
    assert rep.excluded_rows == [] and rep.massive
    assert rep.without_massive[0].variance_rank == rep.all_positions[0].variance_rank


def test_outlier_dimension_is_found(rng):
    x = rng.normal(size=(200, 32))
    x[:, 9] *= 20
    dims = outlier_dimensions(torch.tensor(x))
    assert [d.dim for d in dims] == [9] and dims[0].ratio > 10


def test_massive_detection_is_rotation_invariant_but_outlier_dims_are_not(rng):
    x = rng.normal(size=(100, 32))
    x[3] *= 40
    q = random_orthogonal(32, rng)
    a, b = massive_rows(torch.tensor(x)), massive_rows(torch.tensor(x @ q))
    assert [m.row for m in a] == [m.row for m in b] == [3]
    assert a[0].ratio == pytest.approx(b[0].ratio)


def test_pooled_metrics_match_concatenation(rng):
    layers = [torch.tensor(rng.normal(size=(20, 16)) * (i + 1)) for i in range(3)]
    pooled = ResidualBandwidthAnalyzer().analyze_effective_bandwidth(layers)
    ref = compute_metrics(torch.cat(layers))
    assert pooled.layer == "all" and pooled.variance_rank == ref.variance_rank
    assert pooled.participation_ratio == pytest.approx(ref.participation_ratio)


def test_accepts_hook_mapping(rng):
    cache = {f"blocks.{L}.hook_resid_post": torch.tensor(rng.normal(size=(12, 8))) for L in range(2)}
    rep = ResidualBandwidthAnalyzer().analyze_layers(cache)
    assert rep.layers == [0, 1]


def test_everything_massive_is_an_error():
    x = torch.zeros(3, 4)
    x[0, 0], x[1, 1] = 100.0, 100.0  # median norm 100 ... make all rows loud but one
    with pytest.raises(BandwidthInputError):
        ResidualBandwidthAnalyzer(massive_ratio=0.5).analyze_layers([torch.ones(2, 4) * torch.tensor([1., 2, 3, 4])])


def test_position_zero_massive_activation_on_embedded(embedded_capture):
    rep = ResidualBandwidthAnalyzer().analyze_layers(embedded_capture)
    assert len(rep.all_positions) == 30
    by_pos = {(m.prompt, m.position) for m in rep.massive}
    for prompt in range(len(embedded_capture.prompts)):
        assert (prompt, 0) in by_pos, f"prompt {prompt}: position 0 not flagged"
    mid = [m for m in rep.massive if m.position == 0 and 12 <= m.layer <= 25]
    assert mid and min(m.ratio for m in mid) > 30
    # one coordinate carries it; the same one in every prompt and layer
    assert len({m.top_dims[0][0] for m in mid}) == 1 and min(m.top_dims[0][2] for m in mid) > 0.9
    # and it collapses the spectrum: with it the 95% rank is ~1, without it tens of dimensions
    for L in range(15, 26):
        assert rep.all_positions[L].variance_rank <= 2
        assert rep.without_massive[L].variance_rank >= 20


def test_coordinate_massive_mask_is_sun_et_als_per_coordinate_rule(rng):
    """Closed form: median |x_ij| of a matrix of +-1 is 1, so one coordinate of 1000 makes its row
    massive at ratio 10^3 and not at 1001; a row merely 100x louder in every coordinate (norm ratio 100)
    is not massive per coordinate. The row rule (massive_mask on norms) flags both."""
    from residual_bandwidth import BandwidthInputError, coordinate_massive_mask, massive_mask
    x = torch.from_numpy(np.sign(rng.standard_normal((50, 16)))).double()
    x[3, 7], x[10] = 1000.0, 100.0 * x[10]
    assert coordinate_massive_mask(x).nonzero().flatten().tolist() == [3]
    assert not coordinate_massive_mask(x, ratio=1001).any()
    assert massive_mask(x.norm(dim=1), 4.0).nonzero().flatten().tolist() == [3, 10]
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    zeros[2, 1] = 1e-9                                 # median 0: any non-zero coordinate counts
    assert coordinate_massive_mask(zeros).tolist() == [False, False, True, False]
    with pytest.raises(BandwidthInputError, match="ratio"):
        coordinate_massive_mask(x, ratio=0)
    with pytest.raises(BandwidthInputError, match="NaN"):
        coordinate_massive_mask(torch.full((2, 2), float("nan")))
