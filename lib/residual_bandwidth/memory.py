"""Memory management: components that delete what is in the residual stream.

The residual stream is a shared memory of fixed width, and everything written to it stays until
something removes it. Elhage et al. (2021, footnote on "memory management") point out that some
components seem to do just that. This module measures three kinds of evidence and ranks candidates.

From the weights (:mod:`.weights` conventions, gains folded, GQA expanded):

* **Heads.** ``W_OV = W_V W_O`` has rank <= d_head; its non-zero eigenvalues equal those of the
  small ``W_O W_V`` (``[d_head, d_head]``), and are complex in general. A head that *erases* what it
  attends to has ``W_OV ~ -c P`` (``P`` a projection), i.e. negative real eigenvalues, and erases
  the current token's content when it attends to the current token. Per head we report

      neg_share  = sum_{Re lambda < 0} |lambda| / sum |lambda|        in [0, 1]
      eigen_sign = Re(sum lambda) / sum |lambda| = tr(W_OV) / sum |lambda|   in [-1, 1]

  (1 and -1 for ``-c P``; about 0.5 and 0 for a random matrix) and the head's mean attention to the
  current token ``mean_t A[t, t]`` over query positions ``t >= 1`` of real tokens (position 0 can
  only attend to itself, so it is left out).

* **Neurons.** ``cos(W_in[:, n], W_out[n])``: a neuron whose output direction is minus its input
  direction removes (part of) what it read. For SwiGLU the input direction is the *up* projection
  (see :mod:`.weights`); the gate cosine is reported too.

From activations (one forward pass, real tokens only):

* **Write against read.** For a component that reads residual ``r_t`` (attention and its heads read
  ``resid_pre``, the MLP and its neurons read ``resid_mid``) and writes ``w_t``,

      projection = mean_t <w_t, r_t> / ||r_t||^2

  is the coefficient of the write along the residual it read: ``-1`` means it deletes the whole
  vector, ``0`` means it writes orthogonally (or nothing), ``> 0`` means it amplifies. Each token
  counts once (a ratio per token, then the mean), so the massive first-token vector cannot dominate;
  the mean over massive rows alone is reported separately.
* **Directions that lose energy.** From ``S_in = X_pre^T X_pre / n`` and ``S_out = X_post^T X_post / n``
  (uncentred second moments of ``resid_pre[L]`` and ``resid_post[L]``), the eigenvectors of
  ``S_out - S_in`` with the most negative eigenvalues are the directions block L drains most;
  ``lost_fraction = -lambda / (v^T S_in v)`` is the share of the energy along ``v`` it removed.

Ranking (:func:`rank_candidates`): every candidate gets a score in [0, 1] meaning "fraction of an
ideal eraser": heads ``max(0, -eigen_sign) * current_token_attention`` (the eigen term alone when no
activations were given), neurons ``max(0, -cos)``, activations ``clip(-projection, 0, 1)``. The
top ``top_per_kind`` of each kind are merged and sorted by score: each kind on its own evidence.
:func:`combined_ranking` ranks heads and neurons by weight *and* activation evidence together
(``score = weight score x activation score``), so a component needs both to rank high.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .capture import (Listener, add_hook, architecture_of, as_capture, check_layers, hook_point,
                      model_dims)
from .outliers import DEFAULT_MASSIVE_RATIO, massive_mask
from .validation import BandwidthInputError, check_int, check_positive, check_run
from .weights import LayerWeights, all_layer_weights, check_layer_weights, out_projections

#: the keys of one (layer, head) record of :func:`head_records`
HEAD_KEYS = ("layer", "head", "kv_head", "eig_real", "eig_imag", "neg_share", "current_token_attention")
#: the keys of one entry of :func:`rank_candidates`
RANKING_KEYS = ("rank", "component", "kind", "layer", "index", "score", "evidence")

# ---------------------------------------------------------------------------------------------
# Weights: W_OV eigenvalues, neuron cosines
# ---------------------------------------------------------------------------------------------


def ov_eigenvalues(lw: LayerWeights) -> torch.Tensor:
    """The d_head non-zero eigenvalues of every head's ``W_OV``: complex ``[n_heads, d_head]``.

    ``W_V W_O`` (``d x d``) and ``W_O W_V`` (``d_head x d_head``) have the same non-zero eigenvalues,
    so we decompose the small one (in float64).
    """
    check_layer_weights(lw)
    small = lw.W_O.double() @ lw.W_V.double()
    return torch.linalg.eigvals(small)


def neg_share(eigs: torch.Tensor) -> torch.Tensor:
    """``sum_{Re lambda < 0} |lambda| / sum |lambda|`` along the last axis (0 when all are 0)."""
    mag = eigs.abs()
    total = mag.sum(-1)
    neg = (mag * (eigs.real < 0)).sum(-1)
    return torch.where(total > 0, neg / total.clamp_min(1e-300), torch.zeros_like(total))


def eigen_sign(eigs: torch.Tensor) -> torch.Tensor:
    """``Re(sum lambda) / sum |lambda|`` in [-1, 1]: -1 for a pure eraser, +1 for a pure copier."""
    total = eigs.abs().sum(-1)
    return torch.where(total > 0, eigs.real.sum(-1) / total.clamp_min(1e-300), torch.zeros_like(total))


def neuron_cosines(model: torch.nn.Module, layers=None, direction: str = "in",
                   weights: Sequence[LayerWeights] | None = None) -> torch.Tensor:
    """``cos(input direction, output direction)`` of every MLP neuron: ``[len(layers), d_mlp]``.

    ``direction="in"`` uses ``W_in`` (gpt2's c_fc, llama's up projection); ``"gate"`` uses llama's
    gate projection (an error for gpt2, which has none). ``weights``: the layers' already extracted
    :class:`LayerWeights` (then ``model`` and ``layers`` are not read).
    """
    if direction not in ("in", "gate"):
        raise BandwidthInputError(f"direction: expected 'in' or 'gate', got {direction!r}")
    out = []
    for lw in (weights if weights is not None else all_layer_weights(model, layers)):
        w_in = lw.W_in if direction == "in" else lw.W_gate
        if w_in is None:
            raise BandwidthInputError(f"direction='gate': the {lw.family} MLP has no gate projection")
        out.append(torch.nn.functional.cosine_similarity(w_in.T.double(), lw.W_out.double(), dim=1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Running the model with hooks
# ---------------------------------------------------------------------------------------------
def _probabilities(out) -> torch.Tensor:
    """The attention probabilities ``[B, H, T, T]`` an attention module returned in eager mode."""
    if not isinstance(out, (tuple, list)) or len(out) < 2 or out[1] is None:
        raise RuntimeError("the attention module returned no probabilities in eager mode")
    return out[1]


def head_records(model: torch.nn.Module, layers=None, current_attention: torch.Tensor | None = None,
                 weights: Sequence[LayerWeights] | None = None) -> list[dict]:
    """One record per (layer, head): ``{layer, head, kv_head, eig_real, eig_imag, neg_share,
    current_token_attention}``.

    ``current_attention``: every head's mean attention to the current token ``[len(layers), n_heads]``
    (measured by :class:`ErasureMeter` with ``attention=True``, e.g. ``ResidualRun.erasure``); without
    it that field is ``None``. Eigenvalues are sorted by real part (most negative first). ``weights``:
    the layers' already extracted :class:`LayerWeights`, in the order of ``layers``.
    """
    layers = check_layers(model, layers)
    weights = list(weights) if weights is not None else all_layer_weights(model, layers)
    shape = (len(layers), model_dims(model)["n_heads"])
    if current_attention is not None and tuple(current_attention.shape) != shape:
        raise BandwidthInputError(f"current_attention: expected shape {shape}, got {tuple(current_attention.shape)}")
    out = []
    for i, (L, lw) in enumerate(zip(layers, weights)):
        eigs = ov_eigenvalues(lw)
        share = neg_share(eigs)
        for h in range(lw.n_heads):
            e = eigs[h][torch.argsort(eigs[h].real)]
            cta = None if current_attention is None else float(current_attention[i, h])
            out.append({"layer": L, "head": h, "kv_head": lw.kv_head[h], "eig_real": e.real.tolist(),
                        "eig_imag": e.imag.tolist(), "neg_share": float(share[h]), "current_token_attention": cta})
    return out


# ---------------------------------------------------------------------------------------------
# Activations: write against read
# ---------------------------------------------------------------------------------------------
@dataclass
class ErasureReport:
    """``mean_t <write_t, read_t> / ||read_t||^2`` per component (module docstring).

    ``attn, mlp: [n]``, ``heads: [n, n_heads]``, ``neurons: [n, d_mlp]`` for ``n = len(layers)``;
    ``attn_massive`` / ``mlp_massive``: the same mean over massive rows only (NaN when a layer has
    none; a row is massive when its read residual is >= ``massive_ratio`` x the layer's median norm).
    """
    layers: list[int]
    attn: torch.Tensor
    mlp: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor
    attn_massive: torch.Tensor
    mlp_massive: torch.Tensor
    n_tokens: int
    massive_ratio: float
    #: ``[n, n_heads]`` mean attention to the current token (query positions t >= 1, the mean of
    #: A[h, t, t]), measured in the same forward pass when asked for (``attention=True``), else None
    current_attention: torch.Tensor | None = None

    def records(self, neurons: int = 0) -> list[dict]:
        """``{layer, component, index, label, projection, projection_massive}`` for attention, MLP,
        every head, and the ``neurons`` most negative neurons of each layer."""
        out = []
        for i, L in enumerate(self.layers):
            for comp, v, vm in (("attn", self.attn, self.attn_massive), ("mlp", self.mlp, self.mlp_massive)):
                m = float(vm[i])
                out.append({"layer": L, "component": comp, "index": None, "label": f"L{L}.{comp}",
                            "projection": float(v[i]), "projection_massive": None if m != m else m})
            for h in range(self.heads.shape[1]):
                out.append({"layer": L, "component": "head", "index": h, "label": f"L{L}.H{h}",
                            "projection": float(self.heads[i, h]), "projection_massive": None})
            for n in torch.argsort(self.neurons[i])[:neurons].tolist():
                out.append({"layer": L, "component": "neuron", "index": n, "label": f"L{L}.N{n}",
                            "projection": float(self.neurons[i, n]), "projection_massive": None})
        return out

    def to_dict(self) -> dict:
        return {"layers": self.layers, "n_tokens": self.n_tokens, "massive_ratio": self.massive_ratio,
                "records": self.records(neurons=3)}


class ErasureMeter(Listener):
    """A listener of :func:`~residual_bandwidth.capture.run_listeners` (``ResidualRun.erasure``):
    per batch, every real token's write-vs-read projections (and, with ``attention``, each head's
    attention to the current token). :meth:`report` turns the accumulated rows into an
    :class:`ErasureReport`."""

    def __init__(self, model: torch.nn.Module, layers=None, massive_ratio: float = DEFAULT_MASSIVE_RATIO,
                 weights: Sequence[LayerWeights] | None = None, attention: bool = False):
        self.massive_ratio = check_positive(massive_ratio, "massive_ratio")
        self.arch = architecture_of(model)
        self.model, self.layers, self.eager = model, check_layers(model, layers), bool(attention)
        dims = model_dims(model)
        self.H, self.dh = dims["n_heads"], dims["d_head"]
        weights = list(weights) if weights is not None else all_layer_weights(model, self.layers)
        # W_O[L]: [H*dh, d], row block h is the head's W_O[h]; W_out[L]: [d_mlp, d]
        self.W_O = {L: lw.W_O.reshape(self.H * self.dh, -1).float() for L, lw in zip(self.layers, weights)}
        self.W_out = {L: lw.W_out.float() for L, lw in zip(self.layers, weights)}
        self.store, self.rows = {}, defaultdict(list)   # (quantity, layer) -> one tensor per batch
        self.cta_sum = torch.zeros(len(self.layers), self.H, dtype=torch.float64)
        self.cta_count = 0

    def attach(self) -> list:
        blocks, handles = self.arch.blocks(self.model), []
        for L in self.layers:
            o_proj, down = out_projections(self.model, L)
            spots = {what: hook_point(self.arch, blocks[L], kind) for what, kind in
                     (("pre", "resid_pre"), ("mid", "resid_mid"), ("attn", "attn_out"), ("mlp", "mlp_out"))}
            spots.update(z=(o_proj, "input"), act=(down, "input"))   # the heads' z, the neurons' activations
            handles += [add_hook(module, where, functools.partial(self.store.__setitem__, (what, L)))
                        for what, (module, where) in spots.items()]
            if self.eager:
                def diag(mod, args, out, L=L):
                    self.store[("diag", L)] = _probabilities(out).diagonal(dim1=-2, dim2=-1)   # [B, H, T]
                handles.append(self.arch.attn(blocks[L]).register_forward_hook(diag))
        return handles

    def batch(self, start, enc, mask):
        store, rows, H, dh = self.store, self.rows, self.H, self.dh
        if self.eager:   # query positions t >= 1 of real tokens (position 0 only sees itself)
            q = mask.clone()
            q[:, 0] = False
            for i, L in enumerate(self.layers):
                self.cta_sum[i] += (store[("diag", L)].double() * q[:, None, :]).sum(dim=(0, 2)).cpu()
            self.cta_count += int(q.sum())
        for L in self.layers:
            pre, mid = store[("pre", L)][mask].float(), store[("mid", L)][mask].float()
            z, act = store[("z", L)][mask].float(), store[("act", L)][mask].float()
            pre_sq, mid_sq = pre.pow(2).sum(-1), mid.pow(2).sum(-1)
            rows[("attn", L)].append((store[("attn", L)][mask].float() * pre).sum(-1) / pre_sq)
            rows[("mlp", L)].append((store[("mlp", L)][mask].float() * mid).sum(-1) / mid_sq)
            # <z_h W_O[h], r> = z_h . (r W_O[h]^T): one matmul for all heads
            rows[("heads", L)].append(((pre @ self.W_O[L].T) * z).reshape(-1, H, dh).sum(-1) / pre_sq[:, None])
            rows[("neurons", L)].append(act * (mid @ self.W_out[L].T) / mid_sq[:, None])
            rows[("rpre", L)].append(pre_sq.sqrt())
            rows[("rmid", L)].append(mid_sq.sqrt())
        store.clear()

    def report(self) -> ErasureReport:
        layers, cat = self.layers, {k: torch.cat(v).cpu() for k, v in self.rows.items()}

        def massive_mean(ratio, norms):
            big = massive_mask(norms, self.massive_ratio)
            return ratio[big].mean() if bool(big.any()) else torch.tensor(float("nan"))

        return ErasureReport(
            layers=layers, attn=torch.stack([cat[("attn", L)].mean() for L in layers]),
            mlp=torch.stack([cat[("mlp", L)].mean() for L in layers]),
            heads=torch.stack([cat[("heads", L)].mean(0) for L in layers]),
            neurons=torch.stack([cat[("neurons", L)].mean(0) for L in layers]),
            attn_massive=torch.stack([massive_mean(cat[("attn", L)], cat[("rpre", L)]) for L in layers]),
            mlp_massive=torch.stack([massive_mean(cat[("mlp", L)], cat[("rmid", L)]) for L in layers]),
            n_tokens=int(cat[("attn", layers[0])].numel()), massive_ratio=self.massive_ratio,
            current_attention=(self.cta_sum / self.cta_count).float() if self.eager and self.cta_count else None)


@dataclass
class DirectionErasure:
    """Erasure per direction (:func:`direction_erasure`). ``beta[i]``: the coefficient of the write on
    the read along the read's i-th principal direction; ``variance_share[i]``: that direction's share
    of the read's (centred) variance; ``per_vector``: ``mean_t <w_t, r_t> / ||r_t||^2`` on the same rows."""
    beta: torch.Tensor
    variance_share: torch.Tensor
    per_vector: float
    n_tokens: int
    #: the most negative beta over all directions when the write rows are shuffled against the read
    #: rows (``n_perm`` permutations): what chance alone produces. A beta below it is not chance.
    null_min: float = float("nan")

    @property
    def most_negative(self) -> tuple[int, float]:
        """``(i, beta_i)`` for the direction the write removes most of."""
        i = int(torch.argmin(self.beta))
        return i, float(self.beta[i])

    def weighted_mean(self) -> float:
        """``sum_i variance_share_i * beta_i``: the share of the read's variation the write removes overall."""
        return float((self.variance_share * self.beta).sum() / self.variance_share.sum())


