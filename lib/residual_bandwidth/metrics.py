"""How much of the residual stream is used: the effective-rank family.

Notation (used in every docstring below). ``X`` is an ``n x d`` matrix whose rows are residual
vectors (token positions, possibly pooled over prompts or layers). ``Xc = X - mean(X, axis=0)`` is
the centred matrix. ``sigma_1 >= sigma_2 >= ...`` are the singular values of ``Xc`` (or of ``X`` when
``center=False``; every result says which), and ``lambda_i = sigma_i**2`` are the *variances* along
the principal directions (up to the constant 1/(n-1)). There are ``min(n, d)`` of them.

Variance is ``sigma**2``, never ``sigma``: the seed lesson summed singular values, which
over-counts weak directions (on its checkpoint-1 data it reports 46 instead of 32 dimensions).

Every metric here depends on ``X`` only through its spectrum, so all of them are unchanged by a
rotation ``X -> X Q`` of the residual basis (``Q`` orthogonal): the residual stream has no
privileged basis (Elhage et al. 2021), and neither do these measurements.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .validation import BandwidthInputError, as_matrix, check_fraction


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues ``lambda_i = sigma_i**2`` of ``Xc^T Xc`` (or ``X^T X``), descending.

    ``eigenvalues`` has ``min(n, d)`` entries. ``centered`` says whether the mean row was removed.
    Made by :func:`spectrum` (or by hand): the eigenvalues are checked (finite, >= 0, not all zero),
    sorted descending and made read-only on construction.
    """
    eigenvalues: np.ndarray
    n_samples: int
    d_model: int
    centered: bool
    #: the eigenvalues are those of ``X / scale``: 1 unless the squares of the entries would overflow
    #: or underflow float64 (see :func:`spectrum`); every metric here is unchanged by the scale
    scale: float = 1.0

    def __post_init__(self):
        # checked once here, so the metric functions below can trust a Spectrum (and a monitor that
        # computes four of them per request does not validate the same array four times)
        lam = _checked(self.eigenvalues)
        lam.flags.writeable = False
        object.__setattr__(self, "eigenvalues", lam)


CHUNK_ROWS = 8192
#: largest side of the matrix the spectrum decomposes (min(n, d)): 32768**2 float64 numbers = 8 GiB
MAX_SPECTRUM_SIDE = 32_768


def _row_chunks(x: torch.Tensor):
    """Consecutive row blocks of ``CHUNK_ROWS`` rows (read at call time)."""
    for start in range(0, x.shape[0], CHUNK_ROWS):
        yield x[start:start + CHUNK_ROWS]


