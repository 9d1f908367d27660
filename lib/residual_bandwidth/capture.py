"""Capture the residual stream of a decoder model, TransformerLens style.

For block ``L`` of a pre-norm decoder (GPT-2, Llama and relatives)::

    resid_pre[L]  --+--> norm1 --> attention --> attn_out[L]
                    |                               |
                    +-------------- + <-------------+
                                    |
    resid_mid[L]  --+--> norm2 --> MLP --> mlp_out[L]
                    |                         |
                    +-------------- + <-------+
                                    |
    resid_post[L] = resid_pre[L+1]

so ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``. Each of the five
tensors is recorded by its own hook (``resid_mid`` is the input of the second norm), so those
identities are checks on the model, not definitions. Names follow TransformerLens:
``blocks.{L}.hook_resid_pre`` etc.

Prompts are run in right-padded batches; padded positions are dropped before anything is stored,
so padding never enters a statistic. Activations are stored flat: ``capture.get("resid_post", L)``
is an ``[N, d_model]`` matrix over all real tokens of all prompts, and ``capture.prompt_index`` /
``capture.position`` / ``capture.tokens`` say where each row came from.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .validation import (BandwidthInputError, all_finite, as_matrix, as_matrix_list, check_int, check_prompts,
                         check_same_width)

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook name, e.g. ``hook_name("resid_pre", 3) == "blocks.3.hook_resid_pre"``."""
    if kind not in KINDS:
        raise BandwidthInputError(f"kind: expected one of {KINDS}, got {kind!r}")
    return f"blocks.{layer}.hook_{kind}"


# --------------------------------------------------------------------------------------------
# Architecture adapters: where the blocks, attention, MLP and the mid-block norm live.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """Where to find the residual-stream pieces of one model family (a small adapter)."""
    family: str
    blocks: Callable[[torch.nn.Module], Sequence[torch.nn.Module]]
    attn: Callable[[torch.nn.Module], torch.nn.Module]
    mlp: Callable[[torch.nn.Module], torch.nn.Module]
    norm1: Callable[[torch.nn.Module], torch.nn.Module]  # reads resid_pre
    norm2: Callable[[torch.nn.Module], torch.nn.Module]  # reads resid_mid
    final_norm: Callable[[torch.nn.Module], torch.nn.Module]


def _adapter(family: str, **paths: str) -> Architecture:
    """An :class:`Architecture` from dotted attribute paths (``blocks`` from the model, the others
    from a block, ``final_norm`` from the model)."""
    return Architecture(family, **{part: operator.attrgetter(path) for part, path in paths.items()})


LLAMA = _adapter("llama", blocks="model.layers", attn="self_attn", mlp="mlp", norm1="input_layernorm",
                 norm2="post_attention_layernorm", final_norm="model.norm")
GPT2 = _adapter("gpt2", blocks="transformer.h", attn="attn", mlp="mlp", norm1="ln_1", norm2="ln_2",
                final_norm="transformer.ln_f")
# model_type -> adapter. Only sequential pre-norm decoders whose blocks are exactly
# x + attn(norm1(x)) then x + mlp(norm2(x)); parallel-residual (GPT-NeoX, GPT-J), post-norm
# (BERT) and sandwich-norm (Gemma 2/3) models do not have this residual stream.
ARCHITECTURES: dict[str, Architecture] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
                                           "gpt2": GPT2}


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The adapter for ``model``, or a clear error listing what is supported."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in ARCHITECTURES:
        raise BandwidthInputError(
            f"model type {mtype!r} is not supported for residual capture. Supported: "
            f"{sorted(ARCHITECTURES)} (sequential pre-norm decoders). Encoders such as BERT "
            "renormalise the stream after every sublayer, and parallel-residual models have no "
            "resid_mid; capture such models yourself and pass a list of [positions, d_model] "
            "tensors or a hook-name mapping instead.")
    return ARCHITECTURES[mtype]


