"""Subspace communication: what components read and write, and who talks to whom.

Every head is a pair of low-rank maps on the residual stream (:mod:`.weights`): the OV circuit
``W_OV = W_V W_O`` and the QK circuit ``W_QK = W_Q W_K^T``, both ``[d_model, d_model]`` of rank
<= d_head. With the SVD ``W = U diag(s) V^T`` and row vectors (``x -> x W``):

* the **read subspace** is spanned by the top left singular vectors ``U[:, :k]`` (the only part of
  ``x`` that matters), the **write subspace** by the top right singular vectors ``V[:, :k]``;
* for ``W_QK`` the query side reads ``U`` and the key side reads ``V``.

Composition (Elhage et al. 2021; TransformerLens ``all_composition_scores``). Head A in an earlier
layer writes with ``W_OV^A``; head B in a later layer reads with one of its three inputs::

    Q-composition:  W_OV^A  W_QK^B        (A's output is read by B's queries)
    K-composition:  W_OV^A  (W_QK^B)^T    (... by B's keys)
    V-composition:  W_OV^A  W_OV^B        (... by B's values)

    score(A, B) = ||W_A W_B||_F / (||W_A||_F ||W_B||_F)        in [0, 1]

It is 1 only when A's write subspace lies inside B's read subspace with matching singular values,
and small when they are unrelated. We never form the ``d x d`` matrices:
``||W_A W_B||_F = ||diag(s_A) V_A^T U_B diag(s_B)||_F`` and ``||W||_F = ||s||``.

Random baseline: independent random matrices of the same shapes (each a ``[d, d_head]`` times a
``[d_head, d]`` standard Gaussian) also score above 0: ``E ||W_A W_B||_F^2 ~ ||W_A||_F^2 ||W_B||_F^2 / d``
(an isotropic write direction and an isotropic read direction have squared cosine 1/d on average), so
the baseline is about ``1 / sqrt(d_model)`` (0.042 for d = 576). A score means something only beside
the baseline's mean and standard deviation over ``n_baseline`` draws. Trained heads are not
Gaussian: a few large singular values widen the spread of scores of unrelated pairs, so
:func:`rotated_baseline` (real singular values, random orientation) is reported as well; compare
against the larger of the two.

Principal angles between subspaces ``span(A)`` and ``span(B)`` (orthonormal bases ``Q_A``, ``Q_B``):
``cos theta_i = sigma_i(Q_A^T Q_B)`` (Björck & Golub 1973); 0 rad = shared direction, pi/2 = orthogonal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .capture import architecture_of, check_layers
from .compression import random_subspace
from .validation import BandwidthInputError, as_matrix, check_int
from .weights import LayerWeights, all_layer_weights, check_layer_weights, factored_svd

COMPOSITION_KINDS = ("Q", "K", "V")


def principal_angles(a, b) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``a [d, p]`` and ``b [d, q]``.

    Columns need not be orthonormal (they are orthonormalised by QR). ``min(p, q)`` angles.
    """
    a = as_matrix(a, name="a", min_rows=1).detach().double()
    b = as_matrix(b, name="b", min_rows=1).detach().double()
    if a.shape[0] != b.shape[0]:
        raise BandwidthInputError(f"a, b: bases live in different spaces ({a.shape[0]} vs {b.shape[0]} rows)")
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(cos).sort().values


@dataclass
class CircuitSVD:
    """SVD of one layer's OV and QK circuits for all heads: ``U, V: [n_heads, d, d_head]``, ``S: [n_heads, d_head]``."""
    layer: int
    ov_U: torch.Tensor
    ov_S: torch.Tensor
    ov_V: torch.Tensor
    qk_U: torch.Tensor
    qk_S: torch.Tensor
    qk_V: torch.Tensor


def circuit_svd(lw: LayerWeights) -> CircuitSVD:
    """Factored SVDs of ``W_OV = W_V W_O`` and ``W_QK = W_Q W_K^T`` (float64), kept on ``lw`` after the
    first call: every head's subspaces and every composition score of a layer read the same SVDs
    (extracted weights are a snapshot; extract them again after changing the model)."""
    if "_circuit_svd" not in check_layer_weights(lw).__dict__:
        w = lw.to(torch.float64)
        lw._circuit_svd = CircuitSVD(lw.layer, *factored_svd(w.W_V, w.W_O), *factored_svd(w.W_Q, w.W_K.transpose(1, 2)))
    return lw._circuit_svd


