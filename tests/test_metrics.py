"""Every metric against an independent reference: sklearn PCA, numpy SVD, closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from residual_bandwidth import metrics as M
from residual_bandwidth import BandwidthInputError
from conftest import random_orthogonal


def low_rank(rng, n, d, r, noise=0.0, offset=0.0):
    """Rank-r signal with unequal scales, optional isotropic noise and a common offset."""
    x = (rng.normal(size=(n, r)) * rng.uniform(0.5, 5, size=r)) @ rng.normal(size=(r, d))
    return x + noise * rng.normal(size=(n, d)) + offset


SHAPES = [(20, 64, 64), (200, 64, 10), (500, 64, 64), (80, 576, 5), (1000, 96, 40), (64, 64, 64)]


def numpy_lambda(x, center=True):
    xc = x - x.mean(0) if center else x
    return np.linalg.svd(xc, compute_uv=False) ** 2


@pytest.mark.parametrize("n,d,r", SHAPES)
@pytest.mark.parametrize("p", [0.5, 0.9, 0.95, 0.99])
def test_variance_rank_matches_sklearn_pca(rng, n, d, r, p):
    x = low_rank(rng, n, d, r, noise=0.05, offset=3.0)
    expected = PCA(n_components=p, svd_solver="full").fit(x).n_components_
    assert M.variance_threshold_rank(M.spectrum(torch.tensor(x)), p) == expected


@pytest.mark.parametrize("n,d,r", SHAPES)
def test_spectrum_equals_squared_singular_values(rng, n, d, r):
    x = low_rank(rng, n, d, r, noise=0.01, offset=1.0)
    for center in (True, False):
        lam = M.spectrum(torch.tensor(x), center=center).eigenvalues
        ref = numpy_lambda(x, center)
        np.testing.assert_allclose(lam, ref, rtol=1e-6, atol=1e-9 * ref[0])


@pytest.mark.parametrize("n,d,r", SHAPES)
def test_family_matches_numpy_formulas(rng, n, d, r):
    x = low_rank(rng, n, d, r, noise=0.02)
    lam = numpy_lambda(x)
    sig = np.sqrt(lam)
    m = M.compute_metrics(torch.tensor(x, dtype=torch.float32))
    pr = lam.sum() ** 2 / (lam**2).sum()
    q = sig / sig.sum()
    q = q[q > 1e-12]
    ent_rank = np.exp(-(q * np.log(q)).sum())
    pv = lam / lam.sum()
    pv = pv[pv > 0]
    spec_ent = -(pv * np.log(pv)).sum() / np.log(min(n, d))
    rank = PCA(n_components=0.95, svd_solver="full").fit(x).n_components_
    assert m.participation_ratio == pytest.approx(pr, rel=1e-5)
    assert m.stable_rank == pytest.approx(lam.sum() / lam[0], rel=1e-5)
    assert m.entropy_rank == pytest.approx(ent_rank, rel=1e-5)
    assert m.spectral_entropy == pytest.approx(spec_ent, rel=1e-5)
    assert m.variance_rank == rank
    assert m.utilization_available == pytest.approx(rank / min(n, d))
    assert m.utilization_d_model == pytest.approx(rank / d)
    assert (m.n_positions, m.d_model, m.centered) == (n, d, True)


def test_closed_forms_on_a_diagonal_spectrum(rng):
    """X = U diag(s) V^T uncentred: lambda = s^2 exactly, so every metric has a closed form."""
    d = 32
    s = np.array([4.0, 2.0, 2.0, 1.0] + [0.0] * (d - 4))
    x = random_orthogonal(d, rng) @ np.diag(s) @ random_orthogonal(d, rng).T
    spec = M.spectrum(torch.tensor(x), center=False)
    lam = s**2  # 16, 4, 4, 1
    assert spec.eigenvalues[:4] == pytest.approx(lam[:4], rel=1e-10)
    assert M.participation_ratio(spec) == pytest.approx(25**2 / (256 + 16 + 16 + 1))
    assert M.stable_rank(spec) == pytest.approx(25 / 16)
    p = s[:4] / s.sum()
    assert M.entropy_effective_rank(spec) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert M.variance_threshold_rank(spec, 0.95) == 3  # 24/25 = 0.96 >= 0.95 > 20/25
    assert M.variance_threshold_rank(spec, 0.96) == 3  # exact tie counts (>= p)


@pytest.mark.parametrize("k", [1, 3, 10, 32])
def test_k_equal_variances_give_k_everywhere(rng, k):
    d = 32
    s = np.array([1.5] * k + [0.0] * (d - k))
    x = random_orthogonal(d, rng) @ np.diag(s) @ random_orthogonal(d, rng).T
    spec = M.spectrum(torch.tensor(x), center=False)
    for f in (M.participation_ratio, M.stable_rank, M.entropy_effective_rank):
        assert f(spec) == pytest.approx(k, rel=1e-9)
    assert M.variance_threshold_rank(spec, 0.95) == int(np.ceil(0.95 * k - 1e-12))
    assert M.spectral_entropy(spec) == pytest.approx(np.log(k) / np.log(d) if k > 1 else 0.0, abs=1e-12)


def test_rank_ordering_holds_on_random_spectra(rng):
    for _ in range(200):
        lam = np.sort(rng.pareto(rng.uniform(0.3, 3), size=rng.integers(2, 100)))[::-1] + 1e-9
        stable, pr = M.stable_rank(lam), M.participation_ratio(lam)
        p = lam / lam.sum()
        exp_h_var = np.exp(-(p * np.log(p)).sum())
        assert stable <= pr * (1 + 1e-9)
        assert pr <= exp_h_var * (1 + 1e-9)
        assert exp_h_var <= len(lam) * (1 + 1e-9)
        assert exp_h_var <= M.entropy_effective_rank(lam) * (1 + 1e-9)


def test_anisotropy_matches_pairwise_numpy(rng):
    x = rng.normal(size=(50, 16)) + 2.0
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    ref = (c.sum() - np.trace(c)) / (50 * 49)
    assert M.anisotropy(torch.tensor(x)) == pytest.approx(ref, rel=1e-10)
    same = np.tile(rng.normal(size=(1, 8)), (5, 1)) * np.arange(1, 6)[:, None]
    assert M.anisotropy(torch.tensor(same)) == pytest.approx(1.0)


def test_spectral_entropy_of_singular_values_matches_seed_quantity(rng):
    x = rng.normal(size=(30, 20))
    sig = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = sig / sig.sum()
    ref = -(p * np.log(p)).sum() / np.log(len(p))
    assert M.spectral_entropy(M.spectrum(torch.tensor(x)), of="singular") == pytest.approx(ref, rel=1e-8)


def test_every_subspace_metric_is_rotation_invariant(rng):
    """No privileged basis: X -> XQ changes no metric (Elhage et al. 2021)."""
    for n, d in [(40, 64), (300, 48)]:
        x = low_rank(rng, n, d, 12, noise=0.1, offset=2.0)
        q = random_orthogonal(d, rng)
        a = M.compute_metrics(torch.tensor(x))
        b = M.compute_metrics(torch.tensor(x @ q))
        for field in ("variance_rank", "n_positions", "d_model"):
            assert getattr(a, field) == getattr(b, field)
        for field in ("participation_ratio", "stable_rank", "entropy_rank", "utilization_available",
                      "utilization_d_model", "spectral_entropy", "anisotropy", "mean_norm"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-7, abs=1e-12), field
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-7, atol=1e-9 * a.eigenvalues[0])


def test_basis_aligned_slices_are_not_rotation_invariant(rng):
    """The seed's 'token subspace = coordinates 0:256' changes under a rotation: the misconception."""
    x = rng.normal(size=(200, 64)) * np.r_[np.full(16, 5.0), np.full(48, 0.5)]  # loud coords 0:16
    q = random_orthogonal(64, rng)
    share = lambda m: m[:, :16].var(0).sum() / m.var(0).sum()  # noqa: E731
    assert share(x) > 0.9 and share(x @ q) < 0.5  # same information, different "subspace share"
    a, b = M.compute_metrics(torch.tensor(x)), M.compute_metrics(torch.tensor(x @ q))
    assert a.variance_rank == b.variance_rank  # while the spectrum does not move