def direction_erasure(write, read, k: int | None = None, massive_ratio: float = DEFAULT_MASSIVE_RATIO,
                      write_ratio: float = 10.0, n_perm: int = 20, seed: int = 0) -> DirectionErasure:
    """How much of what it read a component removes, per principal direction of what it read.

    ``write``, ``read``: ``[tokens, d_model]`` (what the component wrote, the residual it read). Rows
    whose read norm is at least ``massive_ratio`` times the median read norm (massive rows), or whose
    write norm is at least ``write_ratio`` (10) times the median write norm (the token where a component
    creates a massive activation, which would otherwise dominate the regression), are left out. With ``v_i`` the principal
    directions of the centred read rows (by decreasing variance) and ``a_t = (r_t - mean r) . v_i``,
    ``b_t = (w_t - mean w) . v_i``:

        beta_i = sum_t a_t b_t / sum_t a_t^2

    is the least-squares coefficient of the write on the read along ``v_i``: ``-1`` means the
    component cancels the token-to-token variation along ``v_i`` completely, ``0`` that it leaves it
    alone. The per-vector projection (module docstring) averages over all directions at once; a
    component can leave most directions alone and erase one. ``k``: the number of leading directions
    (default: all with non-zero variance, at most ``tokens // 4`` so that each beta rests on four or
    more tokens per direction). ``null_min``: the most negative beta over all directions and ``n_perm``
    random pairings of write rows with read rows (a permutation null; with few tokens a component
    that writes a lot can reach a strongly negative beta by chance).
    """
    from .metrics import principal_directions
    w = torch.as_tensor(write).detach().double()
    r = torch.as_tensor(read).detach().double()
    if w.ndim != 2 or w.shape != r.shape:
        raise BandwidthInputError(f"write/read: expected two [tokens, d_model] tensors of one shape, got "
                                  f"{tuple(w.shape)} and {tuple(r.shape)}")
    keep = ~massive_mask(r.norm(dim=1), massive_ratio) & ~massive_mask(w.norm(dim=1), write_ratio)
    w, r = w[keep], r[keep]
    if r.shape[0] < 8:
        raise BandwidthInputError(f"read: {r.shape[0]} non-massive tokens; need at least 8")
    mu, V, var = principal_directions(r, name="read residual")
    kmax = min(int((var > 1e-12 * var[0]).sum()), r.shape[0] // 4)
    k = kmax if k is None else min(int(k), kmax)
    a = (r - mu) @ V[:, :k]
    b = (w - w.mean(0)) @ V[:, :k]
    beta = (a * b).sum(0) / a.pow(2).sum(0)
    g = torch.Generator().manual_seed(seed)
    null = [float(((a * b[torch.randperm(len(b), generator=g)]).sum(0) / a.pow(2).sum(0)).min())
            for _ in range(n_perm)]
    per_vector = float(((w * r).sum(1) / r.pow(2).sum(1)).mean())
    return DirectionErasure(beta=beta, variance_share=var[:k] / var.sum(), per_vector=per_vector,
                            n_tokens=int(r.shape[0]), null_min=min(null) if null else float("nan"))


def energy_loss_directions(states, top_k: int = 3, massive_ratio: float = DEFAULT_MASSIVE_RATIO,
                           exclude_massive: bool = True, layers=None) -> list[dict]:
    """Directions block L drains most, from a capture with ``resid_pre`` and ``resid_post``.

    For each captured layer: ``S_in = X_pre^T X_pre / n``, ``S_out = X_post^T X_post / n`` and the
    ``top_k`` eigenvectors ``v`` of ``S_out - S_in`` with the most negative eigenvalues ``lambda``.
    Records ``{layer, rank, lost_energy = -lambda, lost_fraction = -lambda / (v^T S_in v),
    share_of_layer_energy = v^T S_in v / tr(S_in), top_dim, top_dim_weight}`` (``top_dim``: the
    coordinate with the largest ``|v_j|`` and its ``v_j^2``, for reading only - the measurement
    itself is basis-free). Rows that are massive (norm >= ``massive_ratio`` x median) in either
    matrix are left out when ``exclude_massive`` (they would otherwise be the only thing seen).
    Only decreases are reported; a layer whose ``S_out - S_in`` has no negative eigenvalue has none.
    ``layers``: a subset of the captured layers (default: all).
    """
    cap = as_capture(states, "resid_pre")
    massive_ratio = check_positive(massive_ratio, "massive_ratio")
    check_int(top_k, "top_k", low=1)
    use = cap.layers if layers is None else list(layers)
    for L in use:                                  # a missing layer or kind is named before any work
        cap.get("resid_pre", L), cap.get("resid_post", L)
    out = []
    for L in use:
        x_in = cap.get("resid_pre", L).double()
        x_out = cap.get("resid_post", L).double()
        keep = torch.ones(len(x_in), dtype=torch.bool)
        if exclude_massive:
            for x in (x_in, x_out):
                keep &= ~massive_mask(x.norm(dim=1), massive_ratio)
        if int(keep.sum()) < 2:
            raise BandwidthInputError(f"states (layer {L}): fewer than 2 non-massive rows")
        x_in, x_out = x_in[keep], x_out[keep]
        s_in = x_in.T @ x_in / len(x_in)
        s_out = x_out.T @ x_out / len(x_out)
        lam, vec = torch.linalg.eigh(s_out - s_in)   # ascending: most negative first
        for r in range(min(top_k, len(lam))):
            if lam[r] >= 0:
                break
            v = vec[:, r]
            e_in = float(v @ s_in @ v)
            j = int(v.abs().argmax())
            out.append({"layer": L, "rank": r + 1, "lost_energy": float(-lam[r]),
                        "lost_fraction": float(-lam[r]) / e_in if e_in > 0 else float("nan"),
                        "share_of_layer_energy": e_in / float(s_in.trace()),
                        "top_dim": j, "top_dim_weight": float(v[j] ** 2)})
    return out


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------
def rank_candidates(heads: list[dict], neuron_cos: torch.Tensor | None = None, layers=None,
                    erasure: ErasureReport | None = None, top_per_kind: int = 5) -> list[dict]:
    """Merge the evidence into one ranked list ``{rank, component, kind, layer, index, score, evidence}``.

    Scores are in [0, 1] ("fraction of an ideal eraser", module docstring): ``kind="head"`` from the
    OV eigenvalues times current-token attention, ``"neuron"`` from the weight cosine,
    ``"activation"`` from the measured write-vs-read projection of each head, attention layer and MLP.
    ``neuron_cos`` is ``[len(layers), d_mlp]`` for ``layers``. The best ``top_per_kind`` of each kind
    are kept. Evidence holds the other measurements of the same component when available.
    """
    check_int(top_per_kind, "top_per_kind", low=1)
    er_head = {} if erasure is None else {(L, h): float(erasure.heads[i, h]) for i, L in enumerate(erasure.layers)
                                          for h in range(erasure.heads.shape[1])}
    cands = {"head": [], "neuron": [], "activation": []}
    for r in heads:
        eigs = torch.complex(torch.tensor(r["eig_real"]), torch.tensor(r["eig_imag"]))
        sign = float(eigen_sign(eigs))
        cta = r["current_token_attention"]
        score = max(0.0, -sign) * (cta if cta is not None else 1.0)
        ev = {"neg_share": r["neg_share"], "eigen_sign": sign, "current_token_attention": cta,
              "mean_abs_eigenvalue": float(eigs.abs().mean())}
        if (r["layer"], r["head"]) in er_head:
            ev["activation_projection"] = er_head[(r["layer"], r["head"])]
        cands["head"].append((score, f"L{r['layer']}.H{r['head']}", r["layer"], r["head"], ev))
    if neuron_cos is not None:
        if layers is None or len(layers) != neuron_cos.shape[0]:
            raise BandwidthInputError("layers: give the layers that neuron_cos rows belong to")
        er_layer = {L: i for i, L in enumerate(erasure.layers)} if erasure is not None else {}
        flat = neuron_cos.reshape(-1)
        for j in torch.argsort(flat)[:top_per_kind].tolist():
            i, n = divmod(j, neuron_cos.shape[1])
            L = layers[i]
            ev = {"cos_in_out": float(flat[j])}
            if L in er_layer:
                ev["activation_projection"] = float(erasure.neurons[er_layer[L], n])
            cands["neuron"].append((max(0.0, -float(flat[j])), f"L{L}.N{n}", L, n, ev))
    if erasure is not None:
        for rec in erasure.records():
            ev = {"projection": rec["projection"], "reads": "resid_mid" if rec["component"] == "mlp" else "resid_pre"}
            if rec["projection_massive"] is not None:
                ev["projection_on_massive_rows"] = rec["projection_massive"]
            cands["activation"].append((min(1.0, max(0.0, -rec["projection"])), rec["label"], rec["layer"],
                                        rec["index"], ev))
    merged = []
    for kind, lst in cands.items():
        lst.sort(key=lambda c: -c[0])
        merged += [(s, comp, kind, L, idx, ev) for s, comp, L, idx, ev in lst[:top_per_kind]]
    merged.sort(key=lambda c: -c[0])
    return [{"rank": i + 1, "component": comp, "kind": kind, "layer": L, "index": idx, "score": float(s),
             "evidence": ev} for i, (s, comp, kind, L, idx, ev) in enumerate(merged)]


@dataclass
class MemoryReport:
    """Everything :func:`memory_management` measured."""
    layers: list[int]
    heads: list[dict]
    neuron_cos: torch.Tensor
    erasure: ErasureReport | None
    energy_loss: list[dict]
    ranking: list[dict]
    notes: list[str] = field(default_factory=list)

    def head_records(self) -> list[dict]:
        return self.heads

    def neuron_records(self, per_layer: int = 5) -> list[dict]:
        """The ``per_layer`` most negative ``cos(in, out)`` neurons of each layer."""
        return [{"layer": L, "neuron": n, "component": f"L{L}.N{n}", "cos_in_out": float(self.neuron_cos[i, n])}
                for i, L in enumerate(self.layers) for n in torch.argsort(self.neuron_cos[i])[:per_layer].tolist()]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "neurons": self.neuron_records(),
                "neuron_cos_min_per_layer": self.neuron_cos.min(dim=1).values.tolist(),
                "erasure": None if self.erasure is None else self.erasure.to_dict(),
                "energy_loss": self.energy_loss, "ranking": self.ranking, "notes": self.notes}


