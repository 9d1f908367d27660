"""Streaming mean and covariance of residual vectors: the effective-rank family over *all* traffic.

A monitor sees the residual stream one request at a time and can never keep every vector. What it
can keep, in constant memory, is the pair (running mean, scatter matrix) of everything seen so far:

    n         number of rows (token positions) seen
    mean      mu = (1/n) sum_i x_i                                  (d numbers)
    M2        M2 = sum_i (x_i - mu)(x_i - mu)^T = Xc^T Xc            (d x d numbers)

``M2`` is exactly the matrix whose eigenvalues :func:`residual_bandwidth.metrics.spectrum` uses
(``lambda_i = sigma_i(Xc)^2``), so every metric of the effective-rank family (variance-threshold
rank, participation ratio, stable rank, entropy rank, spectral entropy) of the concatenated traffic
is available at any time from a d x d state, however many requests have passed. The sample
covariance is ``C = M2 / (n - 1)``; the ranks do not depend on that constant.

Updates (Chan, Golub & LeVeque 1979; Welford 1962 is the one-row case). Merging a chunk ``B`` of
``m`` rows with mean ``mu_B`` and scatter ``M2_B = (X_B - mu_B)^T (X_B - mu_B)`` into the state
``A`` (``n`` rows, mean ``mu_A``)::

    N      = n + m
    delta  = mu_B - mu_A
    mu     = mu_A + delta * m / N
    M2     = M2_A + M2_B + delta delta^T * n m / N

This is exact algebra (no approximation) and numerically stable because nothing is formed as a
difference of two large uncentred sums. All state is float64. :meth:`StreamingMoments.update`
does the ``M2_B + (n m / N) delta delta^T`` part as one in-place matrix product by appending the row
``sqrt(n m / N) * delta`` to the centred chunk, so an update costs one ``(m+1) x d`` by
``d x d`` GEMM and no d x d temporary. :meth:`StreamingMoments.merge` combines two accumulators
(e.g. one per thread or per process) with the same formula.

Eigenvalues are computed lazily (one ``eigvalsh`` of a d x d matrix) and cached
until the next update.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics as _m
from .capture import (Listener, add_hook, architecture_of, check_layers, check_tokenizer, hook_name,
                      hook_point, run_listeners)
from .outliers import massive_mask
from .validation import BandwidthInputError, all_finite, check_dense, check_int, check_positive, check_prompts


class StreamingMoments:
    """Running mean and scatter matrix ``M2 = Xc^T Xc`` of a stream of ``d``-dimensional rows.

    ``update(x)`` adds the rows of an ``[m, d]`` chunk (any float dtype, any device; copied to
    float64 on the CPU). After any sequence of updates, ``mean``, ``scatter`` and
    ``eigenvalues()`` equal the batch computation on the concatenation of all chunks, up to float64
    round-off. Memory: ``d + d*d`` float64 numbers (plus ``buffer_rows * d`` when buffering),
    independent of how many rows were seen.

    ``precision="float32"`` forms each chunk's centred product, and solves the final eigenvalue
    problem, in float32 (the state, the means and the merge stay float64): about twice as fast; use
    it where the ranks equal float64's.

    ``buffer_rows > 0`` collects small chunks in a fixed buffer (float32 rows with
    ``precision="float32"``) and merges them ``buffer_rows`` at a time. The flops are the same, but the d x d matrix (2.6 MB for d = 576) is read and written once
    per buffer instead of once per chunk; in a live model, whose forward pass evicts it from the CPU
    caches between requests, that memory traffic costs more than the arithmetic of a small chunk.
    Every read-out (``n``, ``mean``, ``scatter``, ``eigenvalues()``, ...) first merges what is
    pending, so the buffer never shows in a result.

    Not thread-safe by itself: protect it with a lock, or keep one per thread and
    :meth:`merge` them.
    """

    def __init__(self, d_model: int, buffer_rows: int = 0, precision: str = "float64"):
        self.d_model = check_int(d_model, "d_model", low=1)
        self.buffer_rows = check_int(buffer_rows, "buffer_rows", low=0)
        self.precision = precision
        self._dtype = _m._check_precision(precision)
        self._n = 0
        self._mean = torch.zeros(d_model, dtype=torch.float64)
        self._m2 = torch.zeros(d_model, d_model, dtype=torch.float64)
        # the buffer holds rows in the precision of the products (float32 rows lose nothing there)
        self._buf = torch.empty(buffer_rows, d_model, dtype=self._dtype) if buffer_rows else None
        self._pending = 0
        self.version = 0  # bumped by every change; used to cache eigenvalues
        self._eig_cache: tuple[int, np.ndarray] | None = None

    # ---- updates ---------------------------------------------------------------------------
    def _as_rows(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise BandwidthInputError(f"x: expected a tensor of shape [rows, {self.d_model}], got {type(x).__name__}")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise BandwidthInputError(f"x: expected shape [rows, {self.d_model}], got {tuple(x.shape)}")
        check_dense(x, "x")
        if not x.is_floating_point():
            raise BandwidthInputError(f"x: dtype {x.dtype} is not a floating type (activations are floats)")
        x = x.detach().to(device="cpu", dtype=torch.float64)
        if not all_finite(x):
            raise BandwidthInputError("x: contains NaN or Inf; the running statistics would be "
                                      "poisoned for good, so the chunk is rejected")
        return x

    def update(self, x, check: bool = True) -> "StreamingMoments":
        """Add the rows of ``x`` (``[m, d]``, or one ``[d]`` row). Returns ``self``.

        Chan et al. merge of the chunk's own mean and scatter into the state (module docstring),
        possibly after collecting it in the buffer. Rejects NaN/Inf (raises
        :class:`BandwidthInputError` and leaves the state unchanged). ``check=False`` skips
        validation for callers that already hold a finite float64 CPU ``[m, d]`` tensor (the
        monitor, on its hot path).
        """
        if check:
            x = self._as_rows(x)
        m = x.shape[0]
        if m == 0:
            return self
        self.version += 1
        if self._buf is None:
            self._merge_chunk(x)
            return self
        if self._pending + m > self.buffer_rows:
            self.flush()
        if m >= self.buffer_rows:
            self._merge_chunk(x)
        else:
            self._buf[self._pending:self._pending + m].copy_(x)
            self._pending += m
        return self

    def flush(self) -> None:
        """Merge the buffered rows into the mean and scatter (read-outs call this themselves)."""
        if self._pending:
            k, self._pending = self._pending, 0
            self._merge_chunk(self._buf[:k])

    def _merge_chunk(self, x: torch.Tensor) -> None:
        m = x.shape[0]
        if self._dtype == torch.float64:
            x = x.to(torch.float64)
        mu_b = x.mean(dim=0, dtype=torch.float64)
        xc = x - mu_b.to(x.dtype)
        n_a, n = self._n, self._n + m
        if n_a > 0:
            delta = mu_b - self._mean
            # M2 += Xc_B^T Xc_B + (n_a m / n) delta delta^T, as ONE product [Xc_B; r]^T [Xc_B; r]
            r = math.sqrt(n_a * m / n) * delta
            xc = torch.cat([xc, r[None, :].to(xc.dtype)], dim=0)
            self._mean.add_(delta, alpha=m / n)
        else:
            self._mean.copy_(mu_b)
        if self._dtype == torch.float64:
            self._m2.addmm_(xc.T, xc)
        else:  # the chunk's product in float32, summed into the float64 state
            xc = xc.to(self._dtype)
            self._m2.add_(xc.T @ xc)
        self._n = n

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        """Fold ``other``'s rows into ``self`` (in place; ``other``'s statistics unchanged).

        ``M2 = M2_A + M2_B + delta delta^T n_A n_B / N`` with ``delta = mu_B - mu_A``. The result
        equals one accumulator that saw both streams (order does not matter up to round-off).
        Returns ``self``.
        """
        if not isinstance(other, StreamingMoments):
            raise BandwidthInputError(f"other: expected StreamingMoments, got {type(other).__name__}")
        if other.d_model != self.d_model:
            raise BandwidthInputError(f"other: d_model {other.d_model} != {self.d_model}")
        self.flush()
        other.flush()
        if other._n == 0:
            return self
        if self._n == 0:
            self._n = other._n
            self._mean.copy_(other._mean)
            self._m2.copy_(other._m2)
        else:
            n = self._n + other._n
            delta = other._mean - self._mean
            self._m2.add_(other._m2)
            self._m2.addr_(delta, delta, alpha=self._n * other._n / n)
            self._mean.add_(delta, alpha=other._n / n)
            self._n = n
        self.version += 1
        return self

    @classmethod
    def combine(cls, parts) -> "StreamingMoments":
        """A new accumulator equal to merging every accumulator in ``parts``."""
        parts = list(parts)
        if not parts:
            raise BandwidthInputError("parts: need at least one accumulator")
        out = cls(parts[0].d_model)
        for p in parts:
            out.merge(p)
        return out

    def copy(self) -> "StreamingMoments":
        """An independent snapshot without a buffer (used to compute eigenvalues outside a lock)."""
        self.flush()
        out = StreamingMoments(self.d_model, precision=self.precision)
        out._n, out._mean, out._m2, out.version = self._n, self._mean.clone(), self._m2.clone(), self.version
        out._eig_cache = self._eig_cache
        return out

    def reset(self) -> None:
        """Forget everything (same memory)."""
        self._n = self._pending = 0
        self._mean.zero_()
        self._m2.zero_()
        self.version += 1

    # ---- read-outs -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Rows seen."""
        return self._n + self._pending

    @property
    def mean(self) -> torch.Tensor:
        """``mu`` (float64, d). Do not modify."""
        self.flush()
        return self._mean

    @property
    def scatter(self) -> torch.Tensor:
        """``M2 = sum_i (x_i - mu)(x_i - mu)^T`` (float64, d x d). Do not modify."""
        self.flush()
        return self._m2

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """Sample covariance ``M2 / (n - ddof)`` (``ddof=1``: unbiased, like ``numpy.cov``)."""
        if self.n - ddof <= 0:
            raise BandwidthInputError(f"covariance: {self.n} row(s) seen; need more than {ddof}")
        return self.scatter / (self.n - ddof)

    @property
    def total_variance(self) -> float:
        """``trace(M2) = sum_i ||x_i - mu||^2 = sum lambda``."""
        return float(torch.diagonal(self.scatter).sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant: ``8 (d + d^2) + 8 buffer_rows d``, or
        ``4 buffer_rows d`` for the buffer with ``precision="float32"``)."""
        buf = self._buf.numel() * self._buf.element_size() if self._buf is not None else 0
        return 8 * (self._mean.numel() + self._m2.numel()) + buf

    def eigenvalues(self) -> np.ndarray:
        """``lambda_1 >= lambda_2 >= ...``: eigenvalues of ``M2``, i.e. squared singular values of Xc.

        ``min(n, d)`` values, like :func:`residual_bandwidth.metrics.spectrum` (centred), with the
        same noise floor (``lambda_max * max(n, d) * eps * 10`` -> 0). Cached until the next update.
        Raises :class:`BandwidthInputError` when fewer than 2 rows were seen or the variance is zero.
        """
        if self._eig_cache is not None and self._eig_cache[0] == self.version:
            return self._eig_cache[1].copy()
        if self.n < 2:
            raise BandwidthInputError(f"eigenvalues: {self.n} row(s) seen; at least 2 are needed")
        try:
            lam = _m.spectrum_of_scatter(self.scatter, self.n, self.d_model, name="eigenvalues",
                                         precision=self.precision).eigenvalues
        except BandwidthInputError:
            raise BandwidthInputError("eigenvalues: zero variance (all rows seen are identical)") from None
        self._eig_cache = (self.version, lam)
        return lam.copy()

    def spectrum(self) -> _m.Spectrum:
        """The traffic's :class:`~residual_bandwidth.metrics.Spectrum` (centred)."""
        return _m.Spectrum(eigenvalues=self.eigenvalues(), n_samples=self.n, d_model=self.d_model,
                           centered=True)

    def participation_ratio(self) -> float:
        """``PR = (sum lambda)^2 / sum lambda^2 = trace(M2)^2 / ||M2||_F^2``.

        The trace form needs no eigendecomposition (``sum lambda^2 = ||M2||_F^2`` for a symmetric
        matrix), so it is cheap enough to export on every scrape.
        """
        if self.n < 2:
            raise BandwidthInputError(f"participation_ratio: {self.n} row(s) seen; need 2")
        m2 = self.scatter
        tr = torch.diagonal(m2).sum()
        fro2 = (m2 * m2).sum()
        if not float(fro2) > 0:
            raise BandwidthInputError("participation_ratio: zero variance")
        return float(tr * tr / fro2)

    def stable_rank(self) -> float:
        """``sum lambda / lambda_max``."""
        return _m.stable_rank(self.eigenvalues())

    def entropy_effective_rank(self) -> float:
        """Roy & Vetterli ``exp(-sum p_k log p_k)``, ``p_k = sigma_k / sum sigma`` (sigma = sqrt(lambda))."""
        return _m.entropy_effective_rank(self.eigenvalues())

    def variance_threshold_rank(self, p: float = 0.95) -> int:
        """Smallest ``k`` with ``sum_{i<=k} lambda_i / sum lambda >= p``."""
        return _m.variance_threshold_rank(self.eigenvalues(), p)

    def spectral_entropy(self, of: str = "variance") -> float:
        """``H(p) / log(len(p))`` with ``p = lambda / sum lambda`` (or sigma-based, ``of="singular"``)."""
        return _m.spectral_entropy(self.eigenvalues(), of=of)

    def summary(self, p: float = 0.95) -> dict:
        """All of the family at once (one eigendecomposition); ``None`` values when undefined.

        ``utilization_d_model = r_p / d`` and ``utilization_available = r_p / min(n, d)``.
        """
        out = {"n": self.n, "d_model": self.d_model, "variance_threshold": p,
               "total_variance": self.total_variance, **dict.fromkeys(_m.RANK_FAMILY)}
        try:
            spec = self.spectrum()
        except BandwidthInputError:
            return out
        out.update(_m.rank_family(spec, p))
        return out

    def __repr__(self) -> str:
        return f"StreamingMoments(d_model={self.d_model}, n={self.n}, buffer_rows={self.buffer_rows})"