def test_centering_matters(rng):
    """A large common offset adds one loud direction to the uncentred spectrum."""
    x = rng.normal(size=(200, 32)) + 50.0
    centred = M.compute_metrics(torch.tensor(x), center=True)
    raw = M.compute_metrics(torch.tensor(x), center=False)
    assert raw.variance_rank == 1 and centred.variance_rank > 20


def test_seed_sigma_cumsum_overcounts(rng):
    """The seed summed sigma, not sigma^2, and did not centre; that reads more dimensions."""
    x = low_rank(rng, 80, 64, 10, noise=0.1)
    sig = np.linalg.svd(x, compute_uv=False)
    seed = int(np.sum(np.cumsum(sig) < 0.95 * sig.sum()) + 1)
    assert seed > M.compute_metrics(torch.tensor(x)).variance_rank


def test_zero_variance_is_an_error_not_a_number():
    x = torch.ones(10, 8)
    with pytest.raises(BandwidthInputError, match="zero variance"):
        M.compute_metrics(x)


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [np.nan, 1.0], [0.0, 0.0]])
def test_bad_eigenvalues_are_rejected(bad):
    with pytest.raises(BandwidthInputError):
        M.participation_ratio(np.array(bad))


def test_threshold_is_validated(rng):
    with pytest.raises(BandwidthInputError, match="p"):
        M.variance_threshold_rank(np.ones(4), 1.5)
    with pytest.raises(BandwidthInputError, match="of"):
        M.spectral_entropy(np.ones(4), of="sigma")


