"""A toy model of superposition (Elhage et al. 2022, *Toy Models of Superposition*), small enough to
train in seconds on a CPU.

Why it belongs in a lesson on residual bandwidth: "more writers than dimensions" (Section 1) does not
force each component into its own slot. A layer can store *more features than it has dimensions* as
almost-orthogonal directions, as long as the features are rarely active at the same time (sparse);
what it pays is interference between the features that share directions. This module reproduces the
paper's first experiment:

* ``n`` features ``x_i``, each independently 0 with probability ``S`` (the *sparsity*) and uniform on
  ``[0, 1]`` otherwise; importance ``I_i = decay**i``;
* the model squeezes them into ``m < n`` dimensions and reads them back with a ReLU:
  ``h = W x`` (``W: [m, n]``), ``x' = ReLU(W^T h + b)``;
* trained with Adam on ``L = mean_batch sum_i I_i (x_i - x'_i)^2``.

What is measured per sparsity (:class:`ToyResult`):

* ``represented``: the features whose column ``W_i`` has norm above ``threshold`` (0.5), i.e. the
  features the model stores at all; ``features_per_dim = represented / m``. Above 1 the model holds
  more features than it has dimensions: superposition.
* ``dims_per_feature = m / ||W||_F^2`` (the paper's measure: 1 when each stored feature has its own
  dimension, 1/2 for antipodal pairs, and so on);
* ``max_interference``: the largest ``|cos(W_i, W_j)|`` between two represented features (0 when they
  are orthogonal).

Everything is seeded; :func:`sparsity_sweep` trains one model per sparsity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .capture import torch_threads
from .validation import BandwidthInputError


@dataclass
class ToyResult:
    """One trained toy model (module docstring); ``norms``: ``||W_i||`` per feature."""
    sparsity: float
    n_features: int
    n_dims: int
    represented: int
    features_per_dim: float
    dims_per_feature: float
    max_interference: float
    loss: float
    norms: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def train_toy_model(n_features: int = 20, n_dims: int = 5, sparsity: float = 0.9, decay: float = 0.9,
                    steps: int = 800, batch: int = 256, lr: float = 1e-2, seed: int = 0,
                    threshold: float = 0.5) -> ToyResult:
    """Train the ReLU toy model of the module docstring once and measure it."""
    if not (isinstance(n_features, int) and isinstance(n_dims, int) and 0 < n_dims < n_features):
        raise BandwidthInputError(f"expected ints 0 < n_dims < n_features, got {n_dims!r}, {n_features!r}")
    if not 0 <= sparsity < 1:
        raise BandwidthInputError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(n_dims, n_features, generator=g) * (2 / (n_dims + n_features)) ** 0.5).requires_grad_()
    b = torch.zeros(n_features, requires_grad=True)
    importance = decay ** torch.arange(n_features, dtype=torch.float32)
    opt = torch.optim.Adam([W, b], lr=lr)
    with torch_threads(1):            # matrices this small run fastest on one thread
        loss = _train(W, b, importance, opt, steps, batch, sparsity, g)
    W = W.detach().double()

    norms = W.norm(dim=0)
    rep = norms > threshold
    unit = W[:, rep] / norms[rep]
    cos = (unit.T @ unit).abs().fill_diagonal_(0) if int(rep.sum()) > 1 else torch.zeros(1, 1)
    return ToyResult(sparsity=float(sparsity), n_features=n_features, n_dims=n_dims, represented=int(rep.sum()),
                     features_per_dim=int(rep.sum()) / n_dims,
                     dims_per_feature=n_dims / float(W.pow(2).sum()),
                     max_interference=float(cos.max()), loss=float(loss.detach()), norms=norms.tolist())


def _train(W, b, importance, opt, steps, batch, sparsity, g) -> torch.Tensor:
    """Adam on the importance-weighted reconstruction loss; returns the last batch's loss."""
    n_features = W.shape[1]
    with torch.enable_grad():
        for _ in range(steps):
            x = torch.rand(batch, n_features, generator=g) * (torch.rand(batch, n_features, generator=g) >= sparsity)
            out = torch.relu(x @ W.T @ W + b)
            loss = (importance * (x - out) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loss


def sparsity_sweep(sparsities=(0.0, 0.7, 0.9, 0.97, 0.99), **kw) -> list[ToyResult]:
    """One :func:`train_toy_model` per sparsity (same seed, same everything else)."""
    return [train_toy_model(sparsity=s, **kw) for s in sparsities]


def plot_superposition(results: list[ToyResult]):
    """Features stored per dimension against sparsity, with the one-feature-per-dimension line.

    Returns an :class:`~residual_bandwidth.viz.AccessibleFigure` (alt text, caption, data table)."""
    from .viz.core import OKABE_ITO, _figure, _finish, format_number
    if not results:
        raise BandwidthInputError("results: expected at least one ToyResult")
    xs = [1 / (1 - r.sparsity) for r in results]   # expected number of draws per active feature
    fig, axes = _figure((7, 4))
    ax = axes[0, 0]
    ax.plot(xs, [r.features_per_dim for r in results], color=OKABE_ITO[0], marker="o", linestyle="-",
            label="features stored per dimension (||W_i|| > 0.5)")
    ax.plot(xs, [1 / r.dims_per_feature for r in results], color=OKABE_ITO[1], marker="s", linestyle="--",
            label="||W||_F^2 / m (the paper's 1 / dimensions per feature)")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1.2, label="one feature per dimension")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{r.sparsity:g}" for r in results])
    ax.set_xlabel("sparsity S (probability that a feature is 0), log scale of 1/(1-S)")
    ax.set_ylabel("features per dimension")
    n, m = results[0].n_features, results[0].n_dims
    title = f"Toy model: {n} sparse features squeezed into {m} dimensions"
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    alt = (f"Line chart of features stored per dimension against sparsity for a toy ReLU model with {n} "
           f"features and {m} dimensions. " + "; ".join(
               f"S = {r.sparsity:g}: {r.represented} features stored ({format_number(r.features_per_dim)} per "
               f"dimension), largest interference |cos| {format_number(r.max_interference)}" for r in results) + ".")
    table = [{"sparsity": r.sparsity, "features_stored": r.represented, "features_per_dim": r.features_per_dim,
              "dims_per_feature": r.dims_per_feature, "max_interference": r.max_interference, "loss": r.loss}
             for r in results]
    return _finish(fig, alt, table, title, [])