# --------------------------------------------------------------------------------------------
# Per-layer statistics accumulated inside the forward pass
# --------------------------------------------------------------------------------------------
@dataclass
class StreamedLayers:
    """What :func:`stream_layer_statistics` accumulated: per layer, the moments of every real token
    and of the non-massive ones, and the sums behind ``mean_norm`` and ``anisotropy``. Constant
    memory in the number of tokens (``2 (d + d^2) + d`` float64 numbers per layer, plus the moments'
    row buffers: :class:`LayerStreamer`'s ``buffer_rows``)."""
    kind: str
    layers: list[int]
    all_rows: dict[int, StreamingMoments]
    clean_rows: dict[int, StreamingMoments]
    sums: dict[int, dict]            # per layer and subset: norm sum, unit-vector sum, rows
    massive_ratio: float
    n_rows: int = 0
    n_massive_rows: int = 0

    def metrics(self, variance_threshold: float = 0.95) -> tuple[list, list]:
        """``(all_positions, without_massive)``: one :class:`~residual_bandwidth.metrics.BandwidthMetrics`
        per layer, from the streamed spectra (:func:`~residual_bandwidth.metrics.rank_family`)."""
        out = ([], [])
        for L in self.layers:
            for i, (subset, mom) in enumerate((("all", self.all_rows[L]), ("clean", self.clean_rows[L]))):
                s, spec = self.sums[L][subset], mom.spectrum()
                n = s["n"]
                out[i].append(_m.BandwidthMetrics(
                    layer=L, n_positions=n, d_model=mom.d_model, centered=True,
                    variance_threshold=float(variance_threshold), **_m.rank_family(spec, variance_threshold),
                    anisotropy=float((s["unit"] @ s["unit"] - n) / (n * (n - 1))), mean_norm=s["norm"] / n,
                    excluded_positions=self.n_rows - n if i else 0, eigenvalues=spec.eigenvalues))
        return out