def memory_management(run, top_per_kind: int = 5) -> MemoryReport:
    """All memory-management evidence for ``run.layers`` and the ranked candidate list.

    ``run``: a :class:`~residual_bandwidth.run.ResidualRun` (``run.memory()`` keeps the result).
    Weights are always analysed (``run.weights``). When the run has prompts, its one forward pass
    adds the activation evidence: current-token attention and write-vs-read projections
    (``run.erasure``) and, when it stored resid_pre and resid_post, the energy-loss directions.
    """
    check_run(run)
    layers, weights, notes, cta, erasure, loss = run.layers, run.weights, [], None, None, []
    if run.prompts is None:
        notes.append("no prompts: head scores use the OV eigenvalues only")
    else:
        erasure, cta = run.erasure, run.erasure.current_attention
        if cta is None:
            raise BandwidthInputError("prompts: every prompt is a single token; current-token attention "
                                      "needs at least two positions")
        if {"resid_pre", "resid_post"} <= set(run.capture.kinds):
            loss = energy_loss_directions(run.capture, layers=layers, massive_ratio=run.massive_ratio)
    heads = head_records(run.model, layers=layers, current_attention=cta, weights=weights)
    ncos = neuron_cosines(run.model, layers, weights=weights)
    return MemoryReport(layers=layers, heads=heads, neuron_cos=ncos, erasure=erasure, energy_loss=loss,
                        ranking=rank_candidates(heads, ncos, layers, erasure, top_per_kind), notes=notes)