def test_chunked_accumulation_matches_one_shot(rng, monkeypatch):
    """Spectra, anisotropy and norms are accumulated over row chunks; boundaries must not matter."""
    x = torch.tensor(low_rank(rng, 103, 16, 9, noise=0.1, offset=30.0))
    whole = M.compute_metrics(x)
    monkeypatch.setattr(M, "CHUNK_ROWS", 7)
    chunked = M.compute_metrics(x)
    np.testing.assert_allclose(chunked.eigenvalues, whole.eigenvalues, rtol=1e-10, atol=1e-10 * whole.eigenvalues[0])
    assert chunked.anisotropy == pytest.approx(whole.anisotropy, rel=1e-12)
    assert chunked.mean_norm == pytest.approx(whole.mean_norm, rel=1e-12)
    with pytest.raises(BandwidthInputError, match=r"zero vector\(s\) at position\(s\) \[50\]"):
        x[50] = 0.0
        M.anisotropy(x)


@pytest.mark.parametrize("n,d", [(40, 12), (12, 40)])
def test_covariance_and_gram_paths_agree_with_numpy_svd(rng, n, d):
    """Both routes to the spectrum give sigma(Xc)^2, whichever side is larger; auto picks the smaller."""
    x = rng.normal(size=(n, d)) * np.linspace(3, 0.1, d) + 5.0
    sig2 = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    for method in ("auto", "covariance", "gram"):
        lam = M.spectrum(torch.tensor(x), method=method).eigenvalues
        assert lam.shape == (min(n, d),)
        np.testing.assert_allclose(lam, sig2, rtol=1e-9, atol=1e-9 * sig2[0])
    with pytest.raises(BandwidthInputError, match="method"):
        M.spectrum(torch.tensor(x), method="svd")


def test_metrics_never_modify_their_input(rng):
    """A converted block is centred in place; a block already in the working dtype must not be: .to()
    returns the caller's tensor itself (float64 in float64, float32 in float32)."""
    for n, d in [(50, 8), (8, 50)]:
        for dtype, precision in ((torch.float64, "float64"), (torch.float32, "float32")):
            x = torch.tensor(rng.normal(size=(n, d)) + 3.0, dtype=dtype)
            before = x.clone()
            M.compute_metrics(x, precision=precision)
            for method in ("covariance", "gram"):
                M.spectrum(x, method=method, precision=precision)
            assert torch.equal(x, before)