class LayerStreamer(Listener):
    """The listener behind :func:`stream_layer_statistics`: per batch it hands each layer's real-token
    rows to that layer's :class:`StreamingMoments` and running sums, then forgets them.

    ``buffer_rows``: each moment merges its rows ``buffer_rows`` at a time (a batch of 8 short prompts
    has ~150), so the d x d state is updated less often: 4 % of the streamed pass over 2,073 tokens
    (measured). The buffers hold ``2 * layers * buffer_rows * d`` numbers (70 MiB in float32 for
    SmolLM2's 30 layers at 512 rows), whatever the number of tokens."""

    def __init__(self, model, kind: str = "resid_post", layers=None, massive_ratio: float = 4.0,
                 precision: str = "float64", buffer_rows: int = 512):
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        _m._check_precision(precision)
        self.arch = architecture_of(model)
        self.model, self.kind = model, kind
        layers = check_layers(model, layers)
        hook_name(kind, 0)
        d = model.get_input_embeddings().weight.shape[1]
        moments = {s: {L: StreamingMoments(d, buffer_rows, precision) for L in layers} for s in ("all", "clean")}
        self.out = StreamedLayers(kind, layers, moments["all"], moments["clean"],
                                  {L: {s: {"n": 0, "norm": 0.0, "unit": torch.zeros(d, dtype=torch.float64)}
                                       for s in ("all", "clean")} for L in layers}, massive_ratio)
        self.typical = {L: None for L in layers}         # running mean norm of the non-massive rows
        self.held: dict[int, torch.Tensor] = {}

    def attach(self) -> list:
        blocks = self.arch.blocks(self.model)
        return [add_hook(*hook_point(self.arch, blocks[L], self.kind),
                         functools.partial(self.held.__setitem__, L)) for L in self.out.layers]

    @staticmethod
    def _add(sums, x, norms):
        sums["n"] += x.shape[0]
        sums["norm"] += float(norms.sum())
        sums["unit"] += (x.T @ (1.0 / norms).to(x.dtype)).to(torch.float64)

    def batch(self, start, enc, mask):
        out, typical, layers = self.out, self.typical, self.out.layers
        rows = {L: self.held[L][mask].detach().float().cpu() for L in layers}
        self.held.clear()
        norms = {L: torch.linalg.vector_norm(rows[L], dim=1, dtype=torch.float64) for L in layers}
        loud = torch.zeros(int(mask.sum()), dtype=torch.bool)
        for L in layers:
            med = float(norms[L].median())
            ref = min(med, typical[L][0] / typical[L][1]) if typical[L] else med
            loud |= massive_mask(norms[L], self.massive_ratio, reference=ref)
        keep = ~loud
        for L in layers:
            x, nrm = rows[L], norms[L]
            if not all_finite(x):
                raise BandwidthInputError(f"{hook_name(self.kind, L)}: the model produced NaN or Inf")
            out.all_rows[L].update(x, check=False)
            self._add(out.sums[L]["all"], x, nrm)
            if int(keep.sum()):
                out.clean_rows[L].update(x[keep], check=False)
                self._add(out.sums[L]["clean"], x[keep], nrm[keep])
                t = typical[L] or (0.0, 0)
                typical[L] = (t[0] + float(nrm[keep].sum()), t[1] + int(keep.sum()))
        out.n_rows += int(mask.sum())
        out.n_massive_rows += int(loud.sum())


