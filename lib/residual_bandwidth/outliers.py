"""Massive activations and outlier dimensions: a few residual vectors that are far louder than the rest.

Many LLMs put a huge activation on the first token (an "attention sink", Sun et al. 2024
"Massive Activations in Large Language Models"), carried by one or two fixed coordinates. In
SmolLM2-135M the position-0 vector is ~100x the typical norm in the middle layers and almost all
of its energy sits in one dimension. Such a vector dominates any spectrum computed with it, so the
analyzer reports these positions and can leave them out of spectra.

Definitions (per layer, on the rows ``x_i`` of an ``[N, d]`` matrix):

* typical norm ``m = median_i ||x_i||``; a row is *massive* when ``||x_i|| / m >= ratio``.
* for a massive row, its top dimensions ``j`` by ``|x_ij|`` with their energy share ``x_ij^2 / ||x_i||^2``.
* Sun et al.'s own, stricter sense, per coordinate: a row holds a *massive activation* when one of
  its coordinates has ``|x_ij| >= ratio * median_{i,j} |x_ij|`` with ``ratio`` about 10^3 to 10^4
  (:func:`coordinate_massive_mask`; this module's row rule is what the analyses use).
* a dimension ``j`` is an *outlier dimension* when ``rms_j / median_k rms_k >= ratio`` where
  ``rms_j = sqrt(mean_i x_ij^2)`` over the non-massive rows. Unlike massive positions this is a
  statement about one coordinate basis (the model's), so it is a property of the trained weights
  (norm gains, embedding), not of a subspace.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .validation import as_matrix, check_positive

DEFAULT_MASSIVE_RATIO = 4.0
DEFAULT_OUTLIER_DIM_RATIO = 6.0
SUN_COORDINATE_RATIO = 1e3   # the low end of Sun et al.'s (2024) 10^3-10^4 range


@dataclass
class MassiveActivation:
    """One row whose norm is ``ratio`` times the layer's median norm."""
    layer: int | None
    row: int
    prompt: int
    position: int
    token: str
    norm: float
    typical_norm: float
    ratio: float
    top_dims: list[tuple[int, float, float]]  # (dimension, value, share of ||x||^2)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutlierDimension:
    """A residual coordinate whose RMS is ``ratio`` times the median coordinate's."""
    layer: int | None
    dim: int
    rms: float
    typical_rms: float
    ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


def massive_mask(norms: torch.Tensor, ratio: float = DEFAULT_MASSIVE_RATIO, reference=None,
                 dim: int = -1) -> torch.Tensor:
    """The massive-activation rule, on row norms: ``||x_i|| >= ratio * m`` (boolean, shape of ``norms``).

    ``m`` is ``median_i ||x_i||`` along ``dim`` (kept as a dimension, so a ``[batch, T, 1]`` tensor of
    norms gives one median per sequence), or the caller's ``reference`` norm (a number, or a tensor
    that broadcasts). When ``m`` is 0 (more than half the rows are zero vectors) every non-zero row
    counts as massive. Every module that flags massive activations calls this function.
    """
    m = norms.median(dim=dim, keepdim=True).values if reference is None else reference
    m = torch.as_tensor(m, dtype=norms.dtype, device=norms.device)
    return torch.where(m > 0, norms >= ratio * m, norms > 0)


def coordinate_massive_mask(x, ratio: float = SUN_COORDINATE_RATIO) -> torch.Tensor:
    """Rows of ``x`` ``[N, d]`` holding a massive activation in Sun et al.'s (2024) sense: a coordinate
    with ``|x_ij| >= ratio * m``, ``m = median_{i,j} |x_ij|`` over the whole matrix (boolean ``[N]``).
    When ``m`` is 0 every row with a non-zero coordinate counts, as in :func:`massive_mask`."""
    a = as_matrix(x, name="x", min_rows=1).abs()
    return massive_mask(a, check_positive(ratio, "ratio"), reference=a.median()).any(dim=1)


def massive_rows(x, ratio: float = DEFAULT_MASSIVE_RATIO, layer=None, top_k: int = 3,
                 prompt_index=None, position=None, tokens=None, name: str = "x", check: bool = True
                 ) -> list[MassiveActivation]:
    """Rows of ``x`` whose norm is at least ``ratio`` times the median row norm (see module doc).

    ``check=False`` trusts an already validated matrix. Norms are accumulated in float64 without a
    float64 copy of ``x``."""
    ratio = check_positive(ratio, "ratio")
    if check:
        x = as_matrix(x, name=name, layer=layer, min_rows=1)
    x = x.detach().cpu()
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    typical = float(norms.median())
    r = norms / typical if typical > 0 else torch.full_like(norms, float("inf"))
    rows = torch.nonzero(massive_mask(norms, ratio)).flatten()
    v = x[rows].to(torch.float64)                       # the massive rows only, all at once
    top = torch.topk(v.abs(), k=min(top_k, x.shape[1]), dim=1).indices
    value = v.gather(1, top)
    share = value ** 2 / (v * v).sum(dim=1, keepdim=True)
    prompts = torch.as_tensor(prompt_index)[rows].tolist() if prompt_index is not None else [0] * len(rows)
    positions = torch.as_tensor(position)[rows].tolist() if position is not None else rows.tolist()
    return [MassiveActivation(layer=layer, row=i, prompt=int(p), position=int(q),
                              token=tokens[i] if tokens is not None else "", norm=nrm, typical_norm=typical,
                              ratio=rr, top_dims=list(zip(dims, vals, shares)))
            for i, p, q, nrm, rr, dims, vals, shares in zip(rows.tolist(), prompts, positions,
                                                          norms[rows].tolist(), r[rows].tolist(), top.tolist(),
                                                          value.tolist(), share.tolist())]


def outlier_dimensions(x, ratio: float = DEFAULT_OUTLIER_DIM_RATIO, exclude_rows=None, layer=None,
                       name: str = "x", check: bool = True) -> list[OutlierDimension]:
    """Coordinates whose RMS over (non-excluded) rows is ``ratio`` times the median coordinate RMS.

    ``check=False`` trusts an already validated matrix."""
    ratio = check_positive(ratio, "ratio")
    if check:
        x = as_matrix(x, name=name, layer=layer, min_rows=1)
    x = x.detach().cpu()
    if exclude_rows is not None:
        keep = ~torch.as_tensor(exclude_rows, dtype=torch.bool)
        if int(keep.sum()) > 0 and not bool(keep.all()):
            x = x[keep]
    rms = torch.linalg.vector_norm(x, dim=0, dtype=torch.float64) / x.shape[0] ** 0.5
    typical = float(rms.median())
    if typical == 0:
        return []
    r = rms / typical
    order = torch.argsort(r, descending=True)
    order = order[r[order] >= ratio]
    return [OutlierDimension(layer=layer, dim=j, rms=a, typical_rms=typical, ratio=b)
            for j, a, b in zip(order.tolist(), rms[order].tolist(), r[order].tolist())]
