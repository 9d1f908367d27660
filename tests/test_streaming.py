"""Streaming mean/covariance (Chan et al. merge) against the batch computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from residual_bandwidth.metrics import compute_metrics, spectrum
from residual_bandwidth.streaming import StreamingMoments
from residual_bandwidth.validation import BandwidthInputError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _anisotropic(rng, n, d, offset=3.0):
    scales = np.geomspace(10.0, 0.01, d)
    return rng.normal(size=(n, d)) * scales + offset


def _chunks(rng, x, max_size=40):
    i = 0
    while i < len(x):
        m = int(rng.integers(0, max_size))  # includes empty and one-row chunks
        yield x[i:i + m]
        i += m


def _scatter(x):
    xc = x - x.mean(axis=0)
    return xc.T @ xc


@pytest.mark.parametrize("buffer_rows", [0, 37])
def test_stream_equals_batch_after_random_chunks(rng, buffer_rows):
    x = _anisotropic(rng, 1500, 24)
    s = StreamingMoments(24, buffer_rows=buffer_rows)
    seen = []
    for i, c in enumerate(_chunks(rng, x)):
        chunk = torch.from_numpy(c).float() if i % 3 == 0 else c  # mixed float32 / float64 input
        s.update(chunk)
        seen.append(chunk.double().numpy() if isinstance(chunk, torch.Tensor) else chunk)
    x_seen = np.concatenate(seen)  # what was fed, float32 rounding included
    assert len(seen) > 50
    assert s.n == len(x)
    np.testing.assert_allclose(s.mean.numpy(), x_seen.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.scatter.numpy(), _scatter(x_seen), rtol=1e-9, atol=1e-9 * np.abs(_scatter(x_seen)).max())
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(x_seen, rowvar=False), rtol=1e-9,
                               atol=1e-12 * np.abs(np.cov(x_seen, rowvar=False)).max())
    ref = spectrum(x_seen)
    np.testing.assert_allclose(s.eigenvalues(), ref.eigenvalues, rtol=1e-8, atol=1e-9 * ref.eigenvalues[0])
    m = compute_metrics(x_seen)
    assert s.variance_threshold_rank(0.95) == m.variance_rank
    assert s.participation_ratio() == pytest.approx(m.participation_ratio, rel=1e-10)
    assert s.stable_rank() == pytest.approx(m.stable_rank, rel=1e-10)
    assert s.entropy_effective_rank() == pytest.approx(m.entropy_rank, rel=1e-10)
    assert s.spectral_entropy() == pytest.approx(m.spectral_entropy, rel=1e-10)
    summ = s.summary(0.95)
    assert summ["variance_rank"] == m.variance_rank and summ["n"] == len(x)
    assert summ["utilization_d_model"] == pytest.approx(m.variance_rank / 24)


def test_single_row_updates_are_welford(rng):
    x = _anisotropic(rng, 200, 8)
    s = StreamingMoments(8)
    for row in x:
        s.update(row)  # a [d] row
    np.testing.assert_allclose(s.mean.numpy(), x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.scatter.numpy(), _scatter(x), rtol=1e-10, atol=1e-10)


def test_numerically_stable_with_a_large_offset(rng):
    """Mean 1e6, standard deviation 1: the naive E[x^2] - E[x]^2 loses every digit here."""
    x = rng.normal(size=(4000, 6)) + 1e6
    s = StreamingMoments(6)
    for c in _chunks(rng, x, 100):
        s.update(c)
    exact = np.cov(x, rowvar=False)
    np.testing.assert_allclose(s.covariance().numpy(), exact, rtol=1e-6, atol=1e-6)
    naive = (x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0))) / (len(x) - 1)
    assert np.abs(naive - exact).max() > 1e-3  # the test data really defeat the naive formula


def test_merge_equals_one_stream_in_any_order(rng):
    x = _anisotropic(rng, 900, 12)
    parts = [x[:100], x[100:101], x[101:500], x[500:]]
    accs = []
    for i, p in enumerate(parts):
        a = StreamingMoments(12, buffer_rows=16 * i)  # some with rows still pending in a buffer
        for c in _chunks(rng, p, 30):
            a.update(c)
        accs.append(a)
    accs.append(StreamingMoments(12))  # an empty one merges as a no-op
    forward = StreamingMoments.combine(accs)
    backward = StreamingMoments.combine(accs[::-1])
    for acc in (forward, backward):
        assert acc.n == 900
        np.testing.assert_allclose(acc.mean.numpy(), x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(acc.scatter.numpy(), _scatter(x), rtol=1e-10, atol=1e-8)
    # merge leaves the other accumulator untouched
    before = accs[0].scatter.clone()
    forward.merge(accs[0])
    assert torch.equal(accs[0].scatter, before)


def test_fewer_rows_than_dimensions_matches_spectrum(rng):
    x = _anisotropic(rng, 7, 20)
    s = StreamingMoments(20).update(x[:3]).update(x[3:])
    ref = spectrum(x)
    lam = s.eigenvalues()
    assert lam.shape == ref.eigenvalues.shape == (7,)
    np.testing.assert_allclose(lam, ref.eigenvalues, rtol=1e-9, atol=1e-9 * ref.eigenvalues[0])
    assert lam[-1] == 0.0  # centred: rank <= n - 1, the tail is exactly zero like the batch version


def test_bad_chunks_are_rejected_and_leave_the_state_alone(rng):
    s = StreamingMoments(5).update(rng.normal(size=(10, 5)))
    mean, m2, n = s.mean.clone(), s.scatter.clone(), s.n
    bad = rng.normal(size=(4, 5))
    bad[2, 1] = np.nan
    for chunk in (bad, np.full((2, 5), np.inf), rng.normal(size=(3, 6)), "x",
                  torch.ones(3, 5, dtype=torch.int64)):
        with pytest.raises(BandwidthInputError):
            s.update(chunk)
    assert s.n == n and torch.equal(s.mean, mean) and torch.equal(s.scatter, m2)
    with pytest.raises(BandwidthInputError):
        StreamingMoments(0)
    with pytest.raises(BandwidthInputError):
        s.merge(StreamingMoments(6))


def test_constant_memory_and_lazy_cached_eigenvalues(rng):
    s = StreamingMoments(16, buffer_rows=32)
    ptr_mean, ptr_m2, nbytes = s.mean.data_ptr(), s.scatter.data_ptr(), s.nbytes
    for _ in range(300):
        s.update(rng.normal(size=(int(rng.integers(1, 20)), 16)))
    assert s.nbytes == nbytes == 8 * (16 + 16 * 16 + 32 * 16)
    assert s.mean.data_ptr() == ptr_mean and s.scatter.data_ptr() == ptr_m2  # updated in place
    assert s._pending == 0  # reading the scatter merged the buffered rows
    lam1 = s.eigenvalues()
    assert s._eig_cache is not None and s._eig_cache[0] == s.version
    s.update(rng.normal(size=(5, 16)) * 100)
    assert not np.allclose(s.eigenvalues(), lam1)  # cache invalidated by the update


def test_undefined_before_two_rows():
    s = StreamingMoments(3)
    assert s.summary()["variance_rank"] is None
    with pytest.raises(BandwidthInputError):
        s.eigenvalues()
    s.update(np.ones((4, 3)))  # zero variance
    with pytest.raises(BandwidthInputError):
        s.eigenvalues()
    assert s.summary()["participation_ratio"] is None


def test_participation_ratio_trace_form_is_rotation_invariant(rng):
    from conftest import random_orthogonal
    x = _anisotropic(rng, 300, 10)
    q = random_orthogonal(10, rng)
    a = StreamingMoments(10).update(x)
    b = StreamingMoments(10).update(x @ q)
    assert a.participation_ratio() == pytest.approx(b.participation_ratio(), rel=1e-9)
    assert a.variance_threshold_rank(0.9) == b.variance_threshold_rank(0.9)
    lam = a.eigenvalues()
    assert a.participation_ratio() == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-9)


def test_buffered_rows_count_and_show_in_every_read_out(rng):
    x = _anisotropic(rng, 30, 6)
    s = StreamingMoments(6, buffer_rows=100)
    s.update(x[:20]).update(x[20:])
    assert s.n == 30 and s._pending == 30  # still buffered, already counted
    np.testing.assert_allclose(s.eigenvalues(), spectrum(x).eigenvalues, rtol=1e-9,
                               atol=1e-12 * spectrum(x).eigenvalues[0])
    assert s._pending == 0
    with pytest.raises(BandwidthInputError):
        StreamingMoments(6, buffer_rows=-1)


# --------------------------------------------------------------------------------------------
# float32 products and statistics accumulated inside the forward pass, on the model's residuals
def test_float32_products_keep_the_float64_ranks_on_the_models_residuals(embedded_capture):
    """precision="float32" is used only because, on the embedded model's own residuals (every layer
    and kind, massive rows included), every variance rank equals the float64 reference at five
    thresholds, PR and stable rank agree to 1e-5, the entropy measures (which see the float32
    round-off left in the tail) to 2 %, and mean_norm and anisotropy (float32 row pass) to 1e-6."""
    from residual_bandwidth.metrics import variance_threshold_rank
    cap = embedded_capture
    for kind in cap.kinds:
        for L in cap.layers:
            x = cap.get(kind, L)
            ref = compute_metrics(x, variance_threshold=0.95)
            f32 = compute_metrics(x, variance_threshold=0.95, precision="float32")
            a, b = spectrum(x), spectrum(x, precision="float32")
            for p in (0.5, 0.8, 0.9, 0.95, 0.99):
                assert variance_threshold_rank(a, p) == variance_threshold_rank(b, p), (kind, L, p)
            for key, rel in (("participation_ratio", 1e-5), ("stable_rank", 1e-5), ("entropy_rank", 2e-2),
                             ("spectral_entropy", 2e-2)):
                assert getattr(f32, key) == pytest.approx(getattr(ref, key), rel=rel), (kind, L, key)
            assert f32.mean_norm == pytest.approx(ref.mean_norm, rel=1e-6), (kind, L)
            assert f32.anisotropy == pytest.approx(ref.anisotropy, abs=1e-6), (kind, L)
            mom = StreamingMoments(x.shape[1], precision="float32").update(x[: len(x) // 2]).update(x[len(x) // 2:])
            assert mom.variance_threshold_rank(0.95) == ref.variance_rank, (kind, L)


def test_float32_keeps_the_float64_ranks_on_a_thousand_tokens_of_the_models_residuals(embedded):
    """The same comparison on ~1,000 tokens (more rows than dimensions, the covariance path) of
    resid_post at every layer, with and without the massive rows: float32 products and float32
    eigenvalues give float64's variance ranks; PR and stable rank agree to 1e-5."""
    from residual_bandwidth import ResidualBandwidthAnalyzer, capture_residuals
    from residual_bandwidth.compression import CALIBRATION_PROMPTS
    from residual_bandwidth.metrics import variance_threshold_rank
    cap = capture_residuals(embedded.model, embedded.tokenizer, CALIBRATION_PROMPTS * 3, kinds=["resid_post"],
                            progress=False)
    assert cap.n_rows > 2 * cap.d_model
    massive = ResidualBandwidthAnalyzer().massive_mask(cap)
    assert 0 < int(massive.sum()) < cap.n_rows
    for L, x in zip(cap.layers, cap.layer_stack("resid_post")):
        for rows in (x, x[~massive]):
            a, b = spectrum(rows), spectrum(rows, precision="float32")
            for p in (0.5, 0.8, 0.9, 0.95, 0.99):
                assert variance_threshold_rank(a, p) == variance_threshold_rank(b, p), (L, p)
            ref, f32 = compute_metrics(rows), compute_metrics(rows, precision="float32")
            assert f32.participation_ratio == pytest.approx(ref.participation_ratio, rel=1e-5), L
            assert f32.stable_rank == pytest.approx(ref.stable_rank, rel=1e-5), L