def stream_layer_statistics(model, tokenizer, prompts, kind: str = "resid_post", layers=None,
                            batch_size: int = 8, max_length: int | None = 512,
                            massive_ratio: float = 4.0, precision: str = "float64",
                            progress: bool = False) -> StreamedLayers:
    """The per-layer bandwidth statistics of ``prompts``, accumulated by hooks *inside* the forward
    pass: nothing of size ``tokens x d`` is kept beyond one batch, whatever the number of prompts.

    Per batch, the hooks hand each layer's real-token rows to that layer's
    :class:`StreamingMoments` (all rows, and the rows that are massive at no layer of this batch)
    and add ``||x_i||`` and ``x_i / ||x_i||`` to running sums. The massive rule is
    :func:`~residual_bandwidth.outliers.massive_mask` with the monitor's reference norm, the smaller
    of the batch's median and the layer's running typical norm (the stored-capture analyzer uses the
    median over all tokens, so the two can differ at the margin). To share the pass with other
    analyses, put a :class:`LayerStreamer` among their listeners
    (:func:`~residual_bandwidth.capture.run_listeners`).
    """
    prompts = check_prompts(prompts)
    check_tokenizer(tokenizer)
    streamer = LayerStreamer(model, kind, layers, massive_ratio, precision)
    run_listeners(model, tokenizer, prompts, [streamer], batch_size, max_length, progress=progress,
                  desc="streaming layer statistics")
    return streamer.out