# ---------------------------------------------------------------------------------------------
# One ranking from both kinds of evidence
# ---------------------------------------------------------------------------------------------
def combined_ranking(report: MemoryReport, top: int = 10) -> list[dict]:
    """Heads and neurons ranked by weight evidence *and* activation evidence together.

    :func:`rank_candidates` scores each kind of evidence on its own, so a neuron with a strongly
    negative weight cosine ranks high even if, on real text, its write removes nothing. Here a
    component must show both:

    * **weights** ``w`` in [0, 1]: it *can* erase. Heads ``max(0, -eigen_sign(W_OV))``; neurons
      ``max(0, -cos(W_in[:, n], W_out[n]))``;
    * **activations** ``a`` in [0, 1]: it *does* erase on this text. ``clip(-projection, 0, 1)`` with
      ``projection = mean_t <w_t, r_t> / ||r_t||^2`` (the share of the residual it read that its write
      removes, per token). Current-token attention is not part of it and is kept as separate evidence:
      a head can write against the residual at its own position what it read at other positions.

    ``score = w * a``: 0 if either kind of evidence is absent, 1 for an ideal eraser (``W_OV = -c P``
    whose write deletes everything it read). Records ``{rank, component, kind, layer, index, score,
    evidence}`` (the same keys as :func:`rank_candidates`; ``evidence`` holds ``weight_score``,
    ``activation_score``, the raw measurements and, for heads, the current-token attention), sorted by
    score, the ``top`` best. Needs a report measured with prompts (activation evidence).
    """
    if report.erasure is None:
        raise BandwidthInputError("report: no activation evidence (run memory_management with prompts)")
    check_int(top, "top", low=1)
    er = report.erasure
    row = {L: i for i, L in enumerate(er.layers)}
    cands = []
    for r in report.heads:
        if r["layer"] not in row:
            continue
        eigs = torch.complex(torch.tensor(r["eig_real"]), torch.tensor(r["eig_imag"]))
        sign = float(eigen_sign(eigs))
        w = max(0.0, -sign)
        proj = float(er.heads[row[r["layer"]], r["head"]])
        a = min(1.0, max(0.0, -proj))
        cands.append((w * a, f"L{r['layer']}.H{r['head']}", "head", r["layer"], r["head"],
                      {"weight_score": w, "activation_score": a, "eigen_sign": sign, "neg_share": r["neg_share"],
                       "activation_projection": proj, "current_token_attention": r["current_token_attention"]}))
    for i, L in enumerate(report.layers):
        if L not in row:
            continue
        cos = report.neuron_cos[i].double()
        proj = er.neurons[row[L]].double()
        score = (-cos).clamp(min=0) * (-proj).clamp(0, 1)
        for n in torch.argsort(score, descending=True)[:top].tolist():
            w, a = max(0.0, -float(cos[n])), min(1.0, max(0.0, -float(proj[n])))
            cands.append((w * a, f"L{L}.N{n}", "neuron", L, n,
                          {"weight_score": w, "activation_score": a, "cos_in_out": float(cos[n]),
                           "activation_projection": float(proj[n])}))
    cands.sort(key=lambda c: -c[0])
    return [{"rank": i + 1, "component": comp, "kind": kind, "layer": L, "index": idx, "score": float(s),
             "evidence": ev} for i, (s, comp, kind, L, idx, ev) in enumerate(cands[:top])]