def model_dims(model: torch.nn.Module) -> dict:
    """d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp and vocab size from the config."""
    c = model.config
    d_model = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    n_heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    d_mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d_model
    return {"model_type": c.model_type, "d_model": int(d_model),
            "n_layers": int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")),
            "n_heads": int(n_heads), "n_kv_heads": int(getattr(c, "num_key_value_heads", None) or n_heads),
            "d_head": int(getattr(c, "head_dim", None) or d_model // n_heads), "d_mlp": int(d_mlp),
            "vocab_size": int(c.vocab_size)}


def check_layers(model, layers, name: str = "layers") -> list[int]:
    """``None`` -> every block; else a list of valid block indices (errors name the bad one)."""
    n = len(architecture_of(model).blocks(model))
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    for L in layers:
        if isinstance(L, bool) or not isinstance(L, int):
            raise BandwidthInputError(f"{name}: expected block indices (int), got {L!r}")
        if not -n <= L < n:
            raise BandwidthInputError(f"{name}: layer {L} is out of range for a {n}-layer model")
        out.append(L % n)
    if not out:
        raise BandwidthInputError(f"{name}: empty list of layers")
    return sorted(set(out))


# --------------------------------------------------------------------------------------------
# The captured activations
# --------------------------------------------------------------------------------------------
@dataclass
class ResidualCapture:
    """Flat residual activations: ``acts[hook_name(kind, L)]`` is ``[N, d_model]`` over real tokens."""
    acts: dict[str, torch.Tensor]
    prompt_index: torch.Tensor
    position: torch.Tensor
    tokens: list[str]
    prompts: list[str] = field(default_factory=list)
    model_name: str | None = None
    #: True when every tensor was validated (finite, float, 2-D) on the way in, so the analyses
    #: downstream trust it instead of checking each layer again
    checked: bool = False

    def __post_init__(self):
        if not self.acts:
            raise BandwidthInputError("acts: no activations captured")
        bad = [k for k in self.acts if not _HOOK_RE.match(k)]
        if bad:
            raise BandwidthInputError(f"acts: keys {bad[:3]} are not blocks.L.hook_<kind> names")
        self.layers = sorted({int(_HOOK_RE.match(k).group(1)) for k in self.acts})
        shapes = {tuple(v.shape) for v in self.acts.values()}
        if len(shapes) != 1:
            raise BandwidthInputError(f"acts: all tensors must share one [N, d_model] shape, got {shapes}")
        n, self.d_model = next(iter(shapes))
        if not (len(self.prompt_index) == len(self.position) == len(self.tokens) == n):
            raise BandwidthInputError("prompt_index, position and tokens must have one entry per row")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_rows(self) -> int:
        return len(self.tokens)

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if any(n.endswith("hook_" + k) for n in self.acts)]

    def get(self, kind: str, layer: int) -> torch.Tensor:
        """``[N, d_model]`` activations of ``kind`` at block ``layer``."""
        key = hook_name(kind, layer)
        if key not in self.acts:
            raise BandwidthInputError(f"{key} was not captured (have kinds {self.kinds}, layers "
                                      f"{self.layers[0]}..{self.layers[-1]})")
        return self.acts[key]

    def layer_stack(self, kind: str = "resid_post", rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One ``[N, d_model]`` matrix per captured layer, optionally only the boolean-``rows``."""
        stack = [self.get(kind, layer) for layer in self.layers]
        return [s[rows] for s in stack] if rows is not None else stack

    def of_prompts(self, indices: Sequence[int]) -> "ResidualCapture":
        """The rows of the prompts ``indices``, in that order, as a capture of those prompts alone
        (numbered 0, 1, ... in that order)."""
        parts = [torch.nonzero(self.prompt_index == check_int(i, "prompt index", low=0)).flatten() for i in indices]
        if not parts or any(p.numel() == 0 for p in parts):
            raise BandwidthInputError(f"prompts: {list(indices)!r} are not all indices of captured prompts")
        rows = torch.cat(parts)
        return ResidualCapture({k: v[rows] for k, v in self.acts.items()},
                               torch.cat([torch.full((p.numel(),), j) for j, p in enumerate(parts)]),
                               self.position[rows], [self.tokens[r] for r in rows.tolist()],
                               [self.prompts[i] for i in indices] if self.prompts else [], self.model_name, self.checked)

    def row_label(self, row: int) -> str:
        """Human-readable origin of a row: ``prompt 0, pos 3 ' France'``."""
        return f"prompt {int(self.prompt_index[row])}, pos {int(self.position[row])} {self.tokens[row]!r}"

    # ---- other ways in -----------------------------------------------------------------------
    @classmethod
    def from_hook_dict(cls, cache: Mapping[str, torch.Tensor], tokens: Sequence[str] | None = None
                       ) -> "ResidualCapture":
        """Build from a TransformerLens-style mapping ``{"blocks.L.hook_resid_pre": tensor, ...}``.

        Values are ``[pos, d_model]`` or ``[batch, pos, d_model]`` (all positions are taken as real
        tokens; remove padding first). Keys that are not residual hooks (attention patterns, ...)
        are ignored; at least one must be.
        """
        if not isinstance(cache, Mapping):
            raise BandwidthInputError(f"cache: expected a mapping of hook name -> tensor, got {type(cache).__name__}")
        acts, batch_shape = {}, None
        for key, value in cache.items():
            if not _HOOK_RE.match(str(key)):
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value) if hasattr(value, "__array__") else value
            if isinstance(value, torch.Tensor) and value.ndim == 3:
                batch_shape = batch_shape or tuple(value.shape[:2])
                if tuple(value.shape[:2]) != batch_shape:
                    raise BandwidthInputError(f"{key}: batch/pos shape {tuple(value.shape[:2])} differs from {batch_shape}")
                value = value.reshape(-1, value.shape[-1])
            layer = int(_HOOK_RE.match(key).group(1))
            acts[key] = as_matrix(value, name=key, layer=layer, min_rows=1).detach().float().cpu()
        if not acts:
            raise BandwidthInputError("cache: no key of the form 'blocks.L.hook_resid_pre|resid_mid|"
                                      "resid_post|attn_out|mlp_out' found")
        n = next(iter(acts.values())).shape[0]
        for key, v in acts.items():
            if v.shape[0] != n:
                raise BandwidthInputError(f"{key}: {v.shape[0]} positions but others have {n}")
        check_same_width(list(acts.values()), name="cache")
        if batch_shape:
            b, t = batch_shape
            prompt_index = torch.arange(b).repeat_interleave(t)
            position = torch.arange(t).repeat(b)
        else:
            prompt_index, position = torch.zeros(n, dtype=torch.long), torch.arange(n)
        toks = list(tokens) if tokens is not None else [f"<{int(p)}>" for p in position]
        if len(toks) != n:
            raise BandwidthInputError(f"tokens: {len(toks)} given for {n} positions")
        return cls(acts=acts, prompt_index=prompt_index, position=position, tokens=toks, checked=True)

    @classmethod
    def from_list(cls, states: Sequence[torch.Tensor], kind: str = "resid_post",
                  tokens: Sequence[str] | None = None) -> "ResidualCapture":
        """Build from a plain list of ``[pos, d_model]`` tensors, one per layer (the seed's input)."""
        mats = as_matrix_list(states, min_rows=1)
        n = mats[0].shape[0]
        for i, m in enumerate(mats):
            if m.shape[0] != n:
                raise BandwidthInputError(f"residual_states[{i}] (layer {i}): {m.shape[0]} positions "
                                          f"but layer 0 has {n}; layers must cover the same tokens")
        return cls.from_hook_dict({hook_name(kind, i): m for i, m in enumerate(mats)}, tokens=tokens)


def as_capture(states, kind: str = "resid_post") -> ResidualCapture:
    """Accept a :class:`ResidualCapture`, a hook-name mapping or a list of per-layer tensors."""
    if isinstance(states, ResidualCapture):
        return states
    if isinstance(states, Mapping):
        return ResidualCapture.from_hook_dict(states)
    return ResidualCapture.from_list(states, kind=kind)


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------
def hook_point(arch: Architecture, block: torch.nn.Module, kind: str) -> tuple[torch.nn.Module, str]:
    """Where ``kind`` is read in one block: ``(module, "input" | "output")`` (the module docstring's
    diagram). The one hook table of the package: capture, the monitor and the memory measurements
    all find the residual stream here."""
    hook_name(kind, 0)  # validates the kind
    return {"resid_pre": (block, "input"), "resid_mid": (arch.norm2(block), "input"),
            "resid_post": (block, "output"), "attn_out": (arch.attn(block), "output"),
            "mlp_out": (arch.mlp(block), "output")}[kind]


def add_hook(module: torch.nn.Module, where: str, fn: Callable[[torch.Tensor], None]):
    """Register ``fn(tensor)`` on ``module``'s first input (``where="input"``, positional or
    ``hidden_states=`` keyword) or first output (``"output"``). Returns the handle; ``fn``'s return
    value is ignored, so the model's computation is never changed."""
    if where == "output":
        return module.register_forward_hook(lambda m, a, o: fn(o[0] if isinstance(o, (tuple, list)) else o) and None)
    if where != "input":
        raise BandwidthInputError(f"where: expected 'input' or 'output', got {where!r}")

    def pre(m, args, kwargs):
        fn(args[0] if args else kwargs.get("hidden_states"))
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def check_tokenizer(tokenizer) -> None:
    """A callable Hugging Face tokenizer (``None`` and other objects are named as the problem)."""
    if tokenizer is None or not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise BandwidthInputError(f"tokenizer: expected a Hugging Face tokenizer (the model's own), got "
                                  f"{type(tokenizer).__name__}")


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (``max_position_embeddings`` or
    GPT-2's ``n_positions``), or None when the config has no such limit."""
    c = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_max_length(model: torch.nn.Module, max_length) -> tuple[int | None, str | None]:
    """``(length, note)``: the token limit to truncate prompts to, clamped to :func:`max_positions`.

    ``max_length`` must be a positive int or None (no limit of our own). When it exceeds the model's
    maximum positions (or is None and the model has one) the model's limit is used, and ``note``
    names it so the caller can say so when a prompt was actually cut there.
    """
    if max_length is not None:
        check_int(max_length, "max_length", low=1)  # tokens per prompt
    limit = max_positions(model)
    if limit is not None and (max_length is None or max_length > limit):
        return limit, (f"prompts longer than the model's maximum of {limit} positions (config "
                       f"max_position_embeddings / n_positions) were truncated to {limit} tokens"
                       + (f" (max_length={max_length} asked for more)" if max_length else ""))
    return max_length, None


@contextlib.contextmanager
def right_padding(tokenizer):
    """Pad on the right inside the block (so real tokens sit at positions ``0..len-1``); the
    tokenizer's own padding side is restored on exit, also on errors. Names a missing tokenizer."""
    check_tokenizer(tokenizer)
    before = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = before


def forward_batches(model: torch.nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 8,
                    max_length: int | None = 512, progress: bool = False, desc: str = "forward"):
    """Tokenize ``prompts`` in right-padded batches for ``model``: yields ``(start, enc, mask)`` with
    ``enc`` on the model's device and ``mask`` the boolean attention mask (real tokens). The caller
    runs the model (with its own hooks). Prompts are truncated to ``max_length`` tokens, and never
    beyond the model's maximum positions (:func:`check_max_length`; a ``UserWarning`` names the limit
    when a prompt was cut there). ``max_length=None``: only the model's limit."""
    check_tokenizer(tokenizer)
    max_length, note = check_max_length(model, max_length)
    device = next(model.parameters()).device
    from tqdm.auto import tqdm
    starts = range(0, len(prompts), batch_size)
    with right_padding(tokenizer):
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            **({"truncation": True, "max_length": max_length} if max_length else {}))
            if note and enc["input_ids"].shape[1] >= max_length:
                warnings.warn(note, UserWarning, stacklevel=3)
                note = None  # once per call
            enc = {k: v.to(device) for k, v in enc.items()}
            yield start, enc, enc["attention_mask"].bool()


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """Temporarily switch to the "eager" attention implementation, which returns attention
    probabilities (SDPA/flash kernels return ``None`` for them). Restored on exit, also on errors."""
    prev = getattr(model.config, "_attn_implementation", None)

    def use(impl):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        else:  # older transformers
            model.config._attn_implementation = impl
    try:
        if prev != "eager":
            use("eager")
        yield model
    finally:
        if prev is not None and prev != "eager":
            use(prev)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily use ``n`` intra-op threads, restored on exit, also on errors; ``None`` touches
    nothing (no set, no restore). Small matrices (the monitor's, the toy model's) run fastest on one."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# One forward pass, many readers
# --------------------------------------------------------------------------------------------
class Listener:
    """Something that reads activations during a shared forward pass (:func:`run_listeners`).

    :meth:`attach` registers the hooks it needs (they keep what they want of the current batch) and
    returns their handles; :meth:`batch` runs after each batch's forward pass and turns what the
    hooks kept into stored rows or running statistics. ``eager = True`` asks for attention
    probabilities (:func:`eager_attention`); ``needs_head = True`` asks for the language-model head
    (the pass otherwise stops at the final norm: residual statistics never read the logits). The
    report's capture (:class:`ResidualRecorder`), the streamed per-layer statistics and the memory
    module's write-vs-read projections are listeners.
    """
    eager = False
    needs_head = False

    def attach(self) -> list:
        raise NotImplementedError

    def batch(self, start: int, enc: dict, mask: torch.Tensor) -> None:
        raise NotImplementedError


@torch.no_grad()
def run_listeners(model: torch.nn.Module, tokenizer, prompts: Sequence[str], listeners: Sequence[Listener],
                  batch_size: int = 8, max_length: int | None = 512, progress: bool = False,
                  desc: str = "forward") -> None:
    """Run ``prompts`` through ``model`` **once**, in right-padded batches (:func:`forward_batches`),
    and feed every listener: analyses of the same prompts share one forward pass.

    Unless a listener ``needs_head``, the pass runs the Hugging Face ``model.base_model`` (embeddings,
    blocks, final norm) and skips the language-model head: on SmolLM2-135M the head is about a fifth
    of the arithmetic (576 x 49,152 per token) and its logits the largest tensor of the pass.

    With an ``eager`` listener the whole pass uses eager attention; on the embedded model its
    residuals then differ from the default SDPA kernel's by at most 2.5e-6 of a row's norm and the
    bandwidth report is unchanged (measured; a test compares them). Hooks are removed afterwards,
    also when the forward pass raises.
    """
    prompts = check_prompts(prompts)
    check_int(batch_size, "batch_size", low=1)
    if not listeners:
        raise BandwidthInputError("listeners: nothing to run the model for")
    handles = []
    try:
        for listener in listeners:
            handles += listener.attach()
        eager = any(listener.eager for listener in listeners)
        head = any(listener.needs_head for listener in listeners)
        run = model if head else getattr(model, "base_model", model)
        with eager_attention(model) if eager else contextlib.nullcontext():
            for start, enc, mask in forward_batches(model, tokenizer, prompts, batch_size, max_length,
                                                    progress=progress, desc=desc):
                run(**enc, use_cache=False)
                for listener in listeners:
                    listener.batch(start, enc, mask)
    finally:
        for h in handles:
            h.remove()


class ResidualRecorder(Listener):
    """Stores the real-token rows of ``kinds`` at ``layers`` (float32, CPU): the listener behind
    :func:`capture_residuals`. :meth:`capture` returns them as a validated :class:`ResidualCapture`."""

    def __init__(self, model: torch.nn.Module, tokenizer, kinds: Sequence[str] = KINDS,
                 layers: Sequence[int] | None = None):
        arch = architecture_of(model)
        check_tokenizer(tokenizer)
        blocks = arch.blocks(model)
        layers = check_layers(model, layers)
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        self.model, self.tokenizer = model, tokenizer
        self.points = {hook_name(k, L): hook_point(arch, blocks[L], k) for L in layers for k in kinds}
        self.store: dict[str, torch.Tensor] = {}
        self.chunks: dict[str, list[torch.Tensor]] = {key: [] for key in self.points}
        self.prompt_index, self.position, self.tokens = [], [], []

    def attach(self) -> list:
        return [add_hook(module, where, functools.partial(self.store.__setitem__, key))
                for key, (module, where) in self.points.items()]

    def batch(self, start, enc, mask):
        for key in self.chunks:
            self.chunks[key].append(self.store[key][mask].detach().float().cpu())
        self.store.clear()
        for j, (ids, m) in enumerate(zip(enc["input_ids"], mask)):
            real = ids[m].tolist()
            self.prompt_index += [start + j] * len(real)
            self.position += list(range(len(real)))
            self.tokens += [self.tokenizer.decode([t]) for t in real]

    def capture(self, prompts: Sequence[str]) -> ResidualCapture:
        acts = {key: torch.cat(v) for key, v in self.chunks.items()}
        for key, x in acts.items():   # validated once here; the analyses trust the capture
            if not all_finite(x):
                raise BandwidthInputError(f"{key}: the model produced NaN or Inf activations")
        return ResidualCapture(acts=acts, prompt_index=torch.tensor(self.prompt_index),
                               position=torch.tensor(self.position), tokens=self.tokens, prompts=list(prompts),
                               model_name=getattr(self.model.config, "_name_or_path", None), checked=True)


def capture_residuals(model: torch.nn.Module, tokenizer, prompts: str | Sequence[str],
                      kinds: Sequence[str] = KINDS, layers: Sequence[int] | None = None,
                      batch_size: int = 8, max_length: int = 512, progress: bool = True
                      ) -> ResidualCapture:
    """Run ``prompts`` through ``model`` and record the residual stream with forward hooks.

    ``kinds`` picks from ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``;
    ``layers`` picks blocks (default all). Prompts longer than ``max_length`` tokens are truncated,
    and never run beyond the model's maximum positions (see :func:`forward_batches`).
    Hooks are always removed, also when the forward pass raises. To share the pass with other
    analyses, put a :class:`ResidualRecorder` among their listeners (:func:`run_listeners`).
    """
    prompts = check_prompts(prompts)
    check_max_length(model, max_length)
    recorder = ResidualRecorder(model, tokenizer, kinds, layers)
    run_listeners(model, tokenizer, prompts, [recorder], batch_size, max_length, progress=progress,
                  desc="capturing residual stream")
    return recorder.capture(prompts)
