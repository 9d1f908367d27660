"""Each kind of bad input raises BandwidthInputError with a message that names the problem."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from residual_bandwidth import BandwidthInputError, ResidualBandwidthAnalyzer, compute_metrics
from residual_bandwidth.validation import as_matrix, as_matrix_list, check_prompts


def good(n=10, d=8):
    return torch.randn(n, d)


@pytest.mark.parametrize("x,pattern", [
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"1 NaN and 0 Inf.*position\(s\) \[0\]"),
    (torch.tensor([[1.0, 2.0], [float("inf"), 1.0]]), r"0 NaN and 1 Inf.*\[1\]"),
    (torch.randn(8), r"expected 2 dimensions.*\(8,\)"),
    (torch.randn(2, 5, 8), r"expected 2 dimensions.*a batch\?"),
    (torch.randint(0, 5, (4, 8)), r"not a floating type.*token ids"),
    (torch.ones(4, 8, dtype=torch.bool), r"not a floating type"),
    (torch.randn(4, 8, dtype=torch.complex64), r"complex"),
    (np.arange(32).reshape(4, 8), r"dtype int64 is not a floating type"),
    (torch.randn(0, 8), r"empty matrix"),
    (torch.randn(1, 8), r"1 position\(s\); at least 2"),
    ([[1.0, 2.0], [3.0, 4.0]], r"expected a torch.Tensor or numpy.ndarray.*got list"),
    ("residuals", r"got str"),
    (torch.empty((10, 70_000), device="meta"), r"too large"),
    (torch.empty((2**20, 2**15), device="meta"), r"too large"),
])
def test_bad_matrices_are_named(x, pattern):
    with pytest.raises(BandwidthInputError, match=pattern):
        as_matrix(x, name="residual_states", layer=3)


def test_message_names_argument_and_layer():
    with pytest.raises(BandwidthInputError, match=r"^residual_states\[2\] \(layer 2\): contains"):
        as_matrix_list([good(), good(), torch.full((4, 8), float("nan"))])


def test_mismatched_d_model_names_the_layer():
    with pytest.raises(BandwidthInputError, match=r"residual_states\[1\] \(layer 1\): d_model = 16 but layer 0 has d_model = 8"):
        as_matrix_list([good(10, 8), good(10, 16)])


def test_empty_and_wrong_containers():
    with pytest.raises(BandwidthInputError, match="empty list"):
        as_matrix_list([])
    with pytest.raises(BandwidthInputError, match="got a mapping"):
        as_matrix_list({"a": good()})
    with pytest.raises(BandwidthInputError, match="single array"):
        as_matrix_list(good())


def test_half_precision_is_accepted_and_upcast():
    x = torch.randn(50, 16)
    a = compute_metrics(x)
    b = compute_metrics(x.to(torch.bfloat16))
    assert abs(a.participation_ratio - b.participation_ratio) / a.participation_ratio < 0.05


def test_analyzer_arguments_are_validated():
    with pytest.raises(BandwidthInputError, match="variance_threshold"):
        ResidualBandwidthAnalyzer(variance_threshold=0)
    with pytest.raises(BandwidthInputError, match="massive_ratio"):
        ResidualBandwidthAnalyzer(massive_ratio=-1)
    with pytest.raises(BandwidthInputError, match="massive_ratio"):
        ResidualBandwidthAnalyzer(massive_ratio=float("nan"))


@pytest.mark.parametrize("prompts,pattern", [([], "non-empty"), (["ok", ""], r"prompts\[1\]: empty"),
                                             (["ok", 3], r"prompts\[1\]: expected str"), (None, "non-empty")])
def test_bad_prompts(prompts, pattern):
    with pytest.raises(BandwidthInputError, match=pattern):
        check_prompts(prompts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finite_check_fast_path_and_overflow_fallback(dtype):
    """``all_finite`` trusts a finite sum; a sum that overflows must fall back to the entrywise check."""
    from residual_bandwidth.validation import all_finite
    big = torch.finfo(dtype).max / 2
    x = torch.full((64, 8), big, dtype=dtype)  # finite entries whose sum overflows to Inf
    assert not bool(torch.isfinite(x.sum()))
    assert all_finite(x) and as_matrix(x) is not None
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = torch.ones(20_000, 4, dtype=dtype)  # more rows than one block of the fallback
        y[17_000, 2] = bad
        assert not all_finite(y)
        with pytest.raises(BandwidthInputError, match=r"position\(s\) \[17000\]"):
            as_matrix(y)
    z = torch.full((4, 4), big, dtype=dtype)
    z[0, 0], z[1, 1] = float("inf"), float("-inf")  # Inf - Inf: the sum is NaN, still caught
    assert not all_finite(z)


def test_size_limit_is_about_absurd_inputs_not_long_traffic():
    """A million positions of a 4096-wide model is allowed (the metrics stream it); 2**35 entries is not."""
    assert as_matrix(torch.empty(1_000_000, 4096, device="meta")).shape == (1_000_000, 4096)
    with pytest.raises(BandwidthInputError, match="too large"):
        as_matrix(torch.empty(2**20, 2**15, device="meta"))
    # allowed as a matrix, but its spectrum would need a 40000 x 40000 Gram matrix (12 GiB)
    wide = torch.empty(40_000, 60_000, device="meta")
    assert as_matrix(wide).shape == (40_000, 60_000)
    with pytest.raises(BandwidthInputError, match=r"40000 x 40000 float64 matrix \(12 GiB\)"):
        compute_metrics(wide)
    with pytest.raises(BandwidthInputError, match="too large"):
        as_matrix(torch.empty(4, 70_000, device="meta"))


def test_sparse_tensors_are_named_not_a_torch_internal_error():
    from residual_bandwidth.streaming import StreamingMoments
    dense = torch.randn(20, 8, dtype=torch.float64)
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        with pytest.raises(BandwidthInputError, match=r"sparse tensor .*to_dense\(\)"):
            compute_metrics(sparse)
        with pytest.raises(BandwidthInputError, match=r"sparse tensor .*to_dense\(\)"):
            StreamingMoments(8).update(sparse)