def component_subspaces(lw: LayerWeights, head: int, k: int | None = None) -> dict:
    """Read/write bases (``[d, k]``, orthonormal columns) and singular values of one head.

    Keys: ``ov_read``, ``ov_write``, ``qk_query`` (what queries read), ``qk_key`` (what keys read),
    ``ov_singular``, ``qk_singular``. ``k`` defaults to d_head.
    """
    check_layer_weights(lw)
    head = check_int(head, f"head (layer {lw.layer})", 0, lw.n_heads - 1)
    k = check_int(lw.d_head if k is None else k, f"k (layer {lw.layer})", 1, lw.d_head)
    c = circuit_svd(lw)
    return {"ov_read": c.ov_U[head, :, :k], "ov_write": c.ov_V[head, :, :k],
            "qk_query": c.qk_U[head, :, :k], "qk_key": c.qk_V[head, :, :k],
            "ov_singular": c.ov_S[head, :k], "qk_singular": c.qk_S[head, :k]}


def _pair_scores(write_s, write_V, read_U, read_s) -> torch.Tensor:
    """Scores for every (source, destination): sources ``write_V [a, d, r]`` with ``write_s [a, r]``,
    destinations ``read_U [b, d, r]`` with ``read_s [b, r]``. Returns ``[a, b]``."""
    a, d, r = write_V.shape
    b = read_U.shape[0]
    # float32 for the one big product (the SVDs were float64); relative error ~1e-6
    left = (write_V * write_s[:, None, :]).permute(0, 2, 1).reshape(a * r, d).float()   # rows: s_i v_i^T
    right = (read_U * read_s[:, None, :]).permute(1, 0, 2).reshape(d, b * r).float()    # cols: u_j s_j
    prod = (left @ right).reshape(a, r, b, r)
    num = prod.pow(2).sum(dim=(1, 3)).double().sqrt()
    return num / (write_s.norm(dim=1)[:, None] * read_s.norm(dim=1)[None, :])


def random_baseline(d_model: int, d_head: int, n: int = 50, seed: int = 0) -> tuple[float, float]:
    """Mean and std of ``||W_A W_B||_F / (||W_A||_F ||W_B||_F)`` for ``n`` draws of independent
    ``W_A = A_1 A_2``, ``W_B = B_1 B_2`` with standard Gaussian ``[d_model, d_head]`` / ``[d_head, d_model]``
    factors.

    Computed without ``d x d`` matrices: with ``M = A_2 B_1`` (``d_head x d_head``),
    ``||A_1 M B_2||_F^2 = tr(M^T (A_1^T A_1) M (B_2 B_2^T))`` and ``||A_1 A_2||_F^2 = tr((A_1^T A_1)(A_2 A_2^T))``.
    """
    check_int(n, "n_baseline", low=2)
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        a1, b1 = (torch.randn(d_model, d_head, generator=g, dtype=torch.float64) for _ in range(2))
        a2, b2 = (torch.randn(d_head, d_model, generator=g, dtype=torch.float64) for _ in range(2))
        ga, gb = a1.T @ a1, b2 @ b2.T
        m = a2 @ b1
        prod = torch.trace(m.T @ ga @ m @ gb)
        norm_a = torch.trace(ga @ (a2 @ a2.T))
        norm_b = torch.trace((b1.T @ b1) @ gb)
        vals.append(float(torch.sqrt(prod / (norm_a * norm_b))))
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std())