def column_mean(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean row of ``x / scale`` in float64, accumulated chunk by chunk (no float64 copy of ``x``)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for rows in _row_chunks(x):
        total += rows.to("cpu", torch.float64).sum(dim=0)
    return total / x.shape[0] / scale if scale != 1.0 else total / x.shape[0]


METHODS = ("auto", "covariance", "gram")


PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def spectrum(x, center: bool = True, name: str = "x", layer=None, method: str = "auto",
             precision: str = "float64") -> Spectrum:
    """Return the variance spectrum of a ``[positions, d_model]`` matrix.

    ``lambda = eig(Xc^T Xc)`` (a d x d covariance) or ``eig(Xc Xc^T)`` (an n x n Gram matrix): the
    non-zero eigenvalues of both are the squared singular values of ``Xc``. ``method="auto"`` picks
    the smaller matrix (covariance when ``n >= d``, Gram otherwise) so we never form the larger one;
    ``"covariance"`` / ``"gram"`` force one (for benchmarks and tests). Computed in float64.
    Eigenvalues below the numerical noise floor ``lambda_max * max(n, d) * eps64 * 10`` are set to
    exactly 0 so that rank-deficient inputs have exactly-zero tail variances (as an SVD reports).

    Memory: the covariance path reads ``X`` in blocks of ``CHUNK_ROWS`` rows and holds
    ``O(CHUNK_ROWS * d + d^2)`` float64 numbers, whatever n is; the Gram path holds the centred
    float64 copy of ``X`` and the ``n x n`` matrix.

    Scale: every metric here is unchanged by ``X -> c X``. When the squares of the entries would
    overflow float64 (entries near 1e200) or underflow it (near 1e-200), ``X`` is divided by a power
    of two ``s`` (exact) before the products, and the spectrum is that of ``X / s`` (``Spectrum.scale
    = s``); otherwise ``s = 1``.

    ``precision="float32"`` centres the rows, sums their products ``Xc^T Xc`` and solves the eigenvalue
    problem in float32 (the mean is summed in float64 and rounded to float32 for the subtraction; the
    eigenvalues are returned, and the noise floor applied, in float64): half the memory traffic,
    about twice the GEMM speed, and a d = 576 eigenproblem in 10 instead of 15 ms. On the embedded
    model's residuals (every layer and kind, massive rows included; 2,100 comparisons up to 8,192
    tokens) its variance ranks equal float64's at p = 0.5 ... 0.99 and the participation ratio and
    stable rank agree to 2e-6; float32 round-off stays in the tail as small eigenvalues, which moves
    the entropy measures by up to about 1 % (a test checks all of this). The default is float64.

    Raises :class:`BandwidthInputError` for malformed input and for data with zero variance (all
    rows identical after centring), where every ratio below would be 0/0.
    """
    if method not in METHODS:
        raise BandwidthInputError(f"method: expected one of {METHODS}, got {method!r}")
    _check_precision(precision)
    x = as_matrix(x, name=name, layer=layer).detach()
    return _spectrum(x, center, name, layer, method, precision=precision)


def _check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise BandwidthInputError(f"precision: expected one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def power_of_two_scale(x: torch.Tensor) -> float:
    """``2**floor(log2(max |x_ij|))`` (1 for an all-zero ``x``): dividing by it is exact and brings
    the entries near 1, so their squares neither overflow nor underflow float64."""
    amax = 0.0
    for rows in _row_chunks(x):
        amax = max(amax, float(rows.abs().amax()))
    return 2.0 ** math.floor(math.log2(amax)) if amax > 0 else 1.0


def _spectrum(x: torch.Tensor, center: bool, name: str, layer, method: str = "auto",
              scale: float | None = None, precision: str = "float64",
              mean: torch.Tensor | None = None) -> Spectrum:
    """:func:`spectrum` of an already validated matrix (no second validation pass). ``scale=None``:
    first try without rescaling, and rescale only when the products did not fit float64. ``mean``:
    the float64 mean row of ``x / scale`` when the caller has it already (saves a pass)."""
    n, d = x.shape
    _check_side(x, name, layer, method)
    s = scale or 1.0
    dtype = PRECISIONS[precision] if s == 1.0 else torch.float64   # rescaled data: float64 always
    if not center:
        mean = torch.zeros(d, dtype=torch.float64)
    elif mean is None:
        mean = column_mean(x, s)
    mean_t = mean.to(dtype)
    if method == "covariance" or (method == "auto" and n >= d):
        gram = torch.zeros(d, d, dtype=dtype)
        for rows in _row_chunks(x):  # never a float64 copy of all of X: O(chunk*d + d^2) memory
            c = _centred(rows, s, dtype, mean_t)
            gram.addmm_(c.T, c)
    else:
        c = _centred(x, s, dtype, mean_t)
        gram = c @ c.T
    if scale is None and not _representable(gram):
        return _spectrum(x, center, name, layer, method, power_of_two_scale(x))
    spec = spectrum_of_scatter(gram, n, d, center, name=name, layer=layer,
                               precision="float32" if dtype == torch.float32 else "float64")
    return spec if s == 1.0 else Spectrum(spec.eigenvalues, n, d, center, s)


def _check_side(x: torch.Tensor, name: str, layer, method: str = "auto") -> None:
    n, d = x.shape
    side = min(n, d) if method == "auto" else (d if method == "covariance" else n)
    if side > MAX_SPECTRUM_SIDE:
        raise BandwidthInputError(
            f"{name}{f' (layer {layer})' if layer is not None else ''}: shape {tuple(x.shape)} needs a "
            f"{side} x {side} float64 matrix ({side * side * 8 / 2**30:.0f} GiB) to decompose; the limit is "
            f"{MAX_SPECTRUM_SIDE} per side. Subsample positions first")


def _scaled(rows: torch.Tensor, scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``rows / scale`` on the CPU in ``dtype``, to be read only: it is ``rows`` itself when ``rows`` is
    a CPU tensor of ``dtype`` already and ``scale = 1``."""
    c = rows.to("cpu", dtype)
    return c if scale == 1.0 else c / scale


def _centred(rows: torch.Tensor, scale: float, dtype: torch.dtype, mean: torch.Tensor) -> torch.Tensor:
    """``rows / scale - mean`` as a new CPU tensor in ``dtype`` (the caller's tensor is never edited):
    ``rows - mean`` in one pass, or the converted (or scaled) copy of ``rows``, centred in place."""
    c = _scaled(rows, scale, dtype)
    return c - mean if c is rows else c.sub_(mean)


def _representable(gram: torch.Tensor) -> bool:
    """False when the products overflowed (inf/NaN) or every square underflowed to exactly 0."""
    return bool(torch.isfinite(gram).all()) and bool(gram.abs().amax() > 0)


def noise_floor(lam_max: float, n: int, d: int) -> float:
    """``lambda_max * max(n, d) * eps64 * 10``: eigenvalues at or below it are float64 round-off.

    The one noise-floor rule of the package (spectra, streaming statistics, principal directions):
    an eigenvalue of a symmetric matrix built from ``max(n, d)``-long sums is only known to about
    ``lambda_max * max(n, d) * eps``, so anything smaller is set to exactly 0.
    """
    return float(lam_max) * max(n, d) * np.finfo(np.float64).eps * 10


def spectrum_of_scatter(scatter: torch.Tensor, n: int, d: int, center: bool = True, name: str = "x",
                        layer=None, precision: str = "float64") -> Spectrum:
    """The :class:`Spectrum` of ``n`` rows of width ``d`` from their ``d x d`` scatter ``Xc^T Xc`` or
    their ``n x n`` Gram matrix ``Xc Xc^T`` (the non-zero eigenvalues of both are the same).

    The eigenvalue problem is solved in ``precision`` (float64 by default) and the eigenvalues are
    returned in float64. Keeps ``min(n, d)`` eigenvalues, descending, with the :func:`noise_floor`
    applied. Raises :class:`BandwidthInputError` for zero variance.
    """
    work = scatter.to(PRECISIONS[precision])
    if not bool(torch.isfinite(work).all()):   # a float64 scatter beyond float32's range
        work = scatter.to(torch.float64)
    lam = torch.linalg.eigvalsh(work).flip(0).to(torch.float64).numpy()[: min(n, d)]
    lam_max = float(lam[0]) if lam.size else 0.0
    if not lam_max > 0:
        what = "all positions are identical" if center else "the matrix is all zeros"
        raise BandwidthInputError(
            f"{name}{f' (layer {layer})' if layer is not None else ''}: zero variance ({what}); "
            "no direction carries information, so ranks and ratios are undefined")
    lam = np.where(lam > noise_floor(lam_max, n, d), lam, 0.0)
    return Spectrum(eigenvalues=lam, n_samples=n, d_model=d, centered=center)


def principal_directions(x, name: str = "x", layer=None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of a ``[positions, d_model]`` matrix: ``(mu [d], V [d, d], variances [d])`` in float64.

    ``mu`` is the mean row; the columns of ``V`` are the eigenvectors of the covariance
    ``C = (X - mu)^T (X - mu) / n`` by decreasing eigenvalue (``variances``, with the
    :func:`noise_floor` applied, so directions without variance have exactly 0). ``V`` is a complete
    orthonormal basis: ``k = d`` reproduces ``x`` exactly.
    """
    x = as_matrix(x, name=name, layer=layer).detach().to("cpu", torch.float64)
    n, d = x.shape
    mu = x.mean(0)
    xc = x - mu
    lam, vec = torch.linalg.eigh(xc.T @ xc / n)
    order = torch.argsort(lam, descending=True)
    lam, vec = lam[order], vec[:, order]
    floor = noise_floor(float(lam[0]), n, d) if lam[0] > 0 else math.inf   # no variance at all: every lambda is 0
    return mu, vec, torch.where(lam > floor, lam, torch.zeros_like(lam))


def _lam(s) -> np.ndarray:
    """Eigenvalues, descending: a :class:`Spectrum`'s as they are (validated when it was made),
    anything else validated and sorted here."""
    return s.eigenvalues if isinstance(s, Spectrum) else _checked(s)


def _checked(s) -> np.ndarray:
    lam = np.asarray(s, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise BandwidthInputError("eigenvalues: expected a non-empty 1-D array")
    if not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise BandwidthInputError("eigenvalues: must be finite and >= 0 (they are variances)")
    if lam.sum() <= 0:
        raise BandwidthInputError("eigenvalues: all zero; ranks and ratios are undefined")
    return np.sort(lam)[::-1]


def variance_threshold_rank(s, p: float = 0.95) -> int:
    """Smallest ``k`` with ``sum_{i<=k} lambda_i / sum_i lambda_i >= p``.

    The number of principal directions needed to hold a fraction ``p`` of the variance. Matches
    ``sklearn.decomposition.PCA(n_components=p)`` on the same (centred) data, except at exact ties
    where sklearn requires the cumulative ratio to *exceed* ``p``.
    """
    p = check_fraction(p, "p")
    lam = _lam(s)
    ratio = np.cumsum(lam) / lam.sum()
    # tolerate float round-off in the running sum, so a spectrum that holds p exactly counts
    return int(np.searchsorted(ratio, p - 1e-12, side="left") + 1)


def participation_ratio(s) -> float:
    """``PR = (sum lambda)^2 / sum lambda^2``: equals k for k equal variances, 1 for one direction."""
    lam = _lam(s)
    return float(lam.sum() ** 2 / np.sum(lam**2))


def stable_rank(s) -> float:
    """``sum lambda / lambda_max = ||X||_F^2 / ||X||_2^2``: the most conservative of the family."""
    lam = _lam(s)
    return float(lam.sum() / lam[0])


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def entropy_effective_rank(s) -> float:
    """Roy & Vetterli (2007) effective rank ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum sigma``.

    Note the distribution is over *singular values* (as in the paper), not variances. For any
    spectrum: ``stable_rank <= participation_ratio <= exp H(lambda/sum lambda) <= rank``, and this
    sigma-based version is at least ``exp H(lambda / sum lambda)``.
    """
    sig = np.sqrt(_lam(s))
    return float(np.exp(_entropy(sig / sig.sum())))


def spectral_entropy(s, of: str = "variance") -> float:
    """Normalised spectral entropy ``H(p) / log(len(p))`` in [0, 1].

    ``of="variance"`` (default) uses ``p_k = lambda_k / sum lambda``; ``of="singular"`` uses
    ``p_k = sigma_k / sum sigma`` (the seed's "compression efficiency"). ``len(p) = min(n, d)``,
    the number of singular values. 1 means variance spread evenly over every available direction;
    0 means one direction. With a single available direction the value is defined as 0.
    """
    lam = _lam(s)
    if of == "variance":
        p = lam / lam.sum()
    elif of == "singular":
        sig = np.sqrt(lam)
        p = sig / sig.sum()
    else:
        raise BandwidthInputError(f"of: expected 'variance' or 'singular', got {of!r}")
    if p.size < 2:
        return 0.0
    return float(_entropy(p) / np.log(p.size))


#: the fields :func:`rank_family` fills (declared once; records of the analyzer, streaming and monitor)
RANK_FAMILY = ("variance_rank", "participation_ratio", "stable_rank", "entropy_rank", "spectral_entropy",
               "utilization_available", "utilization_d_model")


def rank_family(spec: Spectrum, p: float = 0.95) -> dict:
    """Every rank measure of one spectrum, the one place they are assembled (keys :data:`RANK_FAMILY`).

    ``variance_rank = r_p`` (:func:`variance_threshold_rank`), ``participation_ratio``,
    ``stable_rank``, ``entropy_rank`` (:func:`entropy_effective_rank`), ``spectral_entropy`` (of the
    variances), ``utilization_available = r_p / min(n, d)`` and ``utilization_d_model = r_p / d``.
    """
    r = variance_threshold_rank(spec, p)
    return {"variance_rank": r, "participation_ratio": participation_ratio(spec),
            "stable_rank": stable_rank(spec), "entropy_rank": entropy_effective_rank(spec),
            "spectral_entropy": spectral_entropy(spec), "utilization_available": r / min(spec.n_samples, spec.d_model),
            "utilization_d_model": r / spec.d_model}


def anisotropy(x, name: str = "x", layer=None) -> float:
    """Mean cosine similarity over all ordered pairs ``i != j`` of (uncentred) rows.

    ``(||sum_i u_i||^2 - n) / (n (n - 1))`` with ``u_i = x_i / ||x_i||``, which equals
    ``mean_{i != j} cos(x_i, x_j)`` without forming the n x n matrix. 0 for isotropic directions,
    1 when every vector points the same way (Ethayarajh 2019). Not a subspace metric: it is about
    the uncentred cloud, but it is rotation invariant too. Rows of norm 0 have no direction and are
    rejected.
    """
    x = as_matrix(x, name=name, layer=layer).detach()
    return _norms_of(_row_pass(x), name)[1]


#: ``precision="float32"`` reads the rows in float32 only while every row norm lies in this range. Below
#: it, the largest square of a row can be a float32 subnormal (under 2**-126, fewer digits); above it,
#: a sum of 2**28 squared norms can overflow float32 (2**128). Inside, squares lost to underflow change
#: a norm by less than ``d * 2**-50`` relative.
FLOAT32_NORMS = (2.0**-50, 2.0**50)


def _row_pass(x: torch.Tensor, scale: float | None = None, precision: str = "float64") -> dict:
    """One pass over the rows, totals in float64: the column sum, ``sum_i ||x_i||``,
    ``sum_i x_i / ||x_i||`` and the first rows of norm 0, all of ``x / scale``.

    ``sum_i u_i`` is formed as the vector-matrix product ``(1 / ||x_i||)^T X`` per block, so no
    normalised copy of the rows is made. ``scale=None``: 1, unless the squares of the entries
    overflow or underflow float64, then the pass is redone with :func:`power_of_two_scale`.

    ``precision="float32"``: each block's norms, column sum and ``(1 / ||x_i||)^T X`` are computed in
    float32 (no float64 copy of the block) and added to the float64 totals. A row norm outside
    :data:`FLOAT32_NORMS` (or 0) sends the whole pass to float64, which rescales if it must and lists
    the rows of norm 0. ``"precision"`` in the result says which pass it is.
    """
    n, dtype = x.shape[0], PRECISIONS[precision]
    col_sum = torch.zeros(x.shape[1], dtype=torch.float64)
    unit_sum = torch.zeros(x.shape[1], dtype=torch.float64)
    norm_sum, zero = 0.0, []
    for start, rows in zip(range(0, n, CHUNK_ROWS), _row_chunks(x)):
        rows = _scaled(rows, scale or 1.0, dtype)
        norms = torch.linalg.vector_norm(rows, dim=1)
        lo, hi = (float(v) for v in torch.aminmax(norms))
        if dtype == torch.float32 and not FLOAT32_NORMS[0] <= lo <= hi <= FLOAT32_NORMS[1]:
            return _row_pass(x)   # float32 squares would overflow or lose digits, or a row is 0
        if scale is None and (not math.isfinite(hi) or bool((rows[norms == 0] != 0).any())):
            return _row_pass(x, power_of_two_scale(x))   # squares overflowed or underflowed
        col_sum += rows.sum(dim=0)
        if lo == 0:
            zero += ((norms == 0).nonzero().flatten() + start).tolist()[:5]
            norms = torch.where(norms == 0, torch.ones_like(norms), norms)
        if dtype == torch.float64:
            unit_sum.addmv_(rows.T, norms.reciprocal())
        else:   # the block's float32 product, added to the float64 total
            unit_sum += rows.T @ norms.reciprocal()
        norm_sum += float(norms.sum())
    return {"scale": scale or 1.0, "col_sum": col_sum, "norm_sum": norm_sum, "unit_sum": unit_sum,
            "zero_rows": zero[:5], "n": n, "precision": precision}


def _norms_of(rp: dict, name: str) -> tuple[float, float]:
    """``(mean_i ||x_i||, anisotropy)`` from a :func:`_row_pass`; rows of norm 0 are an error."""
    if rp["zero_rows"]:
        raise BandwidthInputError(f"{name}: zero vector(s) at position(s) {rp['zero_rows']} have no direction")
    n, u = rp["n"], rp["unit_sum"]
    return rp["norm_sum"] * rp["scale"] / n, float((u @ u - n) / (n * (n - 1)))


@dataclass
class BandwidthMetrics:
    """Bandwidth of one residual matrix (one layer, or several pooled). Formulas: module docstring.

    ``utilization_available = variance_rank / min(n, d)`` (how much of the space this sample *could*
    span; with fewer positions than dimensions the rank is capped by n) and
    ``utilization_d_model = variance_rank / d`` (share of the residual width). Both are reported
    because the seed's checkpoint 3 confused them: 15 positions in 48 dimensions can never reach
    90 % of d_model.
    """
    layer: int | str | None
    n_positions: int
    d_model: int
    centered: bool
    variance_threshold: float
    variance_rank: int
    participation_ratio: float
    stable_rank: float
    entropy_rank: float
    utilization_available: float
    utilization_d_model: float
    spectral_entropy: float
    anisotropy: float
    mean_norm: float
    excluded_positions: int = 0
    eigenvalues: np.ndarray = field(default=None, repr=False)

    def to_dict(self, with_spectrum: bool = False) -> dict:
        """JSON-ready dict; the spectrum only when asked (it has min(n, d) entries)."""
        d = asdict(self)
        d.pop("eigenvalues")
        if with_spectrum:
            d["eigenvalues"] = self.eigenvalues.tolist() if self.eigenvalues is not None else None
        return d


def compute_metrics(x, center: bool = True, variance_threshold: float = 0.95, layer=None,
                    name: str = "x", excluded_positions: int = 0, precision: str = "float64",
                    check: bool = True) -> BandwidthMetrics:
    """All bandwidth metrics of one ``[positions, d_model]`` matrix (see :class:`BandwidthMetrics`).

    ``precision="float32"`` computes in float32 the covariance products and their eigenvalues
    (:func:`spectrum`) and, block by block, the row norms, column sums and unit-vector sums behind the
    mean row, ``mean_norm`` and ``anisotropy`` (these two stay within 1e-6 of float64's; a test checks
    it); the totals over blocks and every ratio stay float64. A matrix with a row norm outside
    :data:`FLOAT32_NORMS` (float32 squares would overflow or turn subnormal) is done in float64
    throughout. The default ``"float64"`` computes everything in float64.

    ``check=False`` trusts a matrix that was validated already (a
    :class:`~residual_bandwidth.capture.ResidualCapture` made by
    :func:`~residual_bandwidth.capture.capture_residuals` is), skipping the finite check.
    """
    _check_precision(precision)
    if check:
        x = as_matrix(x, name=name, layer=layer)  # validated once; the passes below trust it
    x = x.detach()
    _check_side(x, name, layer)
    # one pass gives the mean row, the norms and the unit-vector sum; a matrix it would not read in
    # float32 (norms outside FLOAT32_NORMS) has its covariance formed in float64 too
    rp = _row_pass(x, precision=precision)
    spec = _spectrum(x, center, name, layer, precision=rp["precision"],
                     scale=None if rp["scale"] == 1.0 else rp["scale"], mean=rp["col_sum"] / x.shape[0])
    mean_norm, aniso = _norms_of(rp, name)
    n, d = x.shape
    return BandwidthMetrics(layer=layer, n_positions=n, d_model=d, centered=center,
                            variance_threshold=float(variance_threshold), **rank_family(spec, variance_threshold),
                            anisotropy=aniso, mean_norm=mean_norm, excluded_positions=excluded_positions,
                            eigenvalues=spec.eigenvalues)