def test_mean_norm_matches_numpy(rng, monkeypatch):
    x = rng.normal(size=(37, 9)) * 4 + 1.0
    monkeypatch.setattr(M, "CHUNK_ROWS", 5)
    assert M.compute_metrics(torch.tensor(x, dtype=torch.float32)).mean_norm == pytest.approx(
        np.linalg.norm(x.astype(np.float32).astype(np.float64), axis=1).mean(), rel=1e-12)


def test_one_noise_floor_for_spectra_and_principal_directions(rng):
    """principal_directions and spectrum zero the same round-off eigenvalues (metrics.noise_floor);
    before, principal directions only clamped negatives to 0 and kept round-off as variance."""
    x = torch.tensor(low_rank(rng, 40, 16, 5))
    mu, V, lam = M.principal_directions(x)
    spec = M.spectrum(x)
    assert int((lam > 0).sum()) == int((spec.eigenvalues > 0).sum()) == 5
    assert torch.allclose(V.T @ V, torch.eye(16, dtype=V.dtype), atol=1e-10)
    assert np.allclose(lam[:5].numpy() * 40, spec.eigenvalues[:5], rtol=1e-9)


def test_rank_family_is_assembled_once(rng):
    """compute_metrics, StreamingMoments.summary and the monitor read the same metrics.rank_family."""
    from residual_bandwidth.streaming import StreamingMoments
    x = torch.tensor(low_rank(rng, 300, 32, 10, noise=0.1))
    fam = M.rank_family(M.spectrum(x), 0.9)
    m = M.compute_metrics(x, variance_threshold=0.9)
    s = StreamingMoments(32).update(x).summary(0.9)
    for key in M.RANK_FAMILY:
        assert getattr(m, key) == pytest.approx(fam[key], rel=1e-12)
        assert s[key] == pytest.approx(fam[key], rel=1e-9)


def test_effective_rank_is_a_deprecated_name_for_the_variance_rank(rng):
    """The field's "effective rank" is the entropy rank; the seed's attribute warns and says which."""
    import residual_bandwidth  # noqa: F401  (installs the compat alias)
    m = M.compute_metrics(torch.tensor(low_rank(rng, 100, 16, 4, noise=0.1)))
    with pytest.warns(DeprecationWarning, match="variance_rank.*entropy_rank"):
        assert m.effective_rank == m.variance_rank
    assert m.entropy_rank != m.variance_rank


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300])
def test_huge_and_tiny_values_are_rescaled_not_a_convergence_failure(rng, scale):
    """Entries near 1e200 overflowed float64 in the covariance (eigh failed to converge), near 1e-200
    they underflowed to a zero spectrum. The metrics are scale-invariant, so X is divided by a power
    of two first: every metric equals the reference computed on the scaled-down matrix."""
    ref_x = low_rank(rng, 300, 24, 8, noise=0.05)
    x = torch.tensor(ref_x * scale)
    ref = M.compute_metrics(torch.tensor(ref_x))
    got = M.compute_metrics(x)
    for key in M.RANK_FAMILY + ("anisotropy",):
        assert getattr(got, key) == pytest.approx(getattr(ref, key), rel=1e-9), key
    assert got.mean_norm == pytest.approx(ref.mean_norm * scale, rel=1e-9)
    spec = M.spectrum(x)
    assert spec.scale != 1.0
    assert np.allclose(spec.eigenvalues * (spec.scale / scale) ** 2, ref.eigenvalues, rtol=1e-9)
    assert M.spectrum(torch.tensor(ref_x)).scale == 1.0