def rotated_baseline(write_s: torch.Tensor, write_V: torch.Tensor, write_layer: torch.Tensor,
                     read_s: torch.Tensor, read_layer: torch.Tensor, n: int = 50,
                     seed: int = 0) -> tuple[float, float]:
    """A second, stricter baseline: real heads' singular values, random relative orientation.

    Trained heads have a few large singular values, which widens the spread of scores even for
    unrelated subspaces. For ``n`` random (source, later destination) pairs we keep both heads'
    singular values ``s_A, s_B`` and A's write directions ``V_A``, replace B's read directions by a
    uniformly random orthonormal frame ``R`` and compute
    ``||diag(s_A) V_A^T R diag(s_B)||_F / (||s_A|| ||s_B||)``.
    Shapes: ``write_s [a, r]``, ``write_V [a, d, r]``, ``write_layer [a]``, ``read_s [b, r]``,
    ``read_layer [b]``.
    """
    g = torch.Generator().manual_seed(seed)
    pairs = torch.nonzero(read_layer[None, :] > write_layer[:, None])
    if len(pairs) == 0:
        return float("nan"), float("nan")
    d, r = write_V.shape[1], read_s.shape[1]
    vals = []
    for t in torch.randint(len(pairs), (n,), generator=g).tolist():
        i, j = pairs[t].tolist()
        frame, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
        m = (write_V[i] * write_s[i]).T @ frame * read_s[j]
        vals.append(float(m.norm() / (write_s[i].norm() * read_s[j].norm())))
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std())


@dataclass
class CompositionScores:
    """Scores between every head (rows, ``src_labels``) and every head (columns, ``dst_labels``);
    NaN where the destination is not in a later layer."""
    kind: str
    src_labels: list[str]
    dst_labels: list[str]
    scores: torch.Tensor
    baseline_mean: float
    baseline_std: float
    n_baseline: int
    rotated_mean: float = float("nan")
    rotated_std: float = float("nan")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "src_labels": self.src_labels, "dst_labels": self.dst_labels,
                "scores": self.scores.tolist(), "baseline_mean": self.baseline_mean,
                "baseline_std": self.baseline_std}

    def valid(self) -> torch.Tensor:
        """The finite scores (pairs with the destination in a later layer) as a 1-D tensor."""
        return self.scores[torch.isfinite(self.scores)]

    def top_pairs(self, n: int = 10) -> list[dict]:
        """The ``n`` highest-scoring pairs with their z-score against the baseline."""
        flat = torch.nan_to_num(self.scores, nan=-1.0).reshape(-1)
        out = []
        for j in torch.argsort(flat, descending=True)[:n].tolist():
            i, k = divmod(j, self.scores.shape[1])
            if flat[j] < 0:
                break
            s = float(self.scores[i, k])
            out.append({"src": self.src_labels[i], "dst": self.dst_labels[k], "score": s,
                        "z": (s - self.baseline_mean) / self.baseline_std})
        return out

    def summary(self) -> dict:
        v = self.valid()
        return {"kind": self.kind, "n_pairs": int(v.numel()), "max": float(v.max()) if v.numel() else None,
                "mean": float(v.mean()) if v.numel() else None,
                "baseline_mean": self.baseline_mean, "baseline_std": self.baseline_std,
                "share_above_3_std": (float((v > self.baseline_mean + 3 * self.baseline_std).float().mean())
                                      if v.numel() else None),
                "rotated_baseline_mean": self.rotated_mean, "rotated_baseline_std": self.rotated_std,
                "share_above_3_rotated_std": (float((v > self.rotated_mean + 3 * self.rotated_std).float().mean())
                                              if v.numel() and self.rotated_std == self.rotated_std else None),
                "top_pairs": self.top_pairs(5)}


