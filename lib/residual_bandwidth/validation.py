"""Strict input checks shared by every entry point.

Every check raises :class:`BandwidthInputError` (a ``ValueError``) whose message names the argument,
the layer (when there is one) and what is wrong, so a student or a grading batch sees the problem
instead of a silent wrong number.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

# The metrics read a matrix in row blocks and decompose only the smaller of its d x d covariance and
# n x n Gram matrix, so their memory is set by min(n, d), not by n * d: a million positions of a
# 4096-wide model (4.1e9 elements) is a legitimate input. MAX_ELEMENTS only rejects what no residual
# stream is (e.g. a flattened batch of logits over many prompts): 2**34 elements = 64 GiB in fp32.
MAX_ELEMENTS = 2**34
MAX_D_MODEL = 65_536


class BandwidthInputError(ValueError):
    """Raised when an input to the analyzer is malformed; the message says which one and why."""


def check_run(run, what: str = "a ResidualRun"):
    """``run`` must be a :class:`~residual_bandwidth.run.ResidualRun` (checked by the attributes the
    analyses read, so this module needs no import of the run); returns it."""
    if not all(hasattr(run, a) for a in ("model", "tokenizer", "prompts", "layers", "weights_of",
                                         "massive_ratio", "batch_size")):
        raise BandwidthInputError(f"run: expected {what} (residual_bandwidth.ResidualRun(model, tokenizer, "
                                  f"prompts)), got {type(run).__name__}")
    return run


def _where(name: str, layer: int | str | None) -> str:
    return f"{name} (layer {layer})" if layer is not None else name


def as_matrix(x, name: str = "residual_states", layer: int | str | None = None,
              min_rows: int = 2) -> torch.Tensor:
    """Validate one ``[positions, d_model]`` matrix and return it as a float tensor (same device).

    Accepts a ``torch.Tensor`` or a ``numpy.ndarray``. Rejects: other types, rank != 2, integer /
    boolean / complex dtypes, empty matrices, fewer than ``min_rows`` rows, NaN or Inf entries and
    absurd sizes. float16/bfloat16 are accepted (metrics upcast to float64 themselves).
    """
    where = _where(name, layer)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise BandwidthInputError(
                f"{where}: dtype {x.dtype} is not a floating type; residual activations are real "
                "floats (convert with .astype(np.float32) if the values really are activations)")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise BandwidthInputError(
            f"{where}: expected a torch.Tensor or numpy.ndarray of shape [positions, d_model], "
            f"got {type(x).__name__}")
    check_dense(x, where)
    if x.is_complex():
        raise BandwidthInputError(f"{where}: complex dtype {x.dtype} is not supported; "
                                  "residual activations are real")
    if not x.is_floating_point():
        raise BandwidthInputError(
            f"{where}: dtype {x.dtype} is not a floating type (did you pass token ids instead of "
            "activations?)")
    if x.ndim != 2:
        hint = (" (a batch? select one prompt or flatten with x.reshape(-1, x.shape[-1]))"
                if x.ndim == 3 else "")
        raise BandwidthInputError(
            f"{where}: expected 2 dimensions [positions, d_model], got shape {tuple(x.shape)}{hint}")
    n, d = x.shape
    if n == 0 or d == 0:
        raise BandwidthInputError(f"{where}: empty matrix of shape {tuple(x.shape)}")
    if d > MAX_D_MODEL or x.numel() > MAX_ELEMENTS:
        raise BandwidthInputError(
            f"{where}: shape {tuple(x.shape)} is too large to analyse (limits: d_model <= "
            f"{MAX_D_MODEL}, positions x d_model <= {MAX_ELEMENTS}); subsample positions first")
    if n < min_rows:
        raise BandwidthInputError(
            f"{where}: {n} position(s); at least {min_rows} are needed to estimate a spectrum "
            "(a single vector has no variance)")
    if x.device.type != "meta" and not all_finite(x):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        rows = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten()[:5].tolist()
        raise BandwidthInputError(
            f"{where}: contains {n_nan} NaN and {n_inf} Inf value(s), first at position(s) {rows}")
    return x


def check_dense(x: torch.Tensor, where: str) -> None:
    """Reject sparse (and other non-strided) tensors by name: the metrics read rows in blocks."""
    if x.layout != torch.strided:
        raise BandwidthInputError(
            f"{where}: sparse tensor (layout {x.layout}); residual activations are dense, convert "
            "with x.to_dense() first")


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry of ``x`` is NaN or Inf.

    A NaN or Inf entry always makes the sum NaN or Inf, so a finite ``x.sum()`` proves every entry
    finite in one cheap reduction (no boolean copy of ``x``). Only when the sum is not finite (a bad
    entry, or finite entries whose sum overflows) are the entries checked one by one, in blocks.
    Half-precision inputs are summed in float32 (a float16 sum overflows float16 long before an
    entry is bad).
    """
    half = x.dtype in (torch.float16, torch.bfloat16)
    if bool(torch.isfinite(x.sum(dtype=torch.float32) if half else x.sum())):
        return True
    return all(bool(torch.isfinite(x[i:i + 8192]).all()) for i in range(0, x.shape[0], 8192))