def numpy_norms(x):
    """(mean_i ||x_i||, mean_{i != j} cos(x_i, x_j)) in float64 numpy, the n x n cosine matrix formed."""
    x = np.asarray(x, dtype=np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    return np.linalg.norm(x, axis=1).mean(), (c.sum() - np.trace(c)) / (len(x) * (len(x) - 1))


@pytest.mark.parametrize("offset", [0.0, 3.0, 50.0])   # anisotropy near 0, ~0.9 and ~1
def test_float32_row_pass_matches_numpy_float64(rng, monkeypatch, offset):
    """precision="float32" computes each block's norms and sums in float32 and adds them up in float64:
    mean_norm to 1e-6 relative and anisotropy to 1e-6 absolute (float32 round-off is ~6e-8), over
    blocks of 64 rows, with a massive row in the data."""
    monkeypatch.setattr(M, "CHUNK_ROWS", 64)
    x = rng.normal(size=(1000, 48)) + offset
    x[17, 5] = 1e4
    x = torch.tensor(x, dtype=torch.float32)
    assert M._row_pass(x, precision="float32")["precision"] == "float32"   # the float32 pass, no fallback
    mean_norm, aniso = numpy_norms(x.numpy())
    got = M.compute_metrics(x, precision="float32")
    assert got.mean_norm == pytest.approx(mean_norm, rel=1e-6)
    assert got.anisotropy == pytest.approx(aniso, abs=1e-6)
    with pytest.raises(BandwidthInputError, match=r"zero vector\(s\) at position\(s\) \[50, 700\]"):
        x[[50, 700]] = 0.0
        M.compute_metrics(x, precision="float32")


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 1e-30),
                                         (torch.float32, 1e-22), (torch.float64, 1e200)])
def test_float32_precision_falls_back_to_float64_where_float32_squares_fail(rng, dtype, scale):
    """float32 squares overflow near 1e19 and turn subnormal (fewer digits) below about 1e-19: row
    norms outside metrics.FLOAT32_NORMS send compute_metrics(precision="float32") to float64, which
    rescales if it must, so every metric still equals numpy float64 on the same values."""
    x = torch.tensor(low_rank(rng, 300, 24, 8, noise=0.05, offset=1.0) * scale, dtype=dtype)
    assert M._row_pass(x, precision="float32")["precision"] == "float64"
    ref = x.double().numpy() / scale   # the same values, brought near 1 (numpy squares 1e400 overflow)
    lam = numpy_lambda(ref)
    got = M.compute_metrics(x, precision="float32")
    assert got.variance_rank == M.variance_threshold_rank(lam, 0.95)
    for key, fn in (("participation_ratio", M.participation_ratio), ("stable_rank", M.stable_rank),
                    ("entropy_rank", M.entropy_effective_rank)):
        assert getattr(got, key) == pytest.approx(fn(lam), rel=1e-9), key
    mean_norm, aniso = numpy_norms(ref)
    assert got.mean_norm == pytest.approx(mean_norm * scale, rel=1e-9)
    assert got.anisotropy == pytest.approx(aniso, rel=1e-9)


def test_float32_eigenvalues_match_a_planted_spectrum_and_fall_back_beyond_float32_range(rng):
    """spectrum_of_scatter(precision="float32") solves the eigenproblem in float32: on a rotated
    diagonal with known eigenvalues (spread over six decades) it returns them to float32 accuracy
    (1e-5 of lambda_max), and a float64 scatter too large for float32 is solved in float64."""
    d = 64
    lam = np.geomspace(1e3, 1e-3, d)
    q = random_orthogonal(d, rng)
    scatter = torch.tensor((q * lam) @ q.T)
    got = M.spectrum_of_scatter(scatter, n=10_000, d=d, precision="float32").eigenvalues
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, lam, rtol=0, atol=1e-5 * lam[0])
    assert M.variance_threshold_rank(got, 0.95) == M.variance_threshold_rank(lam, 0.95)
    huge = M.spectrum_of_scatter(scatter * 1e60, n=10_000, d=d, precision="float32").eigenvalues
    assert np.isfinite(huge).all()
    np.testing.assert_allclose(huge / 1e60, lam, rtol=1e-9, atol=1e-12 * lam[0])