def _readers(svds, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What each head reads with for ``kind``-composition, stacked over heads: its query side (Q),
    key side (K) or value side (V) singular vectors and their singular values."""
    U, S = {"Q": ("qk_U", "qk_S"), "K": ("qk_V", "qk_S"), "V": ("ov_U", "ov_S")}[kind]
    return torch.cat([getattr(c, U) for c in svds]), torch.cat([getattr(c, S) for c in svds])


def composition_scores(model_or_weights, kind: str = "Q", layers=None, n_baseline: int = 50,
                       seed: int = 0, progress: bool = False) -> CompositionScores:
    """Composition scores of ``kind`` ("Q", "K" or "V") between all heads of ``layers`` (module doc).

    ``model_or_weights``: a supported model, or a list of :class:`LayerWeights` (e.g. from
    :func:`all_layer_weights`, to reuse them across kinds). Row/column labels are ``"L{layer}.H{head}"``.
    """
    if kind not in COMPOSITION_KINDS:
        raise BandwidthInputError(f"kind: expected one of {COMPOSITION_KINDS}, got {kind!r}")
    if isinstance(model_or_weights, torch.nn.Module):
        architecture_of(model_or_weights)
        weights = all_layer_weights(model_or_weights, check_layers(model_or_weights, layers))
    elif isinstance(model_or_weights, (list, tuple)) and model_or_weights and all(
            isinstance(w, LayerWeights) for w in model_or_weights):
        weights = [w for w in model_or_weights if layers is None or w.layer in set(layers)]
        if not weights:
            raise BandwidthInputError(f"layers: none of {layers} is among the given weights")
    else:
        raise BandwidthInputError("model_or_weights: expected a model or a non-empty list of LayerWeights, "
                                  f"got {type(model_or_weights).__name__}")
    from tqdm.auto import tqdm
    svds = [circuit_svd(w) for w in tqdm(weights, desc="circuit SVDs", disable=not progress)]
    labels = [f"L{w.layer}.H{h}" for w in weights for h in range(w.n_heads)]
    layer_of = torch.tensor([w.layer for w in weights for _ in range(w.n_heads)])
    read_U, read_s = _readers(svds, kind)
    n = len(labels)
    scores = torch.full((n, n), float("nan"), dtype=torch.float64)
    row = 0
    for w, c in zip(weights, svds):
        later = layer_of > w.layer
        if bool(later.any()):
            scores[row:row + w.n_heads, later] = _pair_scores(c.ov_S, c.ov_V, read_U[later], read_s[later])
        row += w.n_heads
    mean, std = random_baseline(weights[0].d_model, weights[0].d_head, n_baseline, seed)
    r_mean, r_std = rotated_baseline(torch.cat([c.ov_S for c in svds]), torch.cat([c.ov_V for c in svds]),
                                     layer_of, read_s, layer_of, n_baseline, seed)
    return CompositionScores(kind=kind, src_labels=labels, dst_labels=labels, scores=scores, baseline_mean=mean,
                             baseline_std=std, n_baseline=n_baseline, rotated_mean=r_mean, rotated_std=r_std)


# ---------------------------------------------------------------------------------------------
# How many pairs exceed the baseline by chance: a threshold for all pairs at once
# ---------------------------------------------------------------------------------------------
@dataclass
class PairSignificance:
    """Which composition scores exceed chance once the number of pairs is accounted for.

    ``null_max``: for each of ``n_draws`` draws, the largest score over all pairs after every writer
    is rotated by one random orthogonal matrix (:func:`max_statistic_null`). The threshold is an
    order statistic of these maxima, chosen so that the family-wise error rate is exact: under the
    null the real maximum ``M_0`` and the ``m = n_draws`` null maxima are exchangeable, so for the
    ``j``-th smallest null maximum ``M_(j)``

        P(M_0 > M_(j)) = (m + 1 - j) / (m + 1)          (ties have probability 0)

    and ``j = ceil((1 - alpha)(m + 1))`` gives ``false_alarm_rate = (m + 1 - j)/(m + 1) <= alpha``,
    the chance that *any* of the ``n_pairs`` pairs exceeds the threshold by chance. With ``m = 19``
    and ``alpha = 0.05`` the threshold is the largest of the 19 maxima and the rate is exactly 1/20.
    With ``m + 1 < 1 / alpha`` no order statistic reaches ``alpha``: an error names the draws needed.
    ``above_3std`` is what the Gaussian baseline's "mean + 3 std" rule flags; it predicts
    ``expected_by_chance_3std = n_pairs * P(Z > 3)`` by chance, while the rotated null (real singular
    values) puts ``null_above_3std`` pairs above the same level per draw on average.
    """
    kind: str
    n_pairs: int
    n_draws: int
    alpha: float
    null_max: list[float]
    threshold: float
    n_significant: int
    above_3std: int
    expected_by_chance_3std: float
    null_mean: float
    null_std: float
    #: the exact chance, under the null, that some pair exceeds ``threshold`` ((m + 1 - j)/(m + 1))
    false_alarm_rate: float = float("nan")
    #: the rank ``j`` of the null maximum used as threshold (1 = smallest, ``n_draws`` = largest)
    order_statistic: int = 0
    #: mean number of null scores per draw above the Gaussian "mean + 3 std" level
    null_above_3std: float = float("nan")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def max_statistic_null(weights, kind: str = "K", n_draws: int = 20, seed: int = 0) -> tuple[list[float], torch.Tensor]:
    """Null distribution of composition scores with each pair's orientation destroyed.

    Hypothesis: a writer's output subspace is oriented independently of what later heads read. For
    each draw one random orthogonal ``Q`` (``d x d``) rotates every writer's write directions
    (``V_A -> Q V_A``); singular values, the writers' geometry among themselves and the readers are
    unchanged, so the draw keeps everything except writer-reader alignment. Returns the largest score
    over all (writer, later reader) pairs per draw, and all null scores, ``[n_draws, n_pairs]``.
    Unlike :func:`random_baseline` (Gaussian matrices), this null has the real heads' singular
    values, whose few large values widen the spread of chance scores.
    """
    if kind not in COMPOSITION_KINDS:
        raise BandwidthInputError(f"kind: expected one of {COMPOSITION_KINDS}, got {kind!r}")
    check_int(n_draws, "n_draws", low=1)
    weights = list(weights)
    svds = [circuit_svd(w) for w in weights]
    layer_of = torch.tensor([w.layer for w in weights for _ in range(w.n_heads)])
    read_U, read_s = _readers(svds, kind)
    g, d, maxima, pooled = torch.Generator().manual_seed(seed), weights[0].d_model, [], []
    for _ in range(n_draws):
        Q = random_subspace(d, d, g)   # a uniformly random rotation
        best = -1.0
        for w, c in zip(weights, svds):
            later = layer_of > w.layer
            if bool(later.any()):
                s = _pair_scores(c.ov_S, Q @ c.ov_V, read_U[later], read_s[later])
                best = max(best, float(s.max()))
                pooled.append(s.reshape(-1))
        maxima.append(best)
    return maxima, torch.cat(pooled).reshape(n_draws, -1) if pooled else torch.zeros(n_draws, 1)


def draws_needed(alpha: float) -> int:
    """The fewest null draws for which an order statistic has family-wise error rate <= ``alpha``:
    ``ceil(1/alpha) - 1`` (19 for ``alpha = 0.05``)."""
    if not 0 < alpha < 1:
        raise BandwidthInputError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    return math.ceil(1 / alpha - 1e-12) - 1


def order_statistic_threshold(maxima, alpha: float) -> tuple[float, int, float]:
    """``(threshold, j, false_alarm_rate)``: the exact rule of :class:`PairSignificance`."""
    m = len(maxima)
    j = math.ceil((1 - alpha) * (m + 1) - 1e-12)
    if j > m:
        raise BandwidthInputError(f"{m} null draws cannot give a family-wise error rate of {alpha}: "
                                  f"use at least {draws_needed(alpha)} draws")
    return float(sorted(maxima)[j - 1]), j, (m + 1 - j) / (m + 1)


def pair_significance(scores: CompositionScores, weights, alpha: float = 0.05, n_draws: int = 19,
                      seed: int = 0) -> PairSignificance:
    """Count the pairs whose score exceeds the family-wise threshold of :func:`max_statistic_null`.

    ``threshold`` = the order statistic ``M_(j)`` of the per-draw maxima with
    ``j = ceil((1 - alpha)(n_draws + 1))`` (:class:`PairSignificance`); ``false_alarm_rate`` is its
    exact family-wise error rate. ``weights`` must be the :class:`LayerWeights` the scores were
    computed from.
    """
    needed = draws_needed(alpha)   # also checks alpha
    if isinstance(n_draws, int) and not isinstance(n_draws, bool) and 0 < n_draws < needed:
        raise BandwidthInputError(f"n_draws = {n_draws} cannot give a family-wise error rate of {alpha}: "
                                  f"use at least {needed} draws")
    maxima, null = max_statistic_null(weights, scores.kind, n_draws, seed)
    thr, j, rate = order_statistic_threshold(maxima, alpha)
    v, level = scores.valid(), scores.baseline_mean + 3 * scores.baseline_std
    return PairSignificance(kind=scores.kind, n_pairs=int(v.numel()), n_draws=n_draws, alpha=alpha,
                            null_max=maxima, threshold=thr, n_significant=int((v > thr).sum()),
                            above_3std=int((v > level).sum()),
                            expected_by_chance_3std=v.numel() * 0.5 * math.erfc(3 / math.sqrt(2)),
                            null_mean=float(null.mean()), null_std=float(null.std()), false_alarm_rate=rate,
                            order_statistic=j, null_above_3std=float((null > level).sum()) / n_draws)
