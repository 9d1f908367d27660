"""Per-component weights in the residual basis (the Framework paper's conventions).

Elhage et al. (2021) and TransformerLens write a transformer with *row vectors*: a residual vector
``x`` is ``[d_model]``, a component reads ``x W`` and writes ``y W_O``. In that convention, for one
attention head ``h`` of block ``L``::

    q = x_hat W_Q[h] + b_Q[h]          W_Q[h]: [d_model, d_head]
    k = x_hat W_K[h] + b_K[h]          W_K[h]: [d_model, d_head]
    v = x_hat W_V[h] + b_V[h]          W_V[h]: [d_model, d_head]
    write_t = sum_s A[t, s] v_s W_O[h] W_O[h]: [d_head, d_model]
    A = softmax(scale * q k^T + causal mask)

so the head's whole linear effect on what it moves is ``W_OV = W_V W_O`` (``[d_model, d_model]``,
rank <= d_head: ``x_hat W_OV`` is what the head writes when it attends to ``x``), and its attention
score is the bilinear form ``W_QK = W_Q W_K^T`` (``q_t k_s^T = x_hat_t W_QK x_hat_s^T`` without biases).

What ``x_hat`` is: the pre-norm's output *without its gain*. The gain (and for LayerNorm the
centring) is folded into the reading weights, so every reading matrix here acts on the raw residual
up to one scalar per token:

* llama family (RMSNorm ``g * x / rms(x)``): ``x_hat = x / sqrt(mean(x^2) + eps)`` and
  ``W_Q = diag(g) W_Q^model`` (same for W_K, W_V and the MLP's gate / up projections).
* gpt2 (LayerNorm ``w * (x - mean x) / std(x) + b``): ``x_hat = x / sqrt(var(x) + eps)`` (no mean
  removed) and ``W_Q = C diag(w) W_Q^model`` with the centring matrix ``C = I - 1 1^T / d``, which is
  exactly the mean subtraction moved into the weights (``x C = x - mean(x)``). The LayerNorm bias
  ``b`` is a constant input, so it is folded into the reading *biases*: ``b_Q = b W_Q^model + b_Q^model``.
  After folding, every reading matrix ignores the all-ones direction (as LayerNorm does).

RoPE (llama): queries and keys are rotated by position before ``q k^T``, so ``W_QK`` here is the
bilinear form at relative distance 0 (the "content" part). The OV circuit is not rotated, so
``W_OV`` is exact. Qwen3's per-head q/k norms are likewise not folded (noted in ``notes``).

Grouped-query attention (GQA): ``n_kv_heads < n_heads`` and query head ``h`` uses key/value head
``h // (n_heads // n_kv_heads)`` (transformers' ``repeat_kv``). We expand: ``W_K[h]`` and ``W_V[h]``
are that shared head's weights, and ``kv_head[h]`` says which one.

MLP neuron ``n``: reads ``x_hat W_in[:, n]`` and writes ``act_n * W_out[n]``.
* gpt2: ``act_n = gelu(x_hat W_in[:, n] + b_in[n])``. ``W_in`` is ``c_fc``'s weight (Conv1D, stored
  ``[in, out]`` already) with the LayerNorm folded; ``W_out = c_proj.weight`` (``[d_mlp, d_model]``).
* llama SwiGLU: ``act_n = silu(x_hat W_gate[:, n]) * (x_hat W_in[:, n])``. We call the *up*
  projection the neuron's input direction ``W_in``: ``silu`` is >= -0.28 and mostly positive where
  the neuron is active, so the gate decides *when* the neuron fires while the up projection decides
  the *sign and size* of what it writes, i.e. the write is ``~ (x_hat . W_in[:, n]) W_out[n]`` times a
  non-negative gate. A neuron with ``W_out[n] ~ -W_in[:, n]`` therefore removes the part of the
  residual it read. ``W_gate`` is kept for reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .capture import architecture_of, check_layers, model_dims
from .validation import BandwidthInputError


@dataclass
class LayerWeights:
    """All reading/writing weights of one block in the residual basis (see module docstring).

    Shapes: ``W_Q, W_K, W_V: [n_heads, d_model, d_head]``, ``W_O: [n_heads, d_head, d_model]``,
    ``b_Q, b_K, b_V: [n_heads, d_head]``, ``b_O: [d_model]``, ``W_in, W_gate: [d_model, d_mlp]``,
    ``b_in, b_gate: [d_mlp]``, ``W_out: [d_mlp, d_model]``, ``b_out: [d_model]``. Biases are ``None``
    when the model has none (``W_gate``/``b_gate`` are ``None`` for gpt2).
    """
    layer: int
    family: str
    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor | None
    b_K: torch.Tensor | None
    b_V: torch.Tensor | None
    b_O: torch.Tensor | None
    kv_head: list[int]
    attn_scale: float
    W_in: torch.Tensor
    b_in: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor | None
    W_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    mlp_act: str = "gelu"
    notes: list[str] = field(default_factory=list)

    # sizes, read off the shapes above
    n_heads = property(lambda self: self.W_Q.shape[0])
    d_model = property(lambda self: self.W_Q.shape[1])
    d_head = property(lambda self: self.W_Q.shape[2])
    d_mlp = property(lambda self: self.W_in.shape[1])

    @property
    def W_OV(self) -> torch.Tensor:
        """``W_V @ W_O``: ``[n_heads, d_model, d_model]``; ``x_hat W_OV[h]`` is head h's write."""
        return self.W_V @ self.W_O

    @property
    def W_QK(self) -> torch.Tensor:
        """``W_Q @ W_K^T``: ``[n_heads, d_model, d_model]``; score ``x_hat_t W_QK x_hat_s^T``."""
        return self.W_Q @ self.W_K.transpose(1, 2)

    def to(self, dtype: torch.dtype) -> "LayerWeights":
        """A copy with every tensor cast to ``dtype`` (e.g. float64 for eigenvalues)."""
        return LayerWeights(**{f.name: (v.to(dtype) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                               for f in fields(self)})


# Where the projections live, per family (the block-level adapters are in capture.py).
def _linear_T(layer: torch.nn.Linear) -> torch.Tensor:
    """``nn.Linear`` stores ``[out, in]``; the row-vector convention wants ``[in, out]``."""
    return layer.weight.detach().T


def _bias(layer: torch.nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def _llama_layer(model, block, arch, layer: int) -> LayerWeights:
    d = model_dims(model)
    H, KV, dh = d["n_heads"], d["n_kv_heads"], d["d_head"]
    attn, mlp = arch.attn(block), arch.mlp(block)
    g1 = arch.norm1(block).weight.detach()
    g2 = arch.norm2(block).weight.detach()
    kv_head = [h // (H // KV) for h in range(H)]

    def heads(lin, n):  # [d, n*dh] -> [n, d, dh], gain folded
        return (g1[:, None] * _linear_T(lin)).reshape(-1, n, dh).permute(1, 0, 2).contiguous()

    idx = torch.tensor(kv_head)

    def bias(lin, n, rows=None):   # [n, dh]; rows: the query heads' key/value heads (GQA)
        b = None if lin.bias is None else lin.bias.detach().reshape(n, dh)
        return b if b is None or rows is None else b[rows]

    notes = []
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        notes.append("per-head q/k norms are not folded: W_QK is approximate for this model")
    return LayerWeights(
        layer=layer, family="llama", W_Q=heads(attn.q_proj, H), W_K=heads(attn.k_proj, KV)[idx],
        W_V=heads(attn.v_proj, KV)[idx], W_O=_linear_T(attn.o_proj).reshape(H, dh, -1).contiguous(),
        b_Q=bias(attn.q_proj, H), b_K=bias(attn.k_proj, KV, idx), b_V=bias(attn.v_proj, KV, idx),
        b_O=_bias(attn.o_proj), kv_head=kv_head, attn_scale=float(attn.scaling),
        W_in=g2[:, None] * _linear_T(mlp.up_proj), b_in=_bias(mlp.up_proj),
        W_gate=g2[:, None] * _linear_T(mlp.gate_proj), b_gate=_bias(mlp.gate_proj),
        W_out=_linear_T(mlp.down_proj), b_out=_bias(mlp.down_proj),
        mlp_act=str(model.config.hidden_act), notes=notes)


def _gpt2_layer(model, block, arch, layer: int) -> LayerWeights:
    dims = model_dims(model)
    H, dh, d = dims["n_heads"], dims["d_head"], dims["d_model"]
    attn, mlp = arch.attn(block), arch.mlp(block)
    ln1, ln2 = arch.norm1(block), arch.norm2(block)
    center = torch.eye(d, dtype=attn.c_attn.weight.dtype) - 1.0 / d

    def fold(ln, w):  # LayerNorm(x) @ w == x_hat @ (C diag(ln.weight) w) + ln.bias @ w
        return center @ (ln.weight.detach()[:, None] * w), ln.bias.detach() @ w

    w_qkv, b_qkv = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()  # Conv1D: [d, 3d]
    out = []
    for part in range(3):  # q, k, v
        wf, bf = fold(ln1, w_qkv[:, part * d:(part + 1) * d])
        out.append((wf.reshape(d, H, dh).permute(1, 0, 2).contiguous(),
                    (bf + b_qkv[part * d:(part + 1) * d]).reshape(H, dh)))
    (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = out
    W_in, b_in_ln = fold(ln2, mlp.c_fc.weight.detach())
    return LayerWeights(
        layer=layer, family="gpt2", W_Q=W_Q, W_K=W_K, W_V=W_V,
        W_O=attn.c_proj.weight.detach().reshape(H, dh, d).contiguous(), b_Q=b_Q, b_K=b_K, b_V=b_V,
        b_O=attn.c_proj.bias.detach(), kv_head=list(range(H)), attn_scale=float(attn.scaling),
        W_in=W_in, b_in=b_in_ln + mlp.c_fc.bias.detach(), W_out=mlp.c_proj.weight.detach(),
        b_out=mlp.c_proj.bias.detach(), mlp_act=str(model.config.activation_function))


_EXTRACT = {"llama": _llama_layer, "gpt2": _gpt2_layer}
# The linear maps whose *input* is the per-head result z (attention) and the neuron activations (MLP).
_OUT_PROJ = {"llama": ("o_proj", "down_proj"), "gpt2": ("c_proj", "c_proj")}


def check_layer_weights(lw, name: str = "lw") -> LayerWeights:
    """Raise unless ``lw`` is a :class:`LayerWeights` (e.g. from :func:`layer_weights`)."""
    if not isinstance(lw, LayerWeights):
        raise BandwidthInputError(f"{name}: expected LayerWeights (from layer_weights(model, layer)), "
                                  f"got {type(lw).__name__}")
    return lw


def layer_weights(model: torch.nn.Module, layer: int) -> LayerWeights:
    """Weights of block ``layer`` of ``model`` in the residual basis (module docstring has the rules).

    Raises :class:`BandwidthInputError` for an unsupported model family or a bad layer index.
    """
    arch = architecture_of(model)
    (layer,) = check_layers(model, [layer], name="layer")
    block = arch.blocks(model)[layer]
    with torch.no_grad():
        return _EXTRACT[arch.family](model, block, arch, layer)


def all_layer_weights(model: torch.nn.Module, layers=None) -> list[LayerWeights]:
    """:func:`layer_weights` for every block in ``layers`` (default: all)."""
    return [layer_weights(model, L) for L in check_layers(model, layers)]


def out_projections(model: torch.nn.Module, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(attention output projection, MLP output projection)`` of block ``layer``.

    Their inputs are the concatenated per-head results ``z`` (``[.., n_heads * d_head]``) and the
    neuron activations (``[.., d_mlp]``): a forward pre-hook on them sees each head's / neuron's
    contribution before it is mixed into the residual.
    """
    arch = architecture_of(model)
    block = arch.blocks(model)[layer]
    a, m = _OUT_PROJ[arch.family]
    return getattr(arch.attn(block), a), getattr(arch.mlp(block), m)


def norm_eps(model: torch.nn.Module, layer: int, sublayer: str = "attn") -> float:
    """epsilon of the pre-norm in front of ``sublayer`` ("attn" or "mlp") of block ``layer``."""
    arch = architecture_of(model)
    block = arch.blocks(model)[layer]
    norm = arch.norm1(block) if sublayer == "attn" else arch.norm2(block)
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))


def normalize_residual(model: torch.nn.Module, x: torch.Tensor, layer: int,
                       sublayer: str = "attn") -> torch.Tensor:
    """``x_hat``: the pre-norm of ``sublayer`` ("attn" reads resid_pre, "mlp" reads resid_mid) without
    its gain, i.e. the input that the folded reading weights of :class:`LayerWeights` expect.

    llama: ``x / sqrt(mean(x^2) + eps)``; gpt2: ``x / sqrt(var(x) + eps)`` (the centring is in the
    weights, so ``x_hat W_Q`` equals ``LayerNorm(x) W_Q^model`` up to the folded bias).
    """
    if sublayer not in ("attn", "mlp"):
        raise BandwidthInputError(f"sublayer: expected 'attn' or 'mlp', got {sublayer!r}")
    eps = norm_eps(model, layer, sublayer)
    xf = x.float()
    if architecture_of(model).family == "llama":
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)


def attention_write(lw: LayerWeights, x_hat: torch.Tensor, pattern: torch.Tensor,
                    per_head: bool = False) -> torch.Tensor:
    """What the attention layer writes, from the weights and an attention pattern.

    ``x_hat: [T, d_model]`` (from :func:`normalize_residual`), ``pattern: [n_heads, T, T]`` (rows =
    queries, sum to 1). Returns ``sum_h A_h (x_hat W_V[h] + b_V[h]) W_O[h] + b_O`` as ``[T, d_model]``,
    or the per-head terms ``[n_heads, T, d_model]`` (without ``b_O``) when ``per_head``.
    """
    check_layer_weights(lw)
    T = x_hat.shape[0] if isinstance(x_hat, torch.Tensor) and x_hat.ndim == 2 else None
    if T is None or x_hat.shape[1] != lw.d_model:
        raise BandwidthInputError(f"x_hat (layer {lw.layer}): expected [positions, {lw.d_model}], got "
                                  f"{tuple(getattr(x_hat, 'shape', ()))}")
    if not isinstance(pattern, torch.Tensor) or tuple(pattern.shape) != (lw.n_heads, T, T):
        raise BandwidthInputError(f"pattern (layer {lw.layer}): expected [{lw.n_heads}, {T}, {T}], got "
                                  f"{tuple(getattr(pattern, 'shape', ()))}")
    v = torch.einsum("td,hde->hte", x_hat.to(lw.W_V.dtype), lw.W_V)
    if lw.b_V is not None:
        v = v + lw.b_V[:, None, :]
    z = pattern.to(v.dtype) @ v                             # [H, T, d_head]
    heads = torch.einsum("hte,hed->htd", z, lw.W_O)
    if per_head:
        return heads
    out = heads.sum(0)
    return out + lw.b_O if lw.b_O is not None else out


def mlp_activations(lw: LayerWeights, x_hat: torch.Tensor) -> torch.Tensor:
    """Neuron activations ``[T, d_mlp]`` from the folded weights (gelu or SwiGLU, see module doc)."""
    check_layer_weights(lw)
    if not isinstance(x_hat, torch.Tensor) or x_hat.shape[-1] != lw.d_model:
        raise BandwidthInputError(f"x_hat (layer {lw.layer}): expected [..., {lw.d_model}], got "
                                  f"{tuple(getattr(x_hat, 'shape', ()))}")
    from transformers.activations import ACT2FN
    pre = _affine(x_hat, lw.W_in, lw.b_in)
    if lw.W_gate is None:
        return ACT2FN[lw.mlp_act](pre)
    return ACT2FN[lw.mlp_act](_affine(x_hat, lw.W_gate, lw.b_gate)) * pre


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w + b`` (``x`` cast to ``w``'s dtype; no bias when ``b`` is None)."""
    y = x.to(w.dtype) @ w
    return y if b is None else y + b


def mlp_write(lw: LayerWeights, x_hat: torch.Tensor) -> torch.Tensor:
    """What the MLP writes: ``act @ W_out + b_out`` as ``[T, d_model]``."""
    return _affine(mlp_activations(lw, x_hat), lw.W_out, lw.b_out)


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the low-rank product ``W = left @ right`` without forming it.

    ``left: [..., d, r]``, ``right: [..., r, d]`` (e.g. ``W_V`` and ``W_O``). With ``left = Q_l R_l``
    and ``right^T = Q_r R_r`` (QR), ``W = Q_l (R_l R_r^T) Q_r^T``; the SVD ``U_c S V_c^T`` of the small
    ``r x r`` core gives ``W = (Q_l U_c) S (Q_r V_c)^T``. Returns ``U [..., d, r]``, ``S [..., r]``,
    ``V [..., d, r]`` with ``W = U diag(S) V^T``. For a row-vector map ``x -> x W``, ``U`` spans the
    *read* subspace and ``V`` the *write* subspace.
    """
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.transpose(-1, -2))
    u_c, s, v_ch = torch.linalg.svd(r_l @ r_r.transpose(-1, -2))
    return q_l @ u_c, s, q_r @ v_ch.transpose(-1, -2)