def test_statistics_streamed_in_the_forward_pass_equal_the_stored_analysis(embedded):
    """stream_layer_statistics keeps no activations, yet gives the analyzer's numbers (one batch, so
    the massive rows are the same set; float64 products)."""
    from conftest import PROMPTS
    from residual_bandwidth import ResidualBandwidthAnalyzer, capture_residuals
    from residual_bandwidth.streaming import stream_layer_statistics
    prompts = PROMPTS[:4]
    st = stream_layer_statistics(embedded.model, embedded.tokenizer, prompts, batch_size=len(prompts))
    cap = capture_residuals(embedded.model, embedded.tokenizer, prompts, kinds=["resid_post"],
                            batch_size=len(prompts), progress=False)
    rep = ResidualBandwidthAnalyzer().analyze_layers(cap)
    all_m, clean_m = st.metrics()
    assert st.n_rows == cap.n_rows and st.n_massive_rows == len(rep.excluded_rows)
    for got, want in zip(all_m + clean_m, rep.all_positions + rep.without_massive):
        assert got.n_positions == want.n_positions and got.variance_rank == want.variance_rank
        for key in ("participation_ratio", "stable_rank", "entropy_rank", "anisotropy", "mean_norm"):
            assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-6), key


def test_a_float32_buffer_holds_float32_rows_and_changes_no_statistic(rng):
    """precision="float32" buffers rows in float32 (half the bytes) and gives the unbuffered result:
    the merge would round the rows to float32 anyway."""
    d = 16
    x = torch.tensor(rng.normal(size=(500, d)) * np.linspace(5, 0.1, d) + 3.0, dtype=torch.float32)
    plain = StreamingMoments(d, precision="float32")
    buffered = StreamingMoments(d, buffer_rows=64, precision="float32")
    for chunk in torch.split(x, 37):
        plain.update(chunk)
        buffered.update(chunk)
    assert buffered.nbytes == 8 * (d + d * d) + 4 * 64 * d
    assert buffered.n == plain.n == 500
    np.testing.assert_allclose(buffered.mean.numpy(), plain.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(buffered.eigenvalues(), plain.eigenvalues(), rtol=1e-4,
                               atol=1e-6 * plain.eigenvalues()[0])
    assert buffered.variance_threshold_rank(0.95) == plain.variance_threshold_rank(0.95)