def as_matrix_list(states, name: str = "residual_states", min_rows: int = 2) -> list[torch.Tensor]:
    """Validate a non-empty sequence of ``[positions, d_model]`` matrices with one shared d_model."""
    if isinstance(states, (torch.Tensor, np.ndarray)):
        if getattr(states, "ndim", 0) == 3:
            states = list(states)
        else:
            raise BandwidthInputError(
                f"{name}: expected a list of [positions, d_model] matrices (one per layer), got a "
                f"single array of shape {tuple(states.shape)}")
    if isinstance(states, Mapping):
        raise BandwidthInputError(
            f"{name}: got a mapping; use ResidualCapture.from_hook_dict(...) for hook-name mappings")
    if not isinstance(states, Sequence) or isinstance(states, (str, bytes)):
        raise BandwidthInputError(f"{name}: expected a list of tensors, got {type(states).__name__}")
    if len(states) == 0:
        raise BandwidthInputError(f"{name}: empty list; pass at least one layer's [positions, d_model]")
    out = [as_matrix(s, name=f"{name}[{i}]", layer=i, min_rows=min_rows) for i, s in enumerate(states)]
    check_same_width(out, name)
    return out


def check_same_width(mats: Iterable[torch.Tensor], name: str = "residual_states") -> int:
    """Raise unless every matrix has the same number of columns; return that d_model."""
    d0 = None
    for i, m in enumerate(mats):
        if d0 is None:
            d0 = m.shape[-1]
        elif m.shape[-1] != d0:
            raise BandwidthInputError(
                f"{name}[{i}] (layer {i}): d_model = {m.shape[-1]} but layer 0 has d_model = {d0}; "
                "all layers must come from the same model")
    return int(d0)


def check_fraction(value, name: str, open_low: bool = True) -> float:
    """A number in (0, 1] (or [0, 1] when ``open_low`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise BandwidthInputError(f"{name}: expected a number in (0, 1], got {value!r}")
    v = float(value)
    low_ok = v > 0 if open_low else v >= 0
    if not (np.isfinite(v) and low_ok and v <= 1):
        raise BandwidthInputError(f"{name}: expected a number in {'(' if open_low else '['}0, 1], got {v}")
    return v


def check_positive(value, name: str) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise BandwidthInputError(f"{name}: expected a positive number, got {value!r}")
    v = float(value)
    if not (np.isfinite(v) and v > 0):
        raise BandwidthInputError(f"{name}: expected a positive finite number, got {v}")
    return v


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (``int`` or a numpy integer, never ``bool``) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or (low is not None and value < low) or (high is not None and value > high):
        what = "a positive int" if low == 1 else (f"an int >= {low}" if low is not None else "an int")
        raise BandwidthInputError(f"{name}: expected {what}{f' <= {high}' if high is not None else ''}, "
                                  f"got {value!r}")
    return int(value)


def check_prompts(prompts) -> list[str]:
    """A non-empty list of non-empty strings (a single string is wrapped)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise BandwidthInputError("prompts: expected a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BandwidthInputError(f"prompts[{i}]: expected str, got {type(p).__name__}")
        if not p.strip():
            raise BandwidthInputError(f"prompts[{i}]: empty prompt")
    return list(prompts)
