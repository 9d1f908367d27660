"""Per-prompt reference measurements for the tests (one prompt at a time, no padding, no batching).

The library measures attention inside its one batched pass (``ErasureMeter(attention=True)``, read by
``ResidualRun``); these slower, plainer versions run each prompt alone and are what the tests compare it with.
"""
from __future__ import annotations

from typing import Sequence

import torch

from residual_bandwidth.capture import architecture_of, check_layers, eager_attention
from residual_bandwidth.memory import _probabilities
from residual_bandwidth.validation import BandwidthInputError, check_prompts


@torch.no_grad()
def attention_patterns(model: torch.nn.Module, tokenizer, prompt: str, layers=None) -> dict[int, torch.Tensor]:
    """Attention probabilities of one prompt: ``{layer: [n_heads, T, T]}`` (rows = queries).

    Runs the model once with eager attention and a forward hook on each attention module (whose
    second output is the pattern). Hooks are removed and the attention implementation restored
    afterwards, also when the forward pass raises.
    """
    (prompt,) = check_prompts([prompt])
    arch = architecture_of(model)
    layers = check_layers(model, layers)
    blocks = arch.blocks(model)
    store, handles = {}, []
    for L in layers:
        def hook(mod, args, out, L=L):
            store[L] = _probabilities(out)[0].detach().float().cpu()
        handles.append(arch.attn(blocks[L]).register_forward_hook(hook))
    enc = tokenizer(prompt, return_tensors="pt")
    try:
        with eager_attention(model):
            model(**{k: v.to(next(model.parameters()).device) for k, v in enc.items()}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return store


def current_token_attention(model: torch.nn.Module, tokenizer, prompts: Sequence[str], layers=None,
                            progress: bool = False) -> torch.Tensor:
    """Mean attention of every head to the current token: ``[len(layers), n_heads]``.

    ``mean over prompts and query positions t >= 1 of A[h, t, t]`` (position 0 can only attend to
    itself). Prompts are run one at a time, so there is no padding. Prompts of one token are skipped.
    """
    prompts = check_prompts(prompts)
    layers = check_layers(model, layers)
    from tqdm.auto import tqdm
    total, count = None, 0
    for p in tqdm(prompts, desc="attention patterns", disable=not progress):
        pats = attention_patterns(model, tokenizer, p, layers)
        diag = torch.stack([pats[L].diagonal(dim1=1, dim2=2)[:, 1:] for L in layers])  # [nL, H, T-1]
        if diag.shape[-1] == 0:
            continue
        total = diag.sum(-1) if total is None else total + diag.sum(-1)
        count += diag.shape[-1]
    if count == 0:
        raise BandwidthInputError("prompts: every prompt is a single token; current-token attention "
                                  "needs at least two positions")
    return total / count
